"""Local training and the client's half of client-level DP, in plain PyTorch."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from dpfl.cim.precision import multi_precision_gradient
from dpfl.client.local_dp import LocalDP, privatise_gradient
from dpfl.errors import UsageError
from dpfl.privacy.mechanism import ClientInstructions, privatise_update
from dpfl.privacy.randomness import RandomStream
from dpfl.strategies.base import LocalUpdateRule, Tensors


@dataclass
class PrivateUpdate:
    update: Tensors  # the clipped (and, with client-side noise, noised) private part
    norm_before_clip: float
    train_loss: float
    steps: int


def cycle_batches(dataset: Dataset, batch_size: int, generator: torch.Generator) -> Iterator:
    """Mini-batches over reshuffled passes of the data, endlessly; a last partial batch is a batch."""
    if not _indexable_by_batch(dataset):
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
        while True:
            yield from loader
    # By hand for tensors: a permutation per pass and one indexing per batch. A DataLoader's
    # per-pass set-up and per-example fetch and collate cost more than a small model's step.
    while True:
        for batch in torch.randperm(len(dataset), generator=generator).split(batch_size):
            yield dataset[batch.tolist()]


def _indexable_by_batch(dataset: Dataset) -> bool:
    """Whether ``dataset[list_of_indices]`` is the batch (tensors, and subsets of tensors)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return isinstance(dataset, TensorDataset)


def local_sgd(
    model: nn.Module,
    batches: Iterator,
    rule: LocalUpdateRule,
    steps: int,
    optimizer: torch.optim.Optimizer,
    grad_clip: float,
    dp_optimizer: DPOptimizer | None = None,
    bit_widths: tuple[int, ...] = (),
) -> float:
    """Take exactly ``steps`` steps of ``optimizer`` along the rule's direction; return the mean loss.
    With ``bit_widths``, each step's gradient is the mean over the full-precision model
    and its quantisations at those weight bits (:func:`dpfl.cim.precision.multi_precision_gradient`).

    With ``dp_optimizer`` (sample-level DP, wrapping ``optimizer``) each step's
    per-sample gradients are clipped and noised first; the stability clip and the
    rule's direction (e.g. DP-FedPGN's mixing with the public c) then only
    post-process the privatised gradient.
    """
    model.train()
    total_loss, batches_with_data = 0.0, 0
    for _ in range(steps):
        inputs, targets = next(batches)
        (dp_optimizer or optimizer).zero_grad(set_to_none=False)  # the DP optimizer's also drops per-sample grads
        loss = multi_precision_gradient(lambda: rule.compute_gradient(model, inputs, targets), model, bit_widths)
        if len(targets):  # an empty Poisson batch has no loss, but its noise-only step is still taken
            total_loss += loss
            batches_with_data += 1
        if dp_optimizer is not None:
            privatise_gradient(model, dp_optimizer)
        for param in model.parameters():
            if param.grad is None:  # a parameter the loss does not reach still moves along c
                param.grad = torch.zeros_like(param)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        rule.direction(model)
        optimizer.step()
    return total_loss / max(batches_with_data, 1)


def train_private_update(
    model: nn.Module,
    dataset: Dataset,
    rule: LocalUpdateRule,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    grad_clip: float,
    instructions: ClientInstructions,
    generator: torch.Generator,
    noise_stream: RandomStream,
    local_dp: LocalDP | None = None,
    train_bit_widths: tuple[int, ...] = (),
) -> PrivateUpdate:
    """Train from the model's current weights x and return the privatised private part of Δ.

    ``generator`` (seeded from ``--seed``) only shuffles the local data; the noise
    share comes from ``noise_stream`` and the clipping and noise follow the
    mechanism's ``instructions`` (:func:`dpfl.privacy.mechanism.privatise_update`).
    ``local_dp`` adds sample-level DP-SGD inside the client; its accountant counts
    the steps taken. ``train_bit_widths`` trains the weights for devices of those
    precisions too (multi-precision training; not with ``local_dp``, whose per-sample
    clipping expects one backward pass per step).
    """
    if train_bit_widths and local_dp is not None:
        raise UsageError("train-bit-widths cannot be combined with local-dp (one backward pass per DP-SGD step)")
    if len(dataset) == 0:
        raise UsageError("this client's partition has no training examples; give it data or leave it out of the federation")
    start = {name: t.detach().clone() for name, t in model.state_dict().items()}
    # Momentum 0: DP-FedPGN's public part (1−γ)Kηc is exact only then.
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0, weight_decay=weight_decay)
    if local_dp is None:
        loss = local_sgd(model, cycle_batches(dataset, batch_size, generator), rule, steps, optimizer, grad_clip,
                         bit_widths=train_bit_widths)  # fmt: skip
    else:
        with local_dp.training(model, optimizer, dataset, batch_size) as (dp_optimizer, batches):
            loss = local_sgd(model, batches, rule, steps, optimizer, grad_clip, dp_optimizer)
    end = model.state_dict()
    delta = {name: start[name] - end[name].detach() for name in start}
    public = rule.public_part(steps, lr)
    private = delta if public is None else {name: delta[name] - public[name] for name in delta}
    update, norm = privatise_update(private, instructions, noise_stream)
    return PrivateUpdate(update=update, norm_before_clip=norm, train_loss=loss, steps=steps)
