"""Central evaluation of the global model on held-out data."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

EVAL_BATCH_SIZE = 256


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = EVAL_BATCH_SIZE) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of ``model`` on ``dataset``."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for inputs, targets in DataLoader(dataset, batch_size=batch_size):
        logits = model(inputs)
        loss_sum += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
        correct += int((logits.argmax(dim=1) == targets).sum())
        count += len(targets)
    return loss_sum / count, correct / count
