"""Figures of a deployment study: distortion against tile size, and the per-cell
current loss of one tile under every mapping.

matplotlib is imported on first use (with the file-only Agg backend), so commands
that draw nothing do not pay for it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dpfl.cim.metrics import ModelDistortion


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_distortion_sweep(sweep: list[ModelDistortion], path: Path) -> None:
    """Model NF and relative output error against tile size, one line per mapping."""
    plt = pyplot()
    fig, (ax_nf, ax_err) = plt.subplots(1, 2, figsize=(9, 3.6))
    for name in dict.fromkeys(entry.mapping for entry in sweep):
        points = [entry for entry in sweep if entry.mapping == name]
        sizes = [entry.tile_size for entry in points]
        ax_nf.plot(sizes, [entry.nf for entry in points], marker="o", label=name)
        ax_err.plot(sizes, [entry.output_error for entry in points], marker="o", label=name)
    for ax, label in ((ax_nf, "non-ideality factor (NF)"), (ax_err, "relative output error")):
        ax.set_xscale("log", base=2)
        swept = sorted({entry.tile_size for entry in sweep})
        ax.set_xticks(swept, [str(size) for size in swept])
        ax.set_xlabel("tile size (rows = columns)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Parasitic distortion against tile size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cell_loss(losses: dict[str, torch.Tensor], layer: str, path: Path) -> None:
    """Heat maps of the mean current lost per cell and read cycle (by mapping) in the
    first tile of ``layer``, on one colour scale."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(losses), figsize=(4.5 * len(losses), 4.2), squeeze=False)
    axes = axes[0]
    top = max(float(loss.max()) for loss in losses.values()) * 1e9 or 1.0
    for ax, name in zip(axes, losses):
        image = ax.imshow(losses[name].numpy() * 1e9, cmap="magma", vmin=0, vmax=top)
        ax.set_title(f"{name}")
        ax.set_xlabel("column (drivers at 0)")
        ax.set_ylabel("row (sense amplifiers below)")
    fig.colorbar(image, ax=axes, label="mean current lost per read cycle (nA)")
    fig.suptitle(f"Per-cell current loss, first tile of {layer}")
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["plot_cell_loss", "plot_distortion_sweep", "pyplot"]
