"""The guarantee as the running code gives it: what an adversary can see, regenerate or break.

Runs go through the real ServerApp and ClientApp on the in-process engine (the
same objects as under Flower), so each test exercises the path users run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

from dpfl.client import app as client_module
from dpfl.task import data as data_module
from dpfl.client.data import load_client_partition
from dpfl.privacy.accountants import create_accountant
from dpfl.privacy.calibration import calibrate_noise_multiplier
from dpfl.privacy.clipping import flat_clip
from dpfl.privacy.mechanism import ClientLevelMechanism, MechanismParams
from dpfl.privacy.randomness import RandomStream, Randomness, largest_standard_normal
from dpfl.server.app import app as server_app
from dpfl.engines.inprocess import in_process_grid, run_in_process
from dpfl.server.public_records import PUBLIC_ROUND_KEYS, PUBLIC_SUMMARY_KEYS
from dpfl.server.recorder import PRIVATE_DIAGNOSTICS_FILE
from dpfl.settings import RunSettings
from dpfl.strategies import get_strategy_class
from dpfl.task.checkpoint import load_checkpoint

TINY = dict(model="cnn", model_width=2, num_clients=8, sample_rate=0.5, num_server_rounds=2, max_epsilon=0.0,
            target_epsilon=0.0, noise_multiplier=1.0)  # fmt: skip
RAW_STATISTICS = {"sampled", "update-norm-mean", "update-norm-max", "clipped-fraction", "train-loss",
                  "local-epsilon-max", "num-examples", "accepted", "dropped"}  # fmt: skip


def run(tmp_path: Path, name: str, client_app: ClientApp = client_module.app, **overrides) -> Path:
    settings = RunSettings(**{**TINY, **overrides, "out_dir": str(tmp_path / name)})
    run_in_process(server_app, client_app, settings.to_run_config(), settings.num_clients)
    return tmp_path / name


def rows(out: Path, file: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / file).read_text().splitlines()]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "final_model.pt").state_dict


# --- randomness ----------------------------------------------------------------------


def test_same_seed_runs_release_different_noise_unless_noise_is_reproducible(tmp_path):
    first, second = (final_weights(run(tmp_path, name)) for name in ("a", "b"))
    assert any(not torch.equal(first[k], second[k]) for k in first)
    repro = [run(tmp_path, name, reproducible_noise=True) for name in ("c", "d")]
    weights = [final_weights(out) for out in repro]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    for out in repro:  # labelled not valid everywhere
        assert all(row["epsilon"] is None for row in rows(out))
        assert json.loads((out / "summary.json").read_text())["epsilon-valid"] is False
        assert json.loads((out / "config.json").read_text())["epsilon-valid"] is False


def attacker_noise_candidates(seed: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """What an adversary who read config.json would try: seeded torch and numpy generators."""
    candidates = []
    for offset in range(-3, 4):
        for derived in (abs(seed + offset), hash((seed, offset)) % 2**63, abs(hash((seed, 1, offset))) % 2**32):
            candidates.append(torch.randn(shape, generator=torch.Generator().manual_seed(derived)).double())
            candidates.append(torch.from_numpy(np.random.default_rng(derived).standard_normal(shape)))
    return candidates


def test_the_noise_cannot_be_regenerated_from_the_recorded_seed():
    seed, sigma, clip, clients = 0, 1.0, 1.0, 4
    params = MechanismParams(noise_multiplier=sigma, clip_norm=clip, sample_rate=1.0, num_clients=clients, delta=1e-5)
    mech = ClientLevelMechanism(params, create_accountant("rdp", 1e-5), Randomness())
    like = {"v": torch.zeros(50_000)}
    updates = [{"v": torch.randn(50_000, generator=torch.Generator().manual_seed(i))} for i in range(clients)]
    released = mech.release(updates, like, server_round=1)["v"].double() * clients
    true_sum = sum(flat_clip(u, clip)[0]["v"].double() for u in updates)
    noise = released - true_sum
    assert float(noise.norm()) == pytest.approx(sigma * clip * math.sqrt(50_000), rel=0.02)
    for candidate in attacker_noise_candidates(seed, (50_000,)):
        residual = released - sigma * clip * candidate - true_sum
        # Regenerated noise would leave ~0; independent noise leaves about √2 times its norm.
        assert float(residual.norm()) > 1.2 * float(noise.norm())


def test_the_gaussian_sampler_is_float64_with_the_right_moments():
    stream = Randomness().stream("moments")
    draws = stream.gaussian((400_000,), 0.3)
    assert draws.dtype == torch.float64
    assert abs(float(draws.mean())) < 5 * 0.3 / math.sqrt(400_000)
    assert float(draws.std()) == pytest.approx(0.3, rel=0.005)
    uniforms = stream.uniform(1_000_000)  # on the 53-bit grid, not float32's 24 bits
    assert np.all(uniforms * 2.0**53 == np.floor(uniforms * 2.0**53))
    assert len(np.unique(uniforms)) > 999_000


def test_the_sampler_reaches_beyond_eight_sigma():
    # The smallest uniform the construction can produce is 2⁻⁵³: feed it the keystream
    # word that maps there and read the draw Box–Muller makes of it.
    stream = RandomStream(bytes(32))
    stream._words = lambda count: np.zeros(count, dtype="<u8")
    assert stream.uniform_open_closed(1)[0] == 2.0**-53
    z = stream.standard_normal(2)
    assert z[0] == pytest.approx(largest_standard_normal()) and largest_standard_normal() > 8.5
    # float32 torch.randn is bounded near 5.77σ (24-bit uniforms): the reason for all this.
    assert math.sqrt(-2 * math.log(2.0**-24)) < 5.8


def test_per_round_message_counts_follow_the_binomial_including_empty_rounds():
    settings = RunSettings(model="cnn", model_width=2, num_clients=20, sample_rate=0.1)
    strategy = get_strategy_class("dp-fedavg").from_settings(settings, noise_multiplier=1.0, local_steps=1)
    grid = in_process_grid(client_module.app, settings.to_run_config(), settings.num_clients)
    arrays = ArrayRecord({"w": torch.zeros(2)})
    counts = np.array([len(list(strategy.configure_train(r, arrays, ConfigRecord(), grid))) for r in range(1, 601)])
    n, q = 20, 0.1
    assert counts.mean() == pytest.approx(n * q, abs=4 * math.sqrt(n * q * (1 - q) / 600))
    assert counts.var() == pytest.approx(n * q * (1 - q), rel=0.2)
    empty = (1 - q) ** n  # 12% of rounds sample nobody
    assert np.mean(counts == 0) == pytest.approx(empty, abs=4 * math.sqrt(empty * (1 - empty) / 600))


# --- what the client sends -------------------------------------------------------------


@pytest.mark.parametrize("sample_rate", [1.0, 1e-9], ids=["all-sampled", "none-sampled"])
def test_clients_add_their_noise_share_on_the_real_client_path(sample_rate):
    # A learning rate of 1e-12 makes the trained update ~0: what arrives is the share,
    # from a sampled client's update path or a non-sampled client's noise-only path.
    settings = RunSettings(model="cnn", model_width=32, num_clients=4, sample_rate=sample_rate, lr=1e-12,
                           noise_placement="client", strategy="dp-fedavg")  # fmt: skip
    strategy = get_strategy_class("dp-fedavg").from_settings(settings, noise_multiplier=2.0, local_steps=1)
    grid = in_process_grid(client_module.app, settings.to_run_config(), settings.num_clients)
    weights = load_client_partition(settings, {"partition-id": 0, "num-partitions": 4}).spec.build().state_dict()
    messages = list(strategy.configure_train(1, ArrayRecord(weights), ConfigRecord(), grid))
    assert len(messages) == 4  # every client adds a share, sampled or not
    assert {bool(m.content["config"]["contribute-update"]) for m in messages} == {sample_rate == 1.0}
    expected = 2.0 * settings.clip_norm / math.sqrt(4)
    for reply in grid.send_and_receive(messages):
        update = torch.cat([t.flatten() for t in reply.content["update"].to_torch_state_dict().values()]).double()
        assert update.numel() > 15_000
        assert float(update.std()) == pytest.approx(expected, rel=0.03)


# --- hostile and broken replies ----------------------------------------------------------


def tampering_client_app(tamper: dict[int, Callable[[Message, Message], Message]]) -> ClientApp:
    """The real ClientApp, except that some partitions replace their reply."""
    hostile = ClientApp()

    @hostile.train()
    def train(msg: Message, context) -> Message:
        partition = int(context.node_config["partition-id"])
        if partition in tamper and tamper[partition] is RuntimeError:
            raise RuntimeError("this client crashed")
        reply = client_module.train(msg, context)
        return tamper[partition](msg, reply) if partition in tamper else reply

    return hostile


def replace_update(change: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]):
    def tamper(msg: Message, reply: Message) -> Message:
        update = change(reply.content["update"].to_torch_state_dict())
        return Message(RecordDict({"update": ArrayRecord(update)}), reply_to=msg)

    return tamper


def first_tensor(update, change):
    name = next(iter(update))
    return {**update, name: change(update[name])}


HOSTILE = {
    0: replace_update(lambda u: first_tensor(u, lambda t: t.fill_(math.nan))),
    1: replace_update(lambda u: first_tensor(u, lambda t: t.fill_(math.inf))),
    2: replace_update(lambda u: first_tensor(u, lambda t: t[..., :1].contiguous())),
    3: replace_update(lambda u: {k: t.double() for k, t in u.items()}),
    4: lambda msg, reply: Message(RecordDict({"something": ConfigRecord({"a": 1})}), reply_to=msg),
    5: RuntimeError,
    6: replace_update(lambda u: {k: 1e6 * torch.ones_like(t) for k, t in u.items()}),
}


@pytest.mark.parametrize("placement", ["server", "client"])
def test_hostile_replies_are_dropped_with_reasons_and_the_model_stays_finite(tmp_path, placement):
    out = run(tmp_path, placement, tampering_client_app(HOSTILE), sample_rate=1.0, num_server_rounds=3,
              noise_placement=placement)  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outcome"] == "completed" and summary["rounds-completed"] == 3
    assert all(torch.isfinite(t).all() for t in final_weights(out).values())
    diagnostics = rows(out, PRIVATE_DIAGNOSTICS_FILE)
    assert len(diagnostics) == 3
    for round_facts in diagnostics:
        reasons = " | ".join(round_facts["drop-reasons"])
        for expected in ("NaN or Inf", "has shape", "dtype torch.float64", "no readable 'update' record",
                         "the client failed"):  # fmt: skip
            assert expected in reasons
        # A huge update is re-clipped by the server, or implausible under client placement.
        assert ("implausible" in reasons) == (placement == "client")
        assert round_facts["accepted"] == (2 if placement == "server" else 1)


def test_an_empty_partition_is_a_one_line_client_error_not_a_hang():
    from torch.utils.data import TensorDataset

    from dpfl.client.training import train_private_update
    from dpfl.errors import UsageError
    from dpfl.privacy.mechanism import ClientInstructions
    from dpfl.strategies.base import LocalUpdateRule

    empty = TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(UsageError, match="partition has no training examples"):
        train_private_update(
            torch.nn.Linear(4, 2), empty, LocalUpdateRule({}, {}), steps=1, lr=0.1, batch_size=4, weight_decay=0.0,
            grad_clip=1.0, instructions=ClientInstructions.flat(1.0), generator=torch.Generator(),
            noise_stream=Randomness().stream("x"),
        )  # fmt: skip


# --- what is released -----------------------------------------------------------------------


def test_public_records_hold_only_whitelisted_keys_and_epsilon_is_the_accountants(tmp_path):
    out = run(tmp_path, "target", target_epsilon=3.0, max_epsilon=3.0, num_server_rounds=3, sample_rate=0.25)
    config = json.loads((out / "config.json").read_text())
    sigma = calibrate_noise_multiplier(3.0, 1e-5, 0.25, 3)
    assert config["resolved-noise-multiplier"] == sigma
    accountant = create_accountant("rdp", 1e-5)
    for row in rows(out):
        assert set(row) <= PUBLIC_ROUND_KEYS and not set(row) & RAW_STATISTICS
        if row["round"] > 0:
            accountant.step(sigma, 0.25)
            assert row["epsilon"] == pytest.approx(accountant.epsilon(), rel=1e-6)
            assert row["noise-multiplier"] == sigma and row["expected-clients"] == 2.0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) <= PUBLIC_SUMMARY_KEYS
    assert 3.0 * (1 - 1e-3) <= summary["epsilon"] <= 3.0 and summary["rounds-completed"] == 3
    assert summary["noise-multiplier"] == sigma
    # The realised counts live only in the server-private file.
    assert all({"sampled", "accepted"} <= set(r) for r in rows(out, PRIVATE_DIAGNOSTICS_FILE))


class NodesAwaited(Exception):
    """Raised where the ServerApp would start waiting for its nodes."""


def test_the_server_loads_no_training_data(monkeypatch, tmp_path):
    from dpfl.server import app as server_module

    calls = []
    real = data_module.load_dataset
    monkeypatch.setattr(data_module, "load_dataset", lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.setattr(server_module, "wait_for_nodes", lambda grid, wanted: (_ for _ in ()).throw(NodesAwaited()))
    data_module.cached_dataset.cache_clear()
    try:
        with pytest.raises(NodesAwaited):
            server_module.run_federation(None, RunSettings(**{**TINY, "out_dir": str(tmp_path / "s")}))
    finally:
        data_module.cached_dataset.cache_clear()
    assert calls and all(call.get("with_train") is False for call in calls)


def test_local_steps_come_from_the_published_size_not_the_data():
    assert RunSettings(num_clients=400, batch_size=16, local_epochs=1).local_steps() == 1  # ⌈1437/400⌉ = 4 examples
    assert RunSettings(num_clients=400, batch_size=16).local_steps() == 3  # the ResNet-10 recipe's 3 epochs
    assert RunSettings(num_clients=10, batch_size=16, local_epochs=2).local_steps() == 2 * math.ceil(144 / 16)
    assert RunSettings(num_clients=10, client_size=100, batch_size=16, local_epochs=1).local_steps() == 7
    from dpfl.task.data import PUBLISHED_TRAIN_SIZES, load_dataset

    assert PUBLISHED_TRAIN_SIZES["digits"] == len(load_dataset("digits").train)


def test_a_delta_above_one_over_n_is_warned_about():
    assert "1/num-clients" in RunSettings(num_clients=10, delta=0.2).delta_warning()
    assert RunSettings(num_clients=400, delta=1e-5).delta_warning() is None


def test_a_stream_key_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError) as err:
        RandomStream(bytes(16))
    assert str(err.value) == "a stream key has 32 bytes, got 16"
