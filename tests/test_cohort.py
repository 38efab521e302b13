"""Vectorised cohorts train each client as the loop does: per-client updates equal the
loop's for every built-in strategy, over several local steps and unequal client sizes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from dpfl.client.cohort import CohortClient, activation_bytes, chunk_size, train_cohort
from dpfl.client.training import train_private_update
from dpfl.privacy.mechanism import ClientInstructions
from dpfl.privacy.randomness import Randomness
from dpfl.strategies import get_strategy_class, registered_strategies
from dpfl.strategies.base import LocalUpdateRule
from dpfl.settings import RunSettings
from dpfl.task.models import build_model

# Unequal clients: with batches of 5, a step's batches hold 3, 4 or 5 examples, and the
# clients of 7 and 12 examples reach the end of a pass at different steps.
CLIENT_SIZES = (3, 4, 7, 12, 5)
HYPER = dict(steps=3, lr=0.1, batch_size=5, weight_decay=1e-3, grad_clip=1.0)
# Every option a built-in rule reads, at values that exercise it (DP-FedPGN's ascent too).
OPTIONS = {"gamma": 0.3, "ascent-rho": 0.05, "rho": 0.1, "ls-sigma": 1.0}


def cohort_and_loop(strategy: str, model_name: str = "cnn", instructions=None, scale_data: float = 1.0):
    torch.manual_seed(0)
    shape = (1, 8, 8)
    data = TensorDataset(scale_data * torch.randn(sum(CLIENT_SIZES), *shape), torch.randint(10, (sum(CLIENT_SIZES),)))
    bounds = torch.tensor((0, *CLIENT_SIZES)).cumsum(0).tolist()
    parts = [Subset(data, list(range(a, b))) for a, b in zip(bounds, bounds[1:])]
    model = build_model(model_name, 10, 1, 8, 4 if model_name == "cnn" else 8, **({"depth": 1} if model_name == "vit" else {}))
    weights = copy.deepcopy(model.state_dict())
    records = {"global-direction": {name: 0.01 * torch.randn_like(t) for name, t in weights.items()}}
    rule_class = get_strategy_class(strategy).local_update_rule
    instructions = instructions or ClientInstructions.flat(0.5, 0.01)
    randomness = Randomness(7)  # the same noise streams for both paths

    def client(i: int) -> CohortClient:
        return CohortClient(parts[i], torch.Generator().manual_seed(i), instructions, randomness.stream("client", i))

    loop = []
    for i in range(len(parts)):
        model.load_state_dict(weights)
        c = client(i)
        loop.append(train_private_update(model, c.dataset, rule_class(OPTIONS, records), instructions=c.instructions,
                                         generator=c.generator, noise_stream=c.noise_stream, **HYPER))  # fmt: skip
    model.load_state_dict(weights)
    cohort = train_cohort(model, rule_class(OPTIONS, records), [client(i) for i in range(len(parts))], **HYPER)
    for name, t in model.state_dict().items():  # the model itself is left as it was
        assert torch.equal(t, weights[name])
    return cohort, loop


def assert_same_updates(cohort, loop) -> None:
    assert len(cohort) == len(loop)
    for vectorised, looped in zip(cohort, loop):
        assert vectorised.update.keys() == looped.update.keys()
        for name in looped.update:
            torch.testing.assert_close(vectorised.update[name], looped.update[name], rtol=1e-4, atol=1e-6)
        assert vectorised.norm_before_clip == pytest.approx(looped.norm_before_clip, rel=1e-4)
        assert vectorised.train_loss == pytest.approx(looped.train_loss, rel=1e-4)


@pytest.mark.parametrize("strategy", sorted(registered_strategies()))
def test_every_built_in_strategy_trains_each_client_of_a_cohort_as_the_loop_does(strategy):
    assert get_strategy_class(strategy).local_update_rule.has_functional_form()
    assert_same_updates(*cohort_and_loop(strategy))


@pytest.mark.parametrize("strategy,model", [("dp-fedpgn", "resnet10"), ("dp-fedsam", "vit")])
def test_the_resnet_and_the_vit_train_as_in_the_loop(strategy, model):
    assert_same_updates(*cohort_and_loop(strategy, model))


def test_each_client_of_a_cohort_is_clipped_to_c_on_its_own():
    # Large inputs make large updates: every client is clipped, each to C by its own norm.
    cohort, loop = cohort_and_loop("dp-fedavg", instructions=ClientInstructions.flat(0.05), scale_data=30.0)
    assert_same_updates(cohort, loop)
    norms = [torch.linalg.vector_norm(torch.cat([t.flatten().double() for t in u.update.values()])) for u in cohort]
    assert all(float(norm) <= 0.05 for norm in norms)
    assert all(u.norm_before_clip > 0.05 for u in cohort) and len({round(u.norm_before_clip, 6) for u in cohort}) == len(cohort)


def test_a_rule_that_changes_a_loop_hook_without_its_twin_has_no_functional_form():
    class Proximal(LocalUpdateRule):
        def compute_gradient(self, model, inputs, targets):
            return super().compute_gradient(model, inputs, targets)

    class ProximalWithTwin(Proximal):
        def functional_gradient(self, loss, params, batch):
            return super().functional_gradient(loss, params, batch)

    assert not Proximal.has_functional_form()
    assert ProximalWithTwin.has_functional_form()
    model = build_model("cnn", 10, 1, 8, 4)
    client = CohortClient(TensorDataset(torch.randn(4, 1, 8, 8), torch.arange(4)), torch.Generator(),
                          ClientInstructions.flat(1.0), Randomness(0).stream("c"))  # fmt: skip
    with pytest.raises(ValueError, match="no functional form"):
        train_cohort(model, Proximal({}, {}), [client], **HYPER)


def test_a_cohort_is_chunked_to_fit_its_memory_budget(monkeypatch):
    model = build_model("cnn", 10, 1, 8, 4)
    assert activation_bytes(model, (1, 8, 8)) > 4 * 8 * 8 * 4  # at least the first conv's output
    per_client = 1 << 20
    monkeypatch.setattr("dpfl.client.cohort.memory_budget", lambda device: 2 * per_client)
    monkeypatch.setattr("dpfl.client.cohort.activation_bytes", lambda model, shape: per_client // 5 // 3)
    assert chunk_size(model, (1, 8, 8), 5) == 1  # two clients' activations alone would not fit with the parameters
    # Chunked or not, the same updates.
    monkeypatch.setattr("dpfl.client.cohort.chunk_size", lambda model, shape, batch: 2)
    assert_same_updates(*cohort_and_loop("dp-fedpgn"))


# --- through the engine -----------------------------------------------------------------


def run(tmp_path, name: str, workers: int = 1, cohort=None, **changes):
    from test_engines import REPRODUCIBLE

    from dpfl.client.app import app as client_app
    from dpfl.engines.inprocess import run_in_process
    from dpfl.server.app import app as server_app

    settings = RunSettings(**{**REPRODUCIBLE, "device": "cpu", **changes}, out_dir=str(tmp_path / name))
    run_in_process(server_app, client_app, settings.to_run_config(), settings.num_clients, workers, cohort=cohort)
    return tmp_path / name


@pytest.mark.parametrize("placement", ["server", "client"])
def test_a_run_in_vectorised_cohorts_is_the_run_client_by_client(tmp_path, placement):
    from test_engines import assert_same_run

    from dpfl.client.app import train_cohort

    # DP-FedPGN with several local steps (client-size 30, batch 8: 4 steps), clients of unequal size.
    changes = dict(noise_placement=placement, num_clients=10, client_size=30, batch_size=8)
    loop = run(tmp_path, "loop", **changes)
    assert_same_run(loop, run(tmp_path, "cohort", cohort=train_cohort, **changes))
    if placement == "client":  # and in two worker processes, each a cohort of its share
        assert_same_run(loop, run(tmp_path, "cohort-workers", workers=2, cohort=train_cohort, **changes))


def test_one_clients_failure_in_a_cohort_is_its_own():
    from dpfl.client.cohort import train_together
    from dpfl.client.training import LocalTraining

    model = build_model("cnn", 10, 1, 8, 4)
    weights = copy.deepcopy(model.state_dict())
    data = TensorDataset(torch.randn(12, 1, 8, 8), torch.randint(10, (12,)))

    def training(i: int, fail_before: bool = False, empty: bool = False):
        if fail_before:
            raise RuntimeError(f"client {i} refuses")
        result = yield LocalTraining(
            model, weights, Subset(data, [] if empty else [i, i + 6]), LocalUpdateRule({}, {}), steps=2, lr=0.1,
            batch_size=2, weight_decay=0.0, grad_clip=1.0, instructions=ClientInstructions.flat(1.0),
            generator=torch.Generator().manual_seed(i), noise_stream=Randomness(0).stream(i), seed=i,
        )  # fmt: skip
        return (i, result.update)

    outcomes = train_together([training(0), training(1, fail_before=True), training(2), training(3, empty=True),
                               training(4)])  # fmt: skip
    assert isinstance(outcomes[1], RuntimeError) and "client 1 refuses" in str(outcomes[1])
    assert "no training examples" in str(outcomes[3])
    assert [outcome[0] for i, outcome in enumerate(outcomes) if i in (0, 2, 4)] == [0, 2, 4]
