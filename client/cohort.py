"""Vectorised cohorts: a round's clients trained as one batched computation (``torch.func``).

All the clients a round samples start from the same global weights and take the same
public number of plain SGD steps at the same learning rate, so their local training is
one function of (parameters, batches) applied to each: ``torch.func.vmap`` runs it
for all of them at once over stacked per-client parameters and per-client batches.
Each step, every client draws its next mini-batch from its own shuffling generator,
exactly as the loop does (:func:`dpfl.client.training.cycle_batches`); a batch with
fewer examples than the step's largest is filled up by repeating its own examples
with weight 0 in its mean loss, so that padding never changes a client's gradient
(masked, not fake data). The strategy's rule gives each client's gradient and
direction through its functional form
(:meth:`dpfl.strategies.base.LocalUpdateRule.functional_gradient`), the stability
clip uses each client's own gradient norm, and the SGD step with weight decay is the
optimiser's. Each client's Δ then goes through the same privatisation as in the loop
(:func:`dpfl.client.training.privatise_local_update`): its private part clipped to C
on its own, its noise share from its own secure stream, on the CPU in float64. Per
client, the result equals the loop's up to float rounding (tests/test_cohort.py).

Memory grows with the cohort (parameters, gradients and activations of every client
at once), so a large cohort is trained in chunks that fit :func:`memory_budget`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import Dataset

from dpfl.client.training import PrivateUpdate, check_has_examples, cycle_batches, privatise_local_update
from dpfl.privacy.mechanism import ClientInstructions
from dpfl.privacy.randomness import RandomStream
from dpfl.strategies.base import LocalUpdateRule, Tensors, l2_norm

# torch.nn.utils.clip_grad_norm_ divides by the norm plus this, and so does the cohort.
CLIP_EPSILON = 1e-6
# What a chunk of a cohort may hold on the CPU (an accelerator: half of its free memory).
CPU_COHORT_BYTES = 1 << 30
# Copies of the parameters a client holds during a step (parameters, gradients, the
# ascent point and its gradient, the direction, the new parameters) and the factor from
# a forward pass's activations to those kept for its backward pass and their gradients.
PARAMETER_COPIES = 6
ACTIVATION_FACTOR = 3


@dataclass(frozen=True)
class CohortClient:
    """What differs between the clients of a cohort: their data and their own randomness."""

    dataset: Dataset
    generator: torch.Generator  # shuffles the local data (seeded from --seed, round and partition)
    instructions: ClientInstructions
    noise_stream: RandomStream


def train_cohort(
    model: nn.Module,
    rule: LocalUpdateRule,
    clients: Sequence[CohortClient],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    grad_clip: float,
) -> list[PrivateUpdate]:
    """Each client's privatised update after ``steps`` local steps from ``model``'s weights,
    as :func:`dpfl.client.training.train_private_update` computes it, all clients at once.

    ``rule`` (which must have a functional form) is the one rule of every client of the
    cohort: they got the same train config and records. ``model`` is left unchanged.
    """
    if not type(rule).has_functional_form():
        raise ValueError(f"{type(rule).__qualname__} has no functional form; train its clients in the loop")
    for client in clients:
        check_has_examples(client.dataset)
    model.train()
    start = {name: t.detach() for name, t in model.state_dict().items()}
    example = clients[0].dataset[0][0]
    chunk = chunk_size(model, tuple(example.shape), batch_size)
    updates: list[PrivateUpdate] = []
    for first in range(0, len(clients), chunk):
        members = clients[first : first + chunk]
        params, losses = _train_chunk(model, rule, members, steps, lr, batch_size, weight_decay, grad_clip)
        for index, client in enumerate(members):
            # Buffers do not train (dpfl's models have no BatchNorm): their Δ is zero, as in the loop.
            delta = {name: start[name] - params[name][index] if name in params else torch.zeros_like(t)
                     for name, t in start.items()}  # fmt: skip
            updates.append(
                privatise_local_update(delta, rule, steps, lr, client.instructions, client.noise_stream, losses[index])
            )
    return updates


def _train_chunk(
    model: nn.Module,
    rule: LocalUpdateRule,
    clients: Sequence[CohortClient],
    steps: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    grad_clip: float,
) -> tuple[Tensors, list[float]]:
    """The clients' parameters after ``steps`` steps, stacked on a first axis, and their mean losses."""
    device = next(model.parameters()).device
    buffers = {name: t.detach() for name, t in model.named_buffers()}

    def mean_loss(params: Tensors, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, {**params, **buffers}, (inputs,))
        return (nn.functional.cross_entropy(logits, targets, reduction="none") * weights).sum()

    def step(params: Tensors, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor):
        grads, loss = rule.functional_gradient(mean_loss, params, (inputs, targets, weights))
        # The platform's stability clip, clip_grad_norm_'s arithmetic on this client's norm.
        scale = torch.clamp(grad_clip / (l2_norm(grads) + CLIP_EPSILON), max=1.0)
        direction = rule.functional_direction({name: g * scale for name, g in grads.items()})
        # torch.optim.SGD without momentum: p − lr·(d + weight_decay·p).
        return {name: p - lr * (direction[name] + weight_decay * p) for name, p in params.items()}, loss

    vectorised = vmap(step, randomness="error")
    params = {name: p.detach().expand(len(clients), *p.shape).clone() for name, p in model.named_parameters()}
    streams = [cycle_batches(client.dataset, batch_size, client.generator) for client in clients]
    total = torch.zeros(len(clients), dtype=torch.float64)
    # Attention as matrix products, which vmap batches; its fused kernels have no batching
    # rule and would run client by client.
    with sdpa_kernel(SDPBackend.MATH):
        for _ in range(steps):
            inputs, targets, weights = (t.to(device) for t in _stacked_batches(streams))
            params, loss = vectorised(params, inputs, targets, weights)
            total += loss.detach().double().cpu()
    return params, (total / steps).tolist()


def _stacked_batches(streams: Sequence[Iterator]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each stream's next batch, filled up to the largest by repeating its own examples at
    weight 0, stacked: inputs [clients, b, ...], targets [clients, b], weights [clients, b]."""
    batches = [next(stream) for stream in streams]
    size = max(len(targets) for _, targets in batches)
    inputs, targets, weights = [], [], []
    for x, y in batches:
        count = len(y)
        fill = torch.arange(size - count) % count
        inputs.append(torch.cat([x, x[fill]]))
        targets.append(torch.cat([y, y[fill]]))
        weights.append(torch.cat([torch.full((count,), 1.0 / count), torch.zeros(size - count)]))
    return torch.stack(inputs), torch.stack(targets), torch.stack(weights)


def chunk_size(model: nn.Module, example_shape: tuple[int, ...], batch_size: int) -> int:
    """How many clients to train at once so that a chunk fits :func:`memory_budget`."""
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    per_client = PARAMETER_COPIES * parameter_bytes + ACTIVATION_FACTOR * batch_size * activation_bytes(model, example_shape)
    device = next(model.parameters()).device
    return max(1, math.floor(memory_budget(device) / per_client))


def activation_bytes(model: nn.Module, example_shape: tuple[int, ...]) -> int:
    """Bytes of the outputs of every module in a forward pass of one example."""
    total = 0

    def count(module: nn.Module, inputs, output) -> None:
        nonlocal total
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    parameter = next(model.parameters())
    hooks = [module.register_forward_hook(count) for module in model.modules()]
    try:
        with torch.no_grad():
            model(torch.zeros((1, *example_shape), dtype=parameter.dtype, device=parameter.device))
    finally:
        for hook in hooks:
            hook.remove()
    return total


def memory_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return CPU_COHORT_BYTES
