"""Sampling, clipping, noise and the DP-FedPGN / DP-FedAvg update rules."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from dpfl.client.training import cycle_batches, train_private_update
from dpfl.privacy.accountants import create_accountant
from dpfl.privacy.clipping import flat_clip, global_l2_norm
from dpfl.privacy.mechanism import ClientInstructions, ClientLevelMechanism, MechanismParams
from dpfl.privacy.randomness import Randomness
from dpfl.privacy.sampling import poisson_sample
from dpfl.strategies.dp_fedavg import DPFedAvg
from dpfl.strategies.dp_fedpgn import DPFedPGN
from dpfl.strategies.base import LocalUpdateRule
from dpfl.strategies.dp_fedpgn import GLOBAL_DIRECTION_KEY, FedPGNLocalUpdate


def random_tensors(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": scale * torch.randn(4, 3, generator=g), "b": scale * torch.randn(3, generator=g)}


def test_poisson_sampling_rate_and_empty_rounds():
    stream = Randomness().stream("test")
    sizes = [len(poisson_sample(range(200), 0.1, stream)) for _ in range(2000)]
    assert np.mean(sizes) == pytest.approx(20, rel=0.02)
    assert np.var(sizes) == pytest.approx(200 * 0.1 * 0.9, rel=0.1)  # binomial variance
    assert any(len(poisson_sample(range(3), 0.05, stream)) == 0 for _ in range(200))


@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
def test_flat_clip_bounds_the_whole_update(scale):
    tensors = random_tensors(1, scale)
    clipped, norm = flat_clip(tensors, 0.5)
    flat = torch.cat([t.flatten() for t in tensors.values()])
    assert norm == pytest.approx(float(flat.double().norm()), rel=1e-12)
    assert global_l2_norm(clipped) <= 0.5  # exactly, for the float32 tensors returned
    assert all(clipped[k].dtype == tensors[k].dtype for k in tensors)
    if norm <= 0.5:
        assert all(torch.equal(clipped[k], tensors[k]) for k in tensors)
    else:  # one scale for all tensors: the direction is kept
        assert all(torch.allclose(clipped[k], tensors[k] * 0.5 / norm) for k in tensors)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_flat_clip_never_lets_a_non_finite_update_through(bad):
    tensors = random_tensors(2, 10.0)
    tensors["w"][1, 2] = bad
    clipped, norm = flat_clip(tensors, 0.5)
    assert not math.isfinite(norm)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in clipped.values())


def mechanism(placement="server", sigma=1.3, clip=0.7, q=0.5, n=8, reproducible=None, clipping="flat", private=True):
    params = MechanismParams(noise_multiplier=sigma, clip_norm=clip, sample_rate=q, num_clients=n, delta=1e-5,
                             noise_placement=placement, clipping=clipping, private=private,
                             reproducible_noise=reproducible is not None)  # fmt: skip
    return ClientLevelMechanism(params, create_accountant("rdp", 1e-5), Randomness(reproducible))


def test_flat_instructions_are_what_the_mechanism_tells_a_sampled_client_under_flat_clipping():
    told = ClientInstructions.from_config(mechanism(placement="client").instructions(contribute_update=True))
    flat = ClientInstructions.flat(told.clip_norm, told.client_noise_std)
    # only the paper mode (sigma, sample size) and secure aggregation (N) read the others
    assert flat == dataclasses.replace(told, noise_multiplier=0.0, sample_size=1, num_clients=1)
    assert (flat.contribute_update, flat.clipping, flat.reproducible_noise, flat.report_unclipped) == (
        True, "flat", False, False)


def test_an_update_counts_as_clipped_when_its_norm_is_c_to_a_relative_1e_6():
    mech = mechanism(clip=0.7)  # a server-private diagnostic of server placement
    at_bound, _ = flat_clip(random_tensors(3, 10.0), 0.7)
    assert mech.is_clipped(at_bound)
    assert mech.is_clipped({k: t * (1 - 5e-7) for k, t in at_bound.items()})
    assert not mech.is_clipped({k: t * (1 - 1e-5) for k, t in at_bound.items()})


def test_the_budget_allows_a_round_that_spends_it_exactly_and_refuses_one_beyond():
    mech = mechanism(sigma=1.0, clip=1.0, q=0.1, n=10)
    mech.accountant.step(1.0, 0.1)
    projected = mech.accountant.epsilon_after_step(1.0, 0.1)
    assert mech.budget_refusal(2, projected) is None
    assert mech.budget_refusal(2, projected * 0.999) == (
        f"round 2 would raise epsilon to {projected:.3f}, over the budget {projected * 0.999:g} "
        f"(spent so far: {mech.accountant.epsilon():.3f})"
    )


def test_reproducible_noise_repeats_with_the_seed_and_is_fresh_each_round():
    nodes = list(range(100))
    like = {"v": torch.zeros(1000)}

    def run(seed):
        mech = mechanism(q=0.3, n=100, reproducible=seed)
        return [(mech.sample(nodes, r), mech.release([], like, server_round=r)["v"]) for r in (1, 2)]

    (sample_1, noise_1), (sample_2, noise_2) = run(7)
    again = run(7)
    assert again[0][0] == sample_1 and torch.equal(again[1][1], noise_2)  # the same seed: the same run
    assert sample_1 != sample_2 and not torch.equal(noise_1, noise_2)  # never the same draw twice
    assert run(8)[0][0] != sample_1


def test_without_privacy_the_release_is_the_exact_mean_summed_in_float64():
    mech = mechanism(private=False, sigma=0.0, clip=0.0)
    like = {"v": torch.zeros(2)}
    # 1e8 + 1 is 1e8 in float32: only a float64 sum keeps the 1.
    updates = [{"v": torch.tensor([1e8, 2.0])}, {"v": torch.tensor([1.0, 4.0])}, {"v": torch.tensor([-1e8, 6.0])}]
    assert torch.equal(mech.release(updates, like, server_round=1)["v"], torch.tensor([1 / 3, 4.0]))
    assert torch.equal(mech.release([], like, server_round=2)["v"], torch.zeros(2))
    assert torch.equal(mech.release(updates[1:2], like, server_round=3)["v"], torch.tensor([1.0, 4.0]))
    with pytest.raises(ValueError) as err:  # a seeded mechanism must have seeded streams, and the converse
        ClientLevelMechanism(mech.params, create_accountant("rdp", 1e-5), Randomness(3))
    assert str(err.value) == "the mechanism's reproducible-noise flag must match its randomness"
    assert global_l2_norm({}) == 0.0


def test_the_reply_count_counts_sampled_contributions_not_noise_shares():
    params = MechanismParams(noise_multiplier=0.5, clip_norm=1.0, sample_rate=0.5, num_clients=8, delta=1e-5,
                             noise_placement="client", min_replies=5, reply_count_noise=0.6)  # fmt: skip
    mech = ClientLevelMechanism(params, create_accountant("rdp", 1e-5), Randomness())
    like = {"v": torch.zeros(3)}
    replies = [{"v": torch.zeros(3)}] * 8  # 2 sampled clients' updates and 6 noise-only shares
    assert mech.release(replies, like, server_round=1, contributions=2) is None  # 2 + N(0, 0.6²) < 5
    assert mech.release(replies, like, server_round=2, contributions=8) is not None


def zero_updates(count: int, size: int = 200_000) -> list[dict[str, torch.Tensor]]:
    return [{"v": torch.zeros(size)} for _ in range(count)]


@pytest.mark.parametrize("placement", ["server", "client"])
@pytest.mark.parametrize("replies", [0, 3, 8])
def test_released_noise_is_sigma_c_whatever_the_number_of_replies(placement, replies):
    # Server placement: the server adds N(0, σ²C²). Client placement: every client adds
    # σC/√N and the server adds the missing shares, so the level reveals no count.
    mech = mechanism(placement)
    like = {"v": torch.zeros(200_000)}
    share = mech.params.client_noise_std()
    shares = [{"v": share * torch.randn(200_000, dtype=torch.float64).float()} for _ in range(replies)]
    released = mech.release(shares, like, server_round=1)["v"].double() * mech.params.expected_clients
    assert float(released.std()) == pytest.approx(1.3 * 0.7, rel=0.01)
    assert abs(float(released.mean())) < 5 * 1.3 * 0.7 / math.sqrt(200_000)
    if placement == "client":
        assert share == pytest.approx(1.3 * 0.7 / math.sqrt(8))


def test_the_mean_divides_by_the_expected_count_not_the_reported_one():
    # q = 0.5 of N = 10: the denominator is 5 whether 3 or 7 clients reported.
    mech = mechanism(sigma=1e-12, clip=100.0, q=0.5, n=10)
    like = {"v": torch.zeros(4)}
    for count in (3, 7):
        updates = [{"v": torch.full((4,), float(i + 1))} for i in range(count)]
        mean = mech.release(updates, like, server_round=1)["v"]
        assert torch.allclose(mean, torch.full((4,), sum(range(1, count + 1)) / 5.0), atol=1e-6)
    # q = 0.25 of N = 10: qN = 2.5 itself, not a rounded sample size.
    mech = mechanism(sigma=1e-12, clip=100.0, q=0.25, n=10)
    mean = mech.release([{"v": torch.full((4,), 5.0)}], like, server_round=2)["v"]
    assert torch.allclose(mean, torch.full((4,), 2.0), atol=1e-6)


@pytest.mark.parametrize("placement", ["server", "client"])
def test_the_round_is_accounted_and_journaled_before_its_noise_is_drawn(monkeypatch, placement):
    mech = mechanism(placement, sigma=1.0, clip=1.0, q=0.1, n=10)
    journaled, seen = [], []
    mech.journal = lambda ledger: journaled.append([tuple(step) for step in ledger["history"]])

    class Recording:
        def gaussian(self, shape, std):
            seen.append((list(mech.accountant.history), list(journaled)))
            return torch.zeros(shape, dtype=torch.float64)

        def gaussian_segments(self, sizes, std):
            return self.gaussian((sum(sizes),), std)

    monkeypatch.setattr(Randomness, "stream", lambda self, *label: Recording())
    mech.release([], {"v": torch.zeros(3)}, server_round=1)  # no reply: the whole noise is the server's
    assert seen and all(drawn == ([(1.0, 0.1, 1)], [[(1.0, 0.1, 1)]]) for drawn in seen)


def test_the_mechanism_cannot_be_rebound_after_construction():
    mech = mechanism(sigma=1.0)
    for name, value in (("randomness", Randomness(0)), ("params", None), ("accountant", None), ("clip_norm", 9.0),
                        ("_state", None), ("_randomness", Randomness(0))):  # fmt: skip
        with pytest.raises(AttributeError):
            setattr(mech, name, value)
    with pytest.raises(AttributeError):
        mech.randomness.__init__(0)  # nor can its secure randomness be made reproducible
    with pytest.raises(AttributeError):
        mech.randomness.seed = 0
    assert not mech.randomness.reproducible and mech.clip_norm == 0.7


def test_screening_names_what_is_wrong_with_a_reply():
    mech = mechanism("client", sigma=1.0, clip=1.0, n=4)
    like = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
    good = {"w": torch.ones(3, 2), "b": torch.zeros(2)}
    assert mech.screen(good, like) is None
    bound = 1.0 + 1.0 / math.sqrt(4) * (math.sqrt(8) + 10.0)  # C + one noise share σC/√N over 8 coordinates
    cases = {
        "tensor names differ from the model's (missing ['b'], unexpected ['x'])": {"w": torch.ones(3, 2), "x": torch.ones(1)},
        "tensor 'w' has shape (2, 3), the model's is (3, 2)": {"w": torch.ones(2, 3), "b": torch.zeros(2)},
        "tensor 'w' has dtype torch.float64, the model's is torch.float32": {
            "w": torch.ones(3, 2, dtype=torch.float64), "b": torch.zeros(2)},
        "the update has NaN or Inf values": {"w": torch.full((3, 2), math.nan), "b": torch.zeros(2)},
        f"the update's norm {1e3 * math.sqrt(6):.4g} is implausible for C plus one noise share (bound {bound:.4g})": {
            "w": torch.full((3, 2), 1e3), "b": torch.zeros(2)},
    }
    for reason, update in cases.items():
        assert mech.screen(update, like) == reason


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def tiny_data(seed: int, n: int = 10) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def private_update(model, data, rule, clip=1e6, steps=3, lr=0.1, seed=0):
    return train_private_update(
        model, data, rule, steps=steps, lr=lr, batch_size=4, weight_decay=1e-3, grad_clip=10.0,
        instructions=ClientInstructions.flat(clip), generator=torch.Generator().manual_seed(seed),
        noise_stream=Randomness().stream("client-noise"),
    )  # fmt: skip


def pgn_rule(model: nn.Module, gamma: float, seed: int = 5) -> FedPGNLocalUpdate:
    c = random_tensors_like(model, seed)
    return FedPGNLocalUpdate({"gamma": gamma}, {GLOBAL_DIRECTION_KEY: c})


def random_tensors_like(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def test_private_part_is_clipped_and_public_part_passes_untouched():
    model = tiny_model()
    x = {k: v.clone() for k, v in model.state_dict().items()}
    rule = pgn_rule(model, gamma=0.2)
    result = private_update(model, tiny_data(0), rule, clip=0.01)
    assert result.norm_before_clip > 0.01
    assert global_l2_norm(result.update) <= 0.01
    # Unclipped, the private part plus the public part is exactly Δ = x − y.
    model.load_state_dict(x)
    unclipped = private_update(model, tiny_data(0), rule)
    public = rule.public_part(3, 0.1)
    for name, start in x.items():
        delta = start - model.state_dict()[name]
        assert torch.allclose(unclipped.update[name] + public[name], delta, atol=1e-6)


def make_strategy(cls, **overrides):
    kwargs = dict(noise_multiplier=0.0, clip_norm=1e6, sample_rate=1.0, num_clients=3, local_steps=3,
                  lr=0.1, lr_decay=1.0, delta=1e-5)  # fmt: skip
    kwargs.update(overrides)
    return cls(**kwargs)


def test_server_rebuilds_the_clients_delta_without_noise():
    model = tiny_model()
    x = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = make_strategy(DPFedPGN, num_clients=1, gamma=0.2)
    strategy.global_direction = random_tensors_like(model, 5)
    rule = FedPGNLocalUpdate({"gamma": 0.2}, {GLOBAL_DIRECTION_KEY: strategy.global_direction})
    update = private_update(model, tiny_data(0), rule).update
    new_x = strategy.aggregate_updates(1, x, [update])
    for name in x:  # one client, q = 1, no noise: the server lands exactly on the client's model
        assert torch.allclose(new_x[name], model.state_dict()[name], atol=1e-6)


def test_dp_fedpgn_with_gamma_one_and_no_noise_is_fedavg():
    datasets = [tiny_data(seed) for seed in range(3)]
    start = tiny_model().state_dict()
    client_models = []
    for data in datasets:  # plain FedAvg clients: local SGD from the same start
        model = tiny_model()
        private_update(model, data, LocalUpdateRule({}, {}))
        client_models.append(model.state_dict())
    fedavg = {k: sum(m[k] for m in client_models) / 3 for k in start}

    strategy = make_strategy(DPFedPGN, gamma=1.0)
    updates = []
    for data in datasets:
        model = tiny_model()
        rule = FedPGNLocalUpdate({"gamma": 1.0}, {GLOBAL_DIRECTION_KEY: strategy._direction(start)})
        updates.append(private_update(model, data, rule).update)
    new_x = strategy.aggregate_updates(1, start, updates)
    for name in start:
        assert torch.allclose(new_x[name], fedavg[name], atol=1e-6)


def test_global_direction_is_the_last_global_step_per_local_step():
    start = tiny_model().state_dict()
    strategy = make_strategy(DPFedPGN, gamma=0.2, lr=0.05, lr_decay=0.9, noise_multiplier=1.0, clip_norm=0.1)
    strategy.global_direction = random_tensors_like(tiny_model(), 3)
    updates = [random_tensors_like(tiny_model(), seed) for seed in range(3)]
    new_x = strategy.aggregate_updates(2, start, updates)
    step = strategy.local_steps * 0.05 * 0.9**2  # K·η_t, η_t = η₀·decay^(t+1) for round 2 (t = 1)
    for name in start:
        assert torch.allclose(strategy.global_direction[name], (start[name] - new_x[name]) / step, atol=1e-6)


def test_every_round_is_accounted_even_with_no_client():
    strategy = make_strategy(DPFedAvg, noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.1, num_clients=10)
    start = tiny_model().state_dict()
    new_x = strategy.aggregate_updates(1, start, [])
    assert strategy.accountant.history == [(1.0, 0.1, 1)]
    moved = math.sqrt(sum(float(((new_x[k] - start[k]) ** 2).sum()) for k in start))
    assert moved > 0  # the noise of the mechanism is released even for an empty round


def test_server_reclips_what_clients_send():
    start = tiny_model().state_dict()
    strategy = make_strategy(DPFedAvg, clip_norm=0.5, num_clients=1)
    huge = random_tensors_like(tiny_model(), 1)
    huge = {k: 1e3 * v for k, v in huge.items()}
    new_x = strategy.aggregate_updates(1, start, [huge])
    step = {k: start[k] - new_x[k] for k in start}
    assert global_l2_norm(step) == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize("shape", [(7,), (4, 3, 3, 3), (10, 5)])
def test_laplacian_smoothing_solves_the_implicit_system(shape):
    from dpfl.strategies.smoothing import laplacian_smooth

    v = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    n, sigma = v.numel(), 1.5
    laplacian = 2 * torch.eye(n, dtype=torch.float64)
    for i in range(n):  # periodic 1-D graph Laplacian, the same for every tensor shape
        laplacian[i, (i + 1) % n] -= 1
        laplacian[i, (i - 1) % n] -= 1
    expected = torch.linalg.solve(torch.eye(n, dtype=torch.float64) + sigma * laplacian, v.reshape(-1))
    smoothed = laplacian_smooth(v, sigma)
    assert smoothed.shape == v.shape
    assert torch.allclose(smoothed.reshape(-1), expected, atol=1e-10)
    assert float(smoothed.sum()) == pytest.approx(float(v.sum()))  # the mean is kept
    assert float(smoothed.norm()) < float(v.norm())  # high frequencies (noise) are damped


@pytest.mark.parametrize("as_tensors", [True, False], ids=["tensors", "examples"])
def test_local_batches_cover_the_data_once_per_pass_in_a_new_order(as_tensors):
    data = TensorDataset(torch.arange(40.0).unsqueeze(1), torch.arange(40))
    part = Subset(data if as_tensors else ExampleByExample(data), list(range(3, 40, 3)))  # 13 examples
    batches = cycle_batches(part, 5, torch.Generator().manual_seed(0))
    passes = [[next(batches)[1].tolist() for _ in range(3)] for _ in range(4)]
    assert all([len(batch) for batch in one_pass] == [5, 5, 3] for one_pass in passes)  # the last one partial
    passes = [[label for batch in one_pass for label in batch] for one_pass in passes]
    assert all(sorted(labels) == list(range(3, 40, 3)) for labels in passes)
    assert len({tuple(labels) for labels in passes}) == 4
    again = cycle_batches(part, 5, torch.Generator().manual_seed(0))
    assert [int(y) for _ in range(3) for y in next(again)[1]] == passes[0]


class ExampleByExample(Dataset):
    """A data set read one example at a time, as torchvision's are."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        return self.data[index]


