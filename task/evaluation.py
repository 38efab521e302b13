"""The one evaluation loop: loss and accuracy of a classifier on a data set.

Used for the server's central evaluation, the accuracy before and after compression,
and the digital and analog accuracy of a crossbar deployment.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

EVAL_BATCH_SIZE = 256


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = EVAL_BATCH_SIZE) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of ``model`` on ``dataset``, in eval mode;
    the model's training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for inputs, targets in DataLoader(dataset, batch_size=batch_size):
        logits = model(inputs)
        loss_sum += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
        correct += int((logits.argmax(dim=1) == targets).sum())
        count += len(targets)
    model.train(was_training)
    return loss_sum / count, correct / count


def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = EVAL_BATCH_SIZE) -> float:
    return evaluate(model, dataset, batch_size)[1]
