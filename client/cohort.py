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
(:func:`dpfl.client.training.privatise_local_updates`, the chunk's rows at once): its
private part clipped to C on its own (one float64 norm per row), its noise share from
its own secure stream, on the CPU in float64. Per client, the result equals the loop's
up to float rounding (tests/test_cohort.py).

Memory grows with the cohort (parameters, gradients and activations of every client
at once), so a large cohort is trained in chunks that fit :func:`memory_budget`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import Dataset

from dpfl.client.training import (
    LocalTraining,
    PrivateUpdate,
    check_has_examples,
    cycle_batches,
    load_weights,
    model_state,
    privatise_local_updates,
    public_vector,
)
from dpfl.flat import FlatTensors, Layout
from dpfl.privacy.mechanism import ClientInstructions
from dpfl.privacy.randomness import RandomStream
from dpfl.strategies.base import LocalUpdateRule, Tensors, defining_class

# torch.nn.utils.clip_grad_norm_ divides by the norm plus this, and so does the cohort.
CLIP_EPSILON = 1e-6
# What a chunk of a cohort may hold on the CPU (an accelerator: half of its free memory).
CPU_COHORT_BYTES = 1 << 30
# Copies of the parameters a client holds during a step (parameters, gradients, the
# ascent point and its gradient, the direction, the new parameters) and the factor from
# a forward pass's activations to those kept for its backward pass and their gradients.
PARAMETER_COPIES = 6
ACTIVATION_FACTOR = 3


# A ClientApp's training of one message, as a generator: it yields its LocalTraining, is
# sent the result (or has the training's exception thrown in) and returns its reply.
Training = Generator[LocalTraining, PrivateUpdate, Any]


def train_alone(training: Training) -> Any:
    """Run one client's ``training`` in the loop; its reply."""
    try:
        job = next(training)
    except StopIteration as done:  # it needed no training (e.g. only a noise share)
        return done.value
    return _resume(training, _outcome(job.run))


def train_together(trainings: Sequence[Training]) -> list[Any]:
    """Run several clients' ``trainings``, vectorising those that can be: each one's reply,
    or the exception it raised (one client's failure is its own)."""
    outcomes: list[Any] = [None] * len(trainings)
    jobs: dict[int, LocalTraining] = {}
    for index, training in enumerate(trainings):
        try:
            jobs[index] = next(training)
        except StopIteration as done:
            outcomes[index] = done.value
        except Exception as err:  # noqa: BLE001 - reported for this client alone
            outcomes[index] = err
    results: dict[int, PrivateUpdate | Exception] = {}
    for group in _cohorts(jobs):
        if len(group) > 1:
            first = jobs[group[0]]
            load_weights(first.model, first.weights)
            updates = _outcome(lambda: train_cohort(
                first.model, first.rule, [CohortClient(jobs[i].dataset, jobs[i].generator, jobs[i].instructions,
                                                       jobs[i].noise_stream) for i in group],
                steps=first.steps, lr=first.lr, batch_size=first.batch_size, weight_decay=first.weight_decay,
                grad_clip=first.grad_clip,
            ))  # fmt: skip
            if not isinstance(updates, Exception):
                results.update(zip(group, updates))
                continue
        # Alone, or a cohort that failed: each client in the loop, each with its own outcome.
        results.update((index, _outcome(jobs[index].run)) for index in group)
    for index, result in results.items():
        outcomes[index] = _outcome(lambda: _resume(trainings[index], result))
    return outcomes


def vectorisable(job: LocalTraining) -> bool:
    """Whether ``job`` can train in a vectorised cohort: a rule with a functional form, no
    sample-level DP (Opacus's per-sample hooks act on the module, client by client), no
    multi-precision training (its quantised forwards swap the module's weights in place)."""
    return job.local_dp is None and not job.train_bit_widths and type(job.rule).has_functional_form()


def _cohorts(jobs: dict[int, LocalTraining]) -> list[list[int]]:
    """The jobs' indices in groups that train as one cohort (a group of one trains alone)."""
    groups: list[list[int]] = []
    for index, job in jobs.items():
        group = next((g for g in groups if vectorisable(job) and _same_start(jobs[g[0]], job)), None)
        if group is None:
            groups.append([index])
        else:
            group.append(index)
    return groups


def _same_start(a: LocalTraining, b: LocalTraining) -> bool:
    """Whether ``b`` trains the same model from the same weights with the same rule, config,
    records and hyper-parameters as ``a`` (by value: each client reads its own copy)."""
    hyper = ("steps", "lr", "batch_size", "weight_decay", "grad_clip")
    return (
        vectorisable(a) and a.model is b.model and type(a.rule) is type(b.rule)
        and all(getattr(a, key) == getattr(b, key) for key in hyper)
        and dict(a.rule.config) == dict(b.rule.config) and a.rule.records.keys() == b.rule.records.keys()
        and _equal(a.weights, b.weights) and all(_equal(a.rule.records[k], b.rule.records[k]) for k in a.rule.records)
    )  # fmt: skip


def _equal(a: Tensors, b: Tensors) -> bool:
    if isinstance(a, FlatTensors) and isinstance(b, FlatTensors) and a.layout == b.layout:
        return torch.equal(a.vector, b.vector)  # one comparison, not one per tensor
    return a.keys() == b.keys() and all(a[name] is b[name] or torch.equal(a[name], b[name]) for name in a)


def _outcome(compute: Callable[[], Any]) -> Any:
    try:
        return compute()
    except Exception as err:  # noqa: BLE001 - the caller hands it to the client it belongs to
        return err


def _resume(training: Training, result: PrivateUpdate | Exception) -> Any:
    """Send the training ``result`` (or throw its exception) into ``training``; its reply."""
    try:
        if isinstance(result, Exception):
            training.throw(result)
        else:
            training.send(result)
    except StopIteration as done:
        return done.value
    raise RuntimeError("a client's training yielded more than once")


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
    sgd = LocalSGD(steps, lr, batch_size, weight_decay, grad_clip)
    model.train()
    state_layout, state = model_state(model)
    layout = Layout(dict(model.named_parameters()))
    start = layout.flatten({name: state[name] for name in layout.shapes})
    public = public_vector(rule, state_layout, steps, lr)  # the same for every client of the cohort
    example = clients[0].dataset[0][0]
    chunk = chunk_size(model, tuple(example.shape), batch_size)
    updates: list[PrivateUpdate] = []
    for first in range(0, len(clients), chunk):
        members = clients[first : first + chunk]
        params, losses = _train_chunk(model, rule, members, sgd)
        deltas = params.neg_().add_(start)  # Δ = x − y for every client, in place
        if state_layout.shapes != layout.shapes:
            # Buffers do not train (dpfl's models have no BatchNorm): their Δ is zero, as in the loop.
            named = layout.views(deltas)
            deltas = state_layout.flatten({name: named[name] if name in named else t.expand(len(members), *t.shape) * 0
                                           for name, t in state.items()})  # fmt: skip
        updates.extend(privatise_local_updates(deltas, state_layout, public, [c.instructions for c in members],
                                               [c.noise_stream for c in members], losses, steps))  # fmt: skip
    return updates


@dataclass(frozen=True)
class LocalSGD:
    """What every client of a cohort does alike: ``steps`` plain SGD steps on its batches."""

    steps: int
    lr: float
    batch_size: int
    weight_decay: float
    grad_clip: float


def _train_chunk(
    model: nn.Module, rule: LocalUpdateRule, clients: Sequence[CohortClient], sgd: LocalSGD
) -> tuple[torch.Tensor, list[float]]:
    """The clients' parameters after ``steps`` steps, one row each of a [clients, d] matrix
    (the model's parameters flattened in order), and their mean losses.

    Only the gradient (and a rule's own direction) runs under ``vmap``: the stability clip
    and the SGD step act on the whole matrix at once, a few operations for every client
    and parameter, where under ``vmap`` each would be one operation per named tensor.
    """
    device = next(model.parameters()).device
    buffers = {name: t.detach() for name, t in model.named_buffers()}
    count = len(clients)

    def mean_loss(params: Tensors, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, {**params, **buffers}, (inputs,))
        return (nn.functional.cross_entropy(logits, targets, reduction="none") * weights).sum()

    gradients = vmap(lambda params, *batch: rule.functional_gradient(mean_loss, params, batch), randomness="error")
    own_direction = defining_class(type(rule), "functional_direction") is not LocalUpdateRule
    directions = vmap(rule.functional_direction, randomness="error")
    layout = Layout(dict(model.named_parameters()))
    params = layout.flatten(dict(model.named_parameters())).detach().expand(count, -1).clone()
    streams = [cycle_batches(client.dataset, sgd.batch_size, client.generator) for client in clients]
    total = torch.zeros(count, dtype=torch.float64)
    # Attention as matrix products, which vmap batches; its fused kernels have no batching
    # rule and would run client by client.
    with sdpa_kernel(SDPBackend.MATH):
        for _ in range(sgd.steps):
            inputs, targets, weights = (t.to(device) for t in _stacked_batches(streams))
            grads, loss = gradients(layout.views(params), inputs, targets, weights)
            flat = layout.flatten(grads)
            # The platform's stability clip: clip_grad_norm_'s arithmetic on each client's norm.
            norms = torch.linalg.vector_norm(flat, dim=1, keepdim=True)
            flat *= torch.clamp(sgd.grad_clip / (norms + CLIP_EPSILON), max=1.0)
            if own_direction:
                flat = layout.flatten(directions(layout.views(flat)))
            # torch.optim.SGD without momentum, in place as it steps: d += weight_decay·p; p −= lr·d.
            params.add_(flat.add_(params, alpha=sgd.weight_decay), alpha=-sgd.lr)
            total += loss.detach().cpu().double()
    return params, (total / sgd.steps).tolist()


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
    """Bytes of the outputs of every module in a forward pass of one example (measured once
    per model and shape)."""
    measured = _activation_bytes.setdefault(model, {})
    if example_shape not in measured:
        measured[example_shape] = _measure_activation_bytes(model, example_shape)
    return measured[example_shape]


# model -> example shape -> bytes; a model that is no longer used is forgotten.
_activation_bytes: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], int]] = weakref.WeakKeyDictionary()


def _measure_activation_bytes(model: nn.Module, example_shape: tuple[int, ...]) -> int:
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
