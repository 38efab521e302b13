"""The CIM study of one model on one device, shared by ``dpfl deploy`` and a node's
deployment: calibrate every mappable layer on a few images, then run
:func:`dpfl.cim.study.run_study`."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from dpfl.cim.device import CrossbarDevice
from dpfl.cim.model import calibrate, mappable_layers
from dpfl.cim.study import SWEEP_TILE_SIZES, DeployReport, run_study
from dpfl.task.attention import ExplicitAttention, explicit_attention

# Training images whose activations set each layer's input scale and bit density.
CALIBRATION_IMAGES = 64
# Input vectors per layer on which NF and output error are measured by circuit solves.
REPORT_VECTORS = 16


def cim_study(
    model: nn.Module, calibration_data: Dataset, test_data: Dataset, device: CrossbarDevice,
    mapping: str, mode: str, seed: int, trials: int = 1, progress=lambda message: None,
    sweep_tile_sizes: tuple[int, ...] = SWEEP_TILE_SIZES,
) -> tuple[DeployReport, dict[str, torch.Tensor]]:
    """Everything ``dpfl deploy`` reports for ``model`` on ``device``, and the per-cell
    loss maps of its heat map; ``calibration_data`` must not overlap ``test_data``.

    Attention is first given explicit projection layers (in place), so every static
    weight matrix goes onto crossbars; the attention products stay digital.
    """
    explicit_attention(model)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    count = min(CALIBRATION_IMAGES, len(calibration_data))
    calibration = torch.stack([calibration_data[i][0] for i in range(count)])
    statistics = calibrate(model.eval(), calibration, device, REPORT_VECTORS, generator)
    report, losses = run_study(model, statistics, test_data, device, mapping, mode, seed, trials, progress, sweep_tile_sizes)
    report.context = {"test_images": len(test_data), "calibration_images": count,
                      "report_vectors_per_layer": REPORT_VECTORS, "operations": operations(model)}  # fmt: skip
    return report, losses


def operations(model: nn.Module) -> list[dict[str, str]]:
    """Every operation that holds weights or multiplies activations, and where it runs:
    Conv2d/Linear weights on crossbars (analog); attention's score and value products
    (activations times activations), normalisation and embeddings in the digital periphery."""
    analog = mappable_layers(model)
    rows = []
    for name, module in model.named_modules():
        if name in analog:
            rows.append({"operation": name, "kind": type(module).__name__, "where": "analog"})
        elif isinstance(module, ExplicitAttention):
            rows.append({"operation": f"{name}.scores", "kind": "Q·Kᵀ (attention scores)", "where": "digital"})
            rows.append({"operation": f"{name}.values", "kind": "softmax·V (attention values)", "where": "digital"})
        elif list(module.parameters(recurse=False)):
            rows.append({"operation": name or "<model>", "kind": type(module).__name__, "where": "digital"})
    return rows
