"""Many updates at once: a cohort's privatisation and the server's re-clip and sum as
[clients, d] matrices (one float64 norm per row), and flat updates carried through Flower
records as one vector, give each client exactly what the per-client path gives it, with
--reproducible-noise, to 1e-6; one client's broken update is refused for that client alone."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from flwr.app import Array, ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st

import dpfl.privacy.clipping as clipping
from dpfl.privacy.accountants import create_accountant
from dpfl.privacy.clipping import clip_rows, clip_vector
from dpfl.flat import FlatTensors, Layout
from dpfl.privacy.mechanism import (
    ClientInstructions,
    ClientLevelMechanism,
    MechanismParams,
    privatise_rows,
    privatise_update,
)
from dpfl.privacy.randomness import Randomness
from dpfl.records import record_tensors, tensor_record
from tests.test_flat_updates import SEED, assert_same, model_shaped, reference_privatise, reference_release


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.sampled_from([0.0, 1e-3, 0.5, 3.0, math.nan, math.inf]), min_size=1, max_size=7),
    st.floats(0.05, 2.0),
    st.sampled_from([torch.float32, torch.float64]),
)
def test_clipping_rows_at_once_equals_clipping_each_row_alone(scales, clip_norm, dtype):
    generator = torch.Generator().manual_seed(len(scales))
    matrix = torch.randn(len(scales), 97, generator=generator, dtype=dtype)
    for row, scale in enumerate(scales):
        matrix[row] *= scale if math.isfinite(scale) else 1.0
        if not math.isfinite(scale):
            matrix[row, row] = scale
    clipped, norms = clip_rows(matrix, clip_norm)
    for row in range(len(scales)):
        alone, norm = clip_vector(matrix[row].clone(), clip_norm)
        torch.testing.assert_close(clipped[row], alone, rtol=0, atol=1e-6)
        assert clipped[row].dtype == dtype
        assert float(torch.linalg.vector_norm(clipped[row].double())) <= clip_norm  # exactly, as held
        assert norm == pytest.approx(float(norms[row]), rel=1e-12, nan_ok=True)


def test_rows_clipped_in_several_blocks_equal_those_clipped_in_one(monkeypatch):
    matrix = torch.randn(9, 50) * torch.tensor([0.01, 5.0] * 4 + [math.nan]).unsqueeze(1)
    whole, whole_norms = clip_rows(matrix, 1.0)
    monkeypatch.setattr(clipping, "ROW_BLOCK_BYTES", 2 * 50 * 8)  # two rows a block
    blocked, blocked_norms = clip_rows(matrix, 1.0)
    assert torch.equal(whole, blocked) and torch.equal(whole_norms.isnan(), blocked_norms.isnan())
    assert torch.equal(whole_norms.nan_to_num(), blocked_norms.nan_to_num()) and not whole[8].any()


def test_a_cohorts_privatisation_equals_each_clients_own():
    """Several clients, two kinds of instructions (client-placement shares of two sizes,
    one client without clipping), one broken client: each row as that client alone."""
    privates = [model_shaped(scale, seed=20 + i) for i, scale in enumerate([0.0005, 0.3, 2.0, 0.01, 1.0])]
    privates[3]["fc.bias"][0] = math.nan
    layout = Layout(privates[0])
    kinds = [ClientInstructions.flat(0.2, 0.01), ClientInstructions.flat(0.2, 0.003), ClientInstructions.flat(0.0)]
    instructions = [kinds[0], kinds[1], kinds[0], kinds[0], kinds[2]]
    streams = [Randomness(SEED).stream("client-noise", 1, client) for client in range(len(privates))]
    rows = privatise_rows(torch.stack([layout.flatten(p) for p in privates]), layout, instructions, streams)
    for client, (private, (update, norm)) in enumerate(zip(privates, rows)):
        reference, reference_norm = reference_privatise(
            private, instructions[client], Randomness(SEED).stream("client-noise", 1, client))
        assert_same(dict(update), reference)
        assert norm == pytest.approx(reference_norm, rel=1e-12, nan_ok=True)
        alone, alone_norm = privatise_update(
            private, instructions[client], Randomness(SEED).stream("client-noise", 1, client))
        assert torch.equal(layout.flatten(update), layout.flatten(alone))


@pytest.mark.parametrize("placement", ["server", "client"])
def test_the_server_screens_and_sums_flat_replies_as_it_does_named_ones(placement):
    params = MechanismParams(noise_multiplier=1.3, clip_norm=0.2, sample_rate=0.5, num_clients=8, delta=1e-5,
                             noise_placement=placement, reproducible_noise=True)  # fmt: skip
    like = model_shaped(0.0, seed=0)
    layout = Layout(like)
    named = [model_shaped(scale, seed=10 + i) for i, scale in enumerate([0.0005, 0.01, 0.3, 2.0])]
    # Each as it arrives through a record: one vector, read back as one copy.
    flat = [record_tensors(tensor_record(FlatTensors(layout, layout.flatten(update)))) for update in named]
    assert all(isinstance(update, FlatTensors) for update in flat)
    screened = []
    for updates in (named, flat):
        mechanism = ClientLevelMechanism(params, create_accountant("rdp", 1e-5), Randomness(SEED))
        verdicts = [mechanism.screen(update, layout) for update in updates]
        assert verdicts == [mechanism.screen(update, like) for update in updates]
        kept = [update for update, verdict in zip(updates, verdicts) if verdict is None]
        screened.append((verdicts, mechanism.release(kept, like, server_round=2), [mechanism.is_clipped(u) for u in kept]))
    assert screened[0][0] == screened[1][0] and screened[0][2] == screened[1][2]
    assert_same(screened[1][1], screened[0][1])
    kept = [update for update, verdict in zip(named, screened[0][0]) if verdict is None]
    reference = reference_release(
        kept, like, clip_norm=0.2, reclip=placement == "server", std=params.server_noise_std(len(kept)),
        stream=Randomness(SEED).stream("server-noise", 2), denominator=params.expected_clients,
    )  # fmt: skip
    assert_same(screened[1][1], reference)


def test_a_broken_flat_reply_is_refused_alone():
    params = MechanismParams(noise_multiplier=1.0, clip_norm=0.2, sample_rate=0.5, num_clients=8, delta=1e-5,
                             noise_placement="client", reproducible_noise=True)  # fmt: skip
    mechanism = ClientLevelMechanism(params, create_accountant("rdp", 1e-5), Randomness(SEED))
    like = model_shaped(0.0, seed=0)
    layout = Layout(like)
    good = FlatTensors(layout, layout.flatten(model_shaped(0.001, seed=3)))
    nan = FlatTensors(layout, good.vector.clone())
    nan.vector[5] = math.nan
    huge = FlatTensors(layout, good.vector * 1e4)
    # A flat update of another model (one tensor's shape differs) is checked name by name.
    other = dict(like)
    other["fc.bias"] = torch.zeros(3)
    other_layout = Layout(other)
    misshapen = FlatTensors(other_layout, torch.zeros(other_layout.size))
    verdicts = [mechanism.screen(update, layout) for update in (good, nan, huge, misshapen)]
    assert verdicts[0] is None
    assert verdicts[1] == "the update has NaN or Inf values"
    assert verdicts[2].startswith("the update's norm") and "implausible" in verdicts[2]
    assert verdicts[3].startswith("tensor 'fc.bias' has shape (3,)")


def test_a_flat_record_is_one_copy_each_way_and_a_changed_one_is_read_array_by_array():
    layout = Layout(model_shaped(0.0, seed=0))
    sent = FlatTensors(layout, layout.flatten(model_shaped(1.0, seed=4)))
    record = tensor_record(sent)
    expected = sent.vector.clone()
    sent.vector.add_(1.0)  # the sender changes its vector after building the record
    read = record_tensors(record)
    assert isinstance(read, FlatTensors) and torch.equal(read.vector, expected)
    read.vector.mul_(0)  # a reader changes what it got
    assert torch.equal(record_tensors(record).vector, expected)
    # Flower's transport gets what Flower's own record of the snapshot would give it.
    assert record.object_id == ArrayRecord(dict(layout.views(expected))).object_id
    # Its arrays made their tensors to give those bytes: still one vector, still the snapshot's.
    assert isinstance(record_tensors(record), FlatTensors) and torch.equal(record_tensors(record).vector, expected)
    # A model's tensors of one dtype are snapshotted as one vector too.
    assert isinstance(record_tensors(tensor_record(dict(layout.views(expected)))), FlatTensors)
    # An array replaced, or given new bytes: no longer one vector, read array by array.
    record["fc.bias"] = Array(torch.ones(layout.shapes["fc.bias"]))
    replaced = record_tensors(record)
    assert not isinstance(replaced, FlatTensors) and torch.equal(replaced["fc.bias"], torch.ones(layout.shapes["fc.bias"]))
    other = tensor_record(FlatTensors(layout, expected.clone()))
    other["conv1.weight"].data = Array(torch.zeros(2)).data
    assert torch.equal(record_tensors(other)["conv1.weight"], torch.zeros(2))
    # To another process (the in-process engine's workers) and back: the same values.
    crossed = record_tensors(pickle.loads(pickle.dumps(tensor_record(FlatTensors(layout, expected.clone())))))
    assert torch.equal(layout.flatten(crossed), expected)


def test_a_flat_updates_norm_is_computed_again_after_any_write_into_it():
    layout = Layout({"a": torch.zeros(2, 2), "b": torch.zeros(3)})
    update = FlatTensors(layout, torch.ones(7))
    assert update.norm() == pytest.approx(math.sqrt(7), rel=1e-15)
    update["b"][0] = 3.0  # through a view
    assert update.norm() == pytest.approx(math.sqrt(15), rel=1e-15)
    update.vector[0] = math.nan  # through the vector
    assert math.isnan(update.norm())
