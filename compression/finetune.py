"""Short fine-tuning of a (compressed) classifier: a plain torch loop."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from dpfl.progress import Progress, no_progress, tracked


def finetune(model: nn.Module, loader: DataLoader, epochs: int, lr: float, progress: Progress = no_progress) -> None:
    """``epochs`` passes of Adam on the cross-entropy, all parameters trainable."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in tracked(range(epochs), "fine-tuning (epochs)", progress):
        for inputs, labels in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), labels).backward()
            optimizer.step()
    model.eval()
