"""Sample-level DP inside each client (``local-dp``): Opacus DP-SGD with a cumulative ε.

Each local step's per-sample gradients are clipped to ``local-clip`` and noised
with ``local-noise-multiplier`` by Opacus's ``DPOptimizer``, on Poisson-sampled
local batches (rate 1/⌈n/b⌉, the rate its accountant is given). Opacus draws that
noise and that sample from torch generators (its secure mode needs
``torchcsprng``, which has no build for torch 2.x), so both are redirected here to
the secure streams of :mod:`dpfl.privacy.randomness`: the noise through
:class:`SecureNoiseDPOptimizer`, the batches through :class:`SecurePoissonSampler`. The strategy's direction and the platform's stability clip then act on the
privatised gradient only, as post-processing.

Flower's Opacus example builds a new ``PrivacyEngine`` every round and so reports
a per-round ε. Here the engine's RDP accountant is saved in the node's persistent
``context.state`` after each round and restored before the next, so the ε a client
reports composes every step it has taken in the run.

What a client sends is then covered at the sample level, as it derives from the
privatised steps, except the reported ε itself, which depends on the data size
through ⌈n/b⌉; the client withholds its raw training loss and exact data size.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from flwr.app import ConfigRecord, RecordDict
from opacus import PrivacyEngine
from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.models.resnet import BasicBlock

from dpfl.errors import UsageError
from dpfl.privacy.clipping import global_l2_norm
from dpfl.privacy.randomness import Randomness, RandomStream

STATE_KEY = "local-dp-accountant"
# Relative mismatch above which the gradient is not the mean of the per-sample gradients.
PER_SAMPLE_TOLERANCE = 1e-4


class LocalDP:
    """One client's DP-SGD for one round, with the accountant of all its rounds."""

    def __init__(
        self,
        noise_multiplier: float,
        clip: float,
        delta: float,
        state: RecordDict | None = None,
        randomness: Randomness | None = None,
        label: tuple[int, ...] = (),
    ) -> None:
        self.noise_multiplier = noise_multiplier
        self.clip = clip
        self.delta = delta
        self.randomness = randomness or Randomness()
        self.label = label
        with _quiet_opacus(self.randomness):
            self.engine = PrivacyEngine(accountant="rdp")
        if state is not None and STATE_KEY in state:
            saved = json.loads(str(state[STATE_KEY]["accountant"]))
            saved["history"] = [tuple(entry) for entry in saved["history"]]
            self.engine.accountant.load_state_dict(saved)

    def save(self, state: RecordDict) -> None:
        """Keep the accountant in the node's persistent state for the next round."""
        state[STATE_KEY] = ConfigRecord({"accountant": json.dumps(self.engine.accountant.state_dict())})

    def epsilon(self) -> float:
        """The client's sample-level ε over all its steps so far, at ``delta``."""
        return float(self.engine.accountant.get_epsilon(self.delta))

    @contextmanager
    def training(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, dataset: Dataset, batch_size: int
    ) -> Iterator[tuple[DPOptimizer, Iterator]]:
        """Per-sample gradient hooks on ``model`` itself (its parameter names unchanged, as
        a strategy's rule looks tensors up by name), the DP optimizer around
        ``optimizer``, and endless Poisson batches; the hooks are removed afterwards."""
        _make_hook_safe(model)
        sampler = SecurePoissonSampler(
            num_samples=len(dataset), sample_rate=1 / math.ceil(len(dataset) / batch_size),
            stream=self.randomness.stream("local-dp-sampling", *self.label),
        )  # fmt: skip
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=_collate_with_empty(dataset))
        with _quiet_opacus(self.randomness):
            # Opacus attaches the per-sample gradient hooks and checks the model; its
            # optimizer is replaced by one whose noise comes from a secure stream.
            hooks, _, _ = self.engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.clip, poisson_sampling=False, wrap_model=False,
            )  # fmt: skip
        dp_optimizer = SecureNoiseDPOptimizer(
            optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=self.clip,
            expected_batch_size=int(len(dataset) * sampler.sample_rate),
            stream=self.randomness.stream("local-dp-noise", *self.label),
        )  # fmt: skip
        dp_optimizer.attach_step_hook(self.engine.accountant.get_optimizer_hook_fn(sample_rate=sampler.sample_rate))
        # Opacus would stop a second backward pass in a step with an obscure error;
        # privatise_gradient refuses it with a clear one instead.
        hooks.allow_grad_accumulation()
        try:
            with _quiet_opacus(self.randomness):
                # Every pass over the loader draws fresh independent Poisson batches.
                yield dp_optimizer, itertools.chain.from_iterable(itertools.repeat(loader))
        finally:
            hooks.cleanup()


