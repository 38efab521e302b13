"""Public pretraining on formula-driven synthetic images, cached on disk by a content hash.

DP Transformers are trained in practice by public pretraining followed by private
fine-tuning. Here the public data are formula-driven: fractals (``dpfl.task.fractals``)
or made-up pen-stroke characters (``dpfl.task.strokes``). The pretrained weights are a
pure function of the code, the model's shape, the data set's name and the
configuration below, computed on first use and cached under the user's cache
directory (``DPFL_CACHE_DIR``, else ``$XDG_CACHE_HOME/dpfl``, else ``~/.cache/dpfl``)
in a file named by a hash of all of that. Nothing binary is committed; a change to
the generator or to this module makes a new file.

Only the server calls this (it sends the initial global model to the clients), and
no client data is involved, so pretraining costs no privacy.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from dpfl.errors import UsageError
from dpfl.progress import Progress, no_progress
from dpfl.task import fractals, rendering, strokes
from dpfl.task.checkpoint import ModelSpec
from dpfl.task.files import cache_dir, load_tagged, save_tagged

PRETRAINED_FORMAT = "dpfl-pretrained-v1"
# The synthetic data sets' generators, by the name a recipe or --pretraining gives.
GENERATORS = {"fractal": fractals.generate_fractals, "strokes": strokes.generate_strokes}
# Initial weights a recipe may ask for: "none" is the model's own random init.
PRETRAINING_CHOICES = ("none", *GENERATORS)
# Keys of the classification head, which is re-initialised for the target task.
HEAD_PREFIXES = ("heads.", "fc.")


@dataclass(frozen=True)
class PretrainConfig:
    data: rendering.SyntheticConfig = field(default_factory=rendering.SyntheticConfig)
    # 16, not 8: on strokes, DP-FedPGN's validation accuracy at epsilon 8 rose from 80-81% to
    # 86-87%; 32 gained nothing more (docs/vit.md, "Session 7").
    epochs: int = 16
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    seed: int = 0



def cache_key(spec: ModelSpec, dataset: str, config: PretrainConfig) -> str:
    """Hash of everything the weights depend on: shape, architecture, data set, configuration, code, torch version."""
    shape = {**asdict(spec), "num_classes": None}  # the head is not kept
    # The built model's parameter shapes, so a change to the architecture (e.g. its
    # depth, which ModelSpec does not name) never loads stale weights.
    architecture = {name: list(t.shape) for name, t in spec.build().state_dict().items() if not name.startswith(HEAD_PREFIXES)}
    payload = json.dumps({"spec": shape, "architecture": architecture, "dataset": dataset, "config": asdict(config),
                          "torch": torch.__version__}, sort_keys=True)  # fmt: skip
    code = "".join(inspect.getsource(module) for module in (fractals, strokes, rendering, inspect.getmodule(cache_key)))
    return hashlib.sha256((payload + code).encode()).hexdigest()[:16]


def pretrain(
    spec: ModelSpec, dataset: str, config: PretrainConfig, progress: Progress = no_progress
) -> dict[str, torch.Tensor]:
    """Train the model to classify the categories of synthetic ``dataset``; return its weights without the head."""
    data = replace(config.data, image_size=spec.image_size)
    if data.render_size % data.image_size:
        data = replace(data, render_size=data.image_size * max(1, round(data.render_size / data.image_size)))
    progress(f"generating {dataset} images for public pretraining", 0, 1)
    images, labels = GENERATORS[dataset](data)
    progress(f"generating {dataset} images for public pretraining", 1, 1)
    x = torch.from_numpy(images).unsqueeze(1)
    x = ((x - x.mean()) / x.std()).expand(-1, spec.in_channels, -1, -1).contiguous()
    y = torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model = replace(spec, num_classes=data.categories).build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * -(-len(y) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps, pct_start=0.1)
    model.train()
    stage = f"public pretraining of {spec.name} on {dataset} ({config.epochs} epochs)"
    for epoch in range(config.epochs):
        progress(stage, epoch * steps // config.epochs, steps)
        order = torch.randperm(len(y), generator=generator)
        for batch in order.split(config.batch_size):
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch], label_smoothing=config.label_smoothing)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    progress(stage, steps, steps)
    return {k: v.detach() for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIXES)}


def pretrained_weights(
    spec: ModelSpec, dataset: str, config: PretrainConfig = PretrainConfig(), progress: Progress = no_progress
) -> tuple[dict[str, torch.Tensor], Path, float]:
    """(backbone weights, cache file, seconds spent pretraining now: 0 on a cache hit)."""
    name = f"{spec.name}-w{spec.width}-{spec.image_size}px-{dataset}-{cache_key(spec, dataset, config)}.pt"
    path = cache_dir() / "pretrained" / name
    if path.exists():
        return load_tagged(path, PRETRAINED_FORMAT, "pretrained weights")["state_dict"], path, 0.0
    started = time.perf_counter()
    weights = pretrain(spec, dataset, config, progress)
    seconds = time.perf_counter() - started
    save_tagged(path, PRETRAINED_FORMAT, {"state_dict": weights, "dataset": dataset, "config": asdict(config), "seconds": seconds})
    return weights, path, seconds


def initialise(model: nn.Module, spec: ModelSpec, pretraining: str) -> float:
    """Load the pretrained backbone named by ``pretraining`` into ``model``; return seconds spent pretraining."""
    if pretraining not in PRETRAINING_CHOICES:
        raise UsageError(f"unknown pretraining {pretraining!r}; choose one of {', '.join(PRETRAINING_CHOICES)}")
    if pretraining == "none":
        return 0.0
    weights, _, seconds = pretrained_weights(spec, pretraining)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith(HEAD_PREFIXES) for k in missing):
        raise RuntimeError(f"pretrained weights do not fit {spec.name}: missing {missing}, unexpected {unexpected}")
    return seconds
