"""Flat updates: an update clipped, noised, screened, re-clipped and summed as one vector
gives what the per-tensor code gave (a copy of it is kept below as the reference), with
--reproducible-noise, to 1e-6."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpfl.privacy.accountants import create_accountant
from dpfl.flat import Layout
from dpfl.privacy.mechanism import (
    ClientInstructions,
    ClientLevelMechanism,
    MechanismParams,
    noise_share,
    privatise_update,
)
from dpfl.privacy.randomness import Randomness
from dpfl.task.models import build_model

SEED = 11


# --- the per-tensor code, as it was before flat updates (privacy/mechanism.py and
# privacy/clipping.py at 50abb10), kept as the reference ---------------------------------


def reference_norm(tensors):
    norms = [torch.linalg.vector_norm(t.double()) for t in tensors.values()]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def reference_clip(tensors, clip_norm):
    norm = reference_norm(tensors)
    if not math.isfinite(norm):
        return {name: torch.zeros_like(t) for name, t in tensors.items()}, norm
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    while True:
        clipped = {name: (t.double() * scale).to(t.dtype) for name, t in tensors.items()}
        if scale == 1.0 or reference_norm(clipped) <= clip_norm:
            return clipped, norm
        scale *= 1 - 2.0**-22


def reference_noise(tensors, std, stream):
    if std == 0:
        return dict(tensors)
    return {name: (t.double() + stream.gaussian(t.shape, std)).to(t.dtype) for name, t in tensors.items()}


def reference_privatise(private, instructions, stream):
    if instructions.clip_norm > 0:
        clipped, norm = reference_clip(private, instructions.clip_norm)
        std = instructions.client_noise_std
    else:
        clipped, norm, std = dict(private), reference_norm(private), 0.0
    return reference_noise(clipped, std, stream), norm


def reference_release(updates, like, clip_norm, reclip, std, stream, denominator):
    total = {name: torch.zeros(t.shape, dtype=torch.float64) for name, t in like.items()}
    for update in updates:
        if reclip:
            update, _ = reference_clip(update, clip_norm)
        for name, t in update.items():
            total[name] += t.double()
    if std > 0:
        total = {name: t + stream.gaussian(t.shape, std) for name, t in total.items()}
    return {name: (t / denominator).to(like[name].dtype) for name, t in total.items()}


# --- tests ------------------------------------------------------------------------------


def model_shaped(scale: float, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors shaped as the default ResNet-10's state dict (some sixty tensors)."""
    generator = torch.Generator().manual_seed(seed)
    like = build_model("resnet10", 10, 1, 8, 8).state_dict()
    return {name: scale * torch.randn(t.shape, generator=generator) for name, t in like.items()}


