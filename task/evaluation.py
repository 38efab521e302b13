"""The one evaluation loop: loss and accuracy of a classifier on a data set.

Used for the server's central evaluation, the accuracy before and after compression,
and the digital and analog accuracy of a crossbar deployment.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dpfl.progress import Progress, no_progress, tracked

EVAL_BATCH_SIZE = 256


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Dataset, batch_size: int = EVAL_BATCH_SIZE, progress: Progress = no_progress,
    stage: str = "evaluating", device: torch.device | None = None,
) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of ``model`` on ``dataset``, in eval mode;
    the model's training flag is restored afterwards. ``progress`` sees each batch as a
    step of ``stage``. ``device``: where to compute (a copy of the model goes there if it
    is elsewhere)."""
    here = next(model.parameters()).device
    if device is not None and device != here:
        model, here = copy.deepcopy(model).to(device), device
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for inputs, targets in tracked(DataLoader(dataset, batch_size=batch_size), stage, progress):
        inputs, targets = inputs.to(here), targets.to(here)
        logits = model(inputs)
        loss_sum += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
        correct += int((logits.argmax(dim=1) == targets).sum())
        count += len(targets)
    model.train(was_training)
    return loss_sum / count, correct / count


def accuracy(
    model: nn.Module, dataset: Dataset, batch_size: int = EVAL_BATCH_SIZE, progress: Progress = no_progress,
    stage: str = "evaluating",
) -> float:
    return evaluate(model, dataset, batch_size, progress, stage)[1]
