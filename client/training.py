"""Local training and the client's half of client-level DP, in plain PyTorch."""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from dpfl.cim.precision import multi_precision_gradient
from dpfl.client.local_dp import LocalDP, privatise_gradient
from dpfl.errors import UsageError
from dpfl.flat import Layout
from dpfl.privacy.mechanism import ClientInstructions, privatise_rows
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


@dataclass
class LocalTraining:
    """One client's local training as its ClientApp prepared it: everything
    :func:`train_private_update` takes, and the weights to start from.

    The ClientApp hands it to whoever trains (:func:`dpfl.client.cohort.train_alone`, or
    :func:`dpfl.client.cohort.train_together` for a vectorised cohort), so that what a
    client checks, counts and replies stays in one place whichever way it trains.
    """

    model: nn.Module
    weights: Tensors
    dataset: Dataset
    rule: LocalUpdateRule
    steps: int
    lr: float
    batch_size: int
    weight_decay: float
    grad_clip: float
    instructions: ClientInstructions
    generator: torch.Generator  # shuffles the local data (seeded from --seed, round and partition)
    noise_stream: RandomStream
    seed: int  # of anything else random in local training (a strategy's own draws)
    local_dp: LocalDP | None = None
    train_bit_widths: tuple[int, ...] = ()

    def run(self) -> PrivateUpdate:
        """Train in the loop, alone."""
        load_weights(self.model, self.weights)
        # A strategy's own draws are seeded too, so that a client computes the same
        # whichever process or engine runs it.
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed also queues a seeding of every
            # accelerator backend, with a formatted stack, at each call.
            torch.default_generator.manual_seed(self.seed)
            return train_private_update(
                self.model, self.dataset, self.rule, steps=self.steps, lr=self.lr, batch_size=self.batch_size,
                weight_decay=self.weight_decay, grad_clip=self.grad_clip, instructions=self.instructions,
                generator=self.generator, noise_stream=self.noise_stream, local_dp=self.local_dp,
                train_bit_widths=self.train_bit_widths,
            )  # fmt: skip


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
    check_has_examples(dataset)
    layout, state = model_state(model)
    start = layout.flatten(state)  # a copy
    # Momentum 0: DP-FedPGN's public part (1−γ)Kηc is exact only then.
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0, weight_decay=weight_decay)
    device = next(model.parameters()).device
    if local_dp is None:
        batches = (_to(batch, device) for batch in cycle_batches(dataset, batch_size, generator))
        loss = local_sgd(model, batches, rule, steps, optimizer, grad_clip, bit_widths=train_bit_widths)
    else:
        with local_dp.training(model, optimizer, dataset, batch_size) as (dp_optimizer, batches):
            loss = local_sgd(model, (_to(batch, device) for batch in batches), rule, steps, optimizer, grad_clip, dp_optimizer)
    delta = start - layout.flatten(state)
    return privatise_local_update(delta, layout, public_vector(rule, layout, steps, lr), instructions, noise_stream,
                                  loss, steps)  # fmt: skip


def model_state(model: nn.Module) -> tuple[Layout, dict[str, torch.Tensor]]:
    """The model's state dict (its tensors, sharing the model's storage) and its layout, read
    once per model: ``state_dict`` and ``load_state_dict`` walk every submodule at each call,
    which costs more than a small model's local step."""
    kept = _states.get(model)
    if kept is None:
        state = {name: t.detach() for name, t in model.state_dict(keep_vars=True).items()}
        kept = _states[model] = (Layout(state), state)
    return kept


def load_weights(model: nn.Module, weights: Tensors) -> None:
    """``model.load_state_dict(weights)``, strictly (same names and shapes), without the walk."""
    layout, state = model_state(model)
    if weights.keys() != state.keys() or any(weights[name].shape != t.shape for name, t in state.items()):
        model.load_state_dict(weights)  # raises, naming what does not fit
    with torch.no_grad():
        for name, t in state.items():
            t.copy_(weights[name])


# model -> its state; a model no longer used is forgotten.
_states: weakref.WeakKeyDictionary[nn.Module, tuple[Layout, dict[str, torch.Tensor]]] = weakref.WeakKeyDictionary()


def check_has_examples(dataset: Dataset) -> None:
    if len(dataset) == 0:
        raise UsageError("this client's partition has no training examples; give it data or leave it out of the federation")


def privatise_local_update(
    delta: torch.Tensor,
    layout: Layout,
    public: torch.Tensor | None,
    instructions: ClientInstructions,
    noise_stream: RandomStream,
    loss: float,
    steps: int,
) -> PrivateUpdate:
    """The client's half of the mechanism on its Δ = x − y, one vector in the model's state
    ``layout`` (on any device): :func:`privatise_local_updates` of one client."""
    [update] = privatise_local_updates(delta.unsqueeze(0), layout, public, [instructions], [noise_stream], [loss], steps)
    return update


def privatise_local_updates(
    deltas: torch.Tensor,
    layout: Layout,
    public: torch.Tensor | None,
    instructions: Sequence[ClientInstructions],
    noise_streams: Sequence[RandomStream],
    losses: Sequence[float],
    steps: int,
) -> list[PrivateUpdate]:
    """Several clients' halves, one Δ = x − y a row of ``deltas`` [n, d] in the model's state
    ``layout`` (on any device): the rule's ``public`` part (the same layout) removed, the
    rest brought to the CPU and privatised there, each row on its own (clipped to its C in
    float64, its noise share from its own secure stream;
    :func:`dpfl.privacy.mechanism.privatise_rows`)."""
    private = deltas if public is None else deltas - public
    privatised = privatise_rows(private.cpu(), layout, instructions, noise_streams)
    return [PrivateUpdate(update=update, norm_before_clip=norm, train_loss=loss, steps=steps)
            for (update, norm), loss in zip(privatised, losses, strict=True)]  # fmt: skip


def public_vector(rule: LocalUpdateRule, layout: Layout, steps: int, lr: float) -> torch.Tensor | None:
    """The rule's public part of Δ after ``steps`` steps at ``lr`` as one vector of ``layout``, if any."""
    public = rule.public_part(steps, lr)
    return None if public is None else layout.flatten(public)


def _to(batch: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    return [t.to(device, non_blocking=True) for t in batch]