class SecureNoiseDPOptimizer(DPOptimizer):
    """Opacus's DPOptimizer with its Gaussian noise drawn from a secure stream, in float64."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, stream: RandomStream, **kwargs) -> None:
        super().__init__(optimizer, **kwargs)
        self.stream = stream

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = self.stream.gaussian(p.summed_grad.shape, std)
            # Added on the CPU in float64 (an accelerator may have no float64), then moved back.
            summed = p.summed_grad.cpu().double()
            p.grad = (summed + noise).to(p.summed_grad.dtype).to(p.summed_grad.device).view_as(p)
            _mark_as_processed(p.summed_grad)


class SecurePoissonSampler(UniformWithReplacementSampler):
    """Opacus's Poisson batch sampler with its coin flips drawn from a secure stream."""

    def __init__(self, *, num_samples: int, sample_rate: float, stream: RandomStream) -> None:
        super().__init__(num_samples=num_samples, sample_rate=sample_rate)
        self.stream = stream

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield self.stream.bernoulli(self.num_samples, self.sample_rate).nonzero()[0].tolist()


def _collate_with_empty(dataset: Dataset):
    """Opacus's collate that turns an empty Poisson batch into empty tensors of the right shapes."""
    first = dataset[0]
    return wrap_collate_with_empty(
        collate_fn=default_collate,
        sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
        dtypes=[dtype_safe(x) for x in first],
    )


def _make_hook_safe(model: nn.Module) -> None:
    """Compute the same function without modifying a layer's output in place.

    Autograd forbids in-place ops on the outputs of the backward hooks through which
    Opacus captures per-sample gradients: in-place activations, and torchvision's
    residual ``out += identity``.
    """
    for module in model.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
        if isinstance(module, BasicBlock):
            module.forward = functools.partial(_basic_block_forward, module)


def _basic_block_forward(block: BasicBlock, x: torch.Tensor) -> torch.Tensor:
    # torchvision's BasicBlock.forward, with the shortcut added out of place.
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    return block.relu(out + identity)


@contextmanager
def _quiet_opacus(randomness: Randomness) -> Iterator[None]:
    """Silence notices that every client would repeat every round."""
    with warnings.catch_warnings():
        if not randomness.reproducible:
            # Opacus's own generators draw nothing here: its noise and its sample come
            # from secure streams (see the module doc). Seeded runs keep the warning.
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
        # The input images need no gradient, so torch notes that the first layer's
        # hook fires for its output only: all Opacus needs.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        yield


def privatise_gradient(model: nn.Module, dp_optimizer: DPOptimizer) -> None:
    """Replace ``p.grad`` by the clipped, noised mean of the per-sample gradients.

    DP-SGD covers only a gradient that is the mean of per-sample gradients from one
    pass. A rule that adds a term outside the per-sample loss (a proximal term) or
    takes several passes per step (SAM's ascent from the raw batch gradient) would
    have that part silently dropped or the data used unprivatised, so it is refused.
    """
    samples = [(p.grad, p.grad_sample) for p in model.parameters() if getattr(p, "grad_sample", None) is not None]
    if any(isinstance(sample, list) for _, sample in samples) or _has_extra_term(samples):
        raise UsageError(
            "local-dp: the strategy's local gradient is not the mean of per-sample gradients of one "
            "pass (an extra loss term or several passes per step), which DP-SGD cannot privatise"
        )
    dp_optimizer.pre_step()


def _has_extra_term(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    if not samples or not len(samples[0][1]):  # an empty Poisson batch has nothing to compare
        return False
    mismatch = global_l2_norm(grad - sample.mean(0) for grad, sample in samples)
    return mismatch > PER_SAMPLE_TOLERANCE * global_l2_norm(grad for grad, _ in samples) + 1e-12