def assert_same(flat: dict, reference: dict) -> None:
    assert list(flat) == list(reference)
    for name in reference:
        assert flat[name].dtype == reference[name].dtype and flat[name].shape == reference[name].shape
        torch.testing.assert_close(flat[name], reference[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "scale,clip,share",
    [(0.01, 0.5, 0.0), (0.01, 0.5, 0.003), (1.0, 0.2, 0.0), (1.0, 0.2, 0.01), (1.0, 0.0, 0.0)],
    ids=["unclipped", "unclipped-with-share", "clipped", "clipped-with-share", "no-dp"],
)
def test_a_clients_flat_update_equals_the_per_tensor_one(scale, clip, share):
    private = model_shaped(scale, seed=1)
    instructions = ClientInstructions.flat(clip, share)
    flat, norm = privatise_update(private, instructions, Randomness(SEED).stream("client-noise", 1, 3))
    reference, reference_norm_ = reference_privatise(private, instructions, Randomness(SEED).stream("client-noise", 1, 3))
    assert_same(flat, reference)
    assert norm == pytest.approx(reference_norm_, rel=1e-12)
    # Named views of one contiguous vector, not copies.
    storage = {t.untyped_storage().data_ptr() for t in flat.values()}
    assert len(storage) == 1


def test_a_non_finite_update_and_a_noise_share_equal_the_per_tensor_ones():
    broken = model_shaped(1.0, seed=2)
    broken["fc.bias"][0] = math.nan
    instructions = ClientInstructions.flat(0.2, 0.01)
    flat, norm = privatise_update(broken, instructions, Randomness(SEED).stream("c"))
    reference, _ = reference_privatise(broken, instructions, Randomness(SEED).stream("c"))
    assert_same(flat, reference)
    assert math.isnan(norm)
    like = model_shaped(0.0, seed=0)
    zeros = {name: torch.zeros_like(t) for name, t in like.items()}
    assert_same(noise_share(like, instructions, Randomness(SEED).stream("s")),
                reference_noise(zeros, 0.01, Randomness(SEED).stream("s")))  # fmt: skip


@pytest.mark.parametrize("placement", ["server", "client"])
def test_the_servers_flat_sum_equals_the_per_tensor_one(placement):
    params = MechanismParams(noise_multiplier=1.3, clip_norm=0.2, sample_rate=0.5, num_clients=8, delta=1e-5,
                             noise_placement=placement, reproducible_noise=True)  # fmt: skip
    mechanism = ClientLevelMechanism(params, create_accountant("rdp", 1e-5), Randomness(SEED))
    like = model_shaped(0.0, seed=0)
    # Some within C, some far beyond it (re-clipped by the server under server placement;
    # under client placement the screen would drop them, the sum is the same arithmetic).
    updates = [model_shaped(scale, seed=10 + i) for i, scale in enumerate([0.0005, 0.01, 0.3, 2.0])]
    assert [mechanism.screen(update, like) is None for update in updates] == [True, True] + [placement == "server"] * 2
    released = mechanism.release(updates, like, server_round=2)
    reference = reference_release(
        updates, like, clip_norm=0.2, reclip=placement == "server", std=params.server_noise_std(len(updates)),
        stream=Randomness(SEED).stream("server-noise", 2), denominator=params.expected_clients,
    )  # fmt: skip
    assert_same(released, reference)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=8), st.floats(0.1, 5.0))
def test_a_flat_noise_draw_is_the_named_tensors_draws_bit_for_bit(sizes, std):
    flat = Randomness(SEED).stream("n").gaussian_segments(sizes, std)
    one_by_one = Randomness(SEED).stream("n")
    expected = [one_by_one.gaussian((size,), std) for size in sizes]
    assert torch.equal(flat, torch.cat(expected) if expected else torch.zeros(0, dtype=torch.float64))


def test_a_layout_flattens_and_gives_back_views_in_each_tensors_dtype():
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor(7.0), "c": torch.ones(2, 2)}
    layout = Layout(tensors)
    vector = layout.flatten(tensors)
    assert vector.tolist() == [0, 1, 2, 3, 4, 5, 7, 1, 1, 1, 1] and layout.dtype == torch.float32
    views = layout.views(vector)
    views["b"].fill_(-1)  # a view: the vector changes with it
    assert vector[6] == -1 and views["a"].shape == (2, 3) and views["b"].shape == ()
    # A leading batch axis (a cohort's clients) is kept.
    batched = layout.flatten({name: torch.stack([t, 2 * t]) for name, t in tensors.items()})
    assert batched.shape == (2, 11) and layout.views(batched)["a"].shape == (2, 2, 3)
    # Mixed dtypes: float64 in the vector, each part rounded through its own dtype on the way back.
    mixed = Layout({"x": torch.zeros(2, dtype=torch.float16), "y": torch.zeros(1, dtype=torch.float64)})
    back = mixed.unflatten(torch.tensor([1 / 3, 1 / 3, 1 / 3], dtype=torch.float64))
    assert back["x"].dtype == torch.float16 and back["y"].dtype == torch.float64
    assert float(back["x"][0]) == float(torch.tensor(1 / 3).half()) and float(back["y"][0]) == 1 / 3