def test_under_client_noise_only_the_sampled_clients_replies_count_towards_min_replies():
    """Every node replies under client placement (the unsampled with a noise share only); the
    noisy reply count that decides whether the round's update is applied counts the sampled."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.clientapp import ClientApp

    from dpfl.engines.inprocess import in_process_grid
    from dpfl.records import tensor_record
    from dpfl.strategies.base import UPDATE_KEY, UPDATE_SKIPPED

    app = ClientApp()

    @app.train()
    def train(msg, context):
        return Message(RecordDict({UPDATE_KEY: tensor_record({"w": torch.zeros(3)})}), reply_to=msg)

    strategy = DPFedAvg(noise_multiplier=0.5, clip_norm=1.0, sample_rate=0.25, num_clients=40, local_steps=1, lr=0.1,
                        lr_decay=1.0, delta=1e-5, noise_placement="client", min_replies=35, reply_count_noise=1.0,
                        reproducible_noise=True, seed=3)  # fmt: skip
    grid = in_process_grid(app, {}, 40)
    messages = strategy.configure_train(1, ArrayRecord({"w": torch.zeros(3)}), ConfigRecord(), grid)
    # q = 0.25 of 40: about 10 sampled; more than 30 has probability below 1e-10.
    assert len(messages) == 40 and strategy.private_diagnostics["sampled"] <= 30
    strategy.aggregate_train(1, grid.send_and_receive(messages))
    # The sampled replies (+ N(0, 1)) are below 35; counting the 40 replies would apply the update.
    assert strategy.private_diagnostics["accepted"] == 40 and strategy.last_metrics[UPDATE_SKIPPED] == 1.0
