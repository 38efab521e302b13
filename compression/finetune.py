"""Short fine-tuning of a (compressed) classifier: a plain torch loop."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader


def finetune(model: nn.Module, loader: DataLoader, epochs: int, lr: float) -> None:
    """``epochs`` passes of Adam on the cross-entropy, all parameters trainable."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for inputs, labels in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), labels).backward()
            optimizer.step()
    model.eval()
