"""A SuperNode's privacy policy: parsed strictly from its node config, every limit refuses what breaks it,
and the node obeys exactly what it checked (an attacker's message that claims one value and asks for
another is refused or does what the claim says)."""

from __future__ import annotations

import pytest

from dataclasses import replace

from dpfl.errors import UsageError
from dpfl.privacy.accountants import create_accountant
from dpfl.privacy.accountants.rdp import epsilon_for
from dpfl.privacy.mechanism import ClientInstructions, ClientLevelMechanism, MechanismParams, noise_share_std
from dpfl.privacy.node_policy import SAMPLING_TEST_LEVEL, NodePrivacyPolicy, Participation, PolicyRequest
from dpfl.privacy.randomness import Randomness
from dpfl.settings import RunSettings
from dpfl.strategies.base import SERVER_ROUND_KEY

SETTINGS = RunSettings(num_server_rounds=40, sample_rate=0.25, delta=1e-5, strategy="dp-fedpgn")
PARAMS = MechanismParams(noise_multiplier=1.0, clip_norm=0.2, sample_rate=0.25, num_clients=400, delta=1e-5)


def train_config(server_round: int = 1, contribute: bool = True, **params) -> dict:
    """The config record of a train message the platform's mechanism sends for ``params``."""
    mechanism_params = replace(PARAMS, **params)
    mechanism = ClientLevelMechanism(
        mechanism_params, create_accountant("rdp", mechanism_params.delta), Randomness(0 if mechanism_params.reproducible_noise else None)
    )
    return {**mechanism.instructions(contribute_update=contribute), SERVER_ROUND_KEY: server_round}


def request(settings: RunSettings = SETTINGS, server_round: int = 1, **params) -> PolicyRequest:
    """What the node reads from a train message the platform's mechanism sends for ``params``."""
    private = params.get("private", True)
    return PolicyRequest.from_train(train_config(server_round, **params), settings, private)


def asked(node_policy: NodePrivacyPolicy, config: dict, settings: RunSettings = SETTINGS,
          participation: Participation = Participation()) -> str | None:  # fmt: skip
    """The node's answer to a (possibly forged) train config."""
    request_ = PolicyRequest.from_train(config, settings)
    return node_policy.violation(request_, participation.after(request_))


def test_no_policy_keys_is_no_policy_and_refuses_nothing():
    policy = NodePrivacyPolicy.from_node_config({"partition-id": 0, "num-partitions": 3, "data-file": "/data/p.pt"})
    assert policy == NodePrivacyPolicy()
    non_private = request(RunSettings(strategy="fedavg"), private=False)
    assert policy.violation(non_private) is None


def test_policy_keys_are_parsed_with_their_types():
    policy = NodePrivacyPolicy.from_node_config({
        "policy-min-noise-multiplier": 1, "policy-max-clip-norm": 0.5, "policy-max-epsilon": 8.0,
        "policy-delta": 1e-6, "policy-private-only": True, "policy-registered-strategies-only": True,
    })  # fmt: skip
    assert policy == NodePrivacyPolicy(1.0, 0.5, 8.0, 1e-6, True, True)
    assert NodePrivacyPolicy.keys() == [
        "policy-min-noise-multiplier", "policy-max-clip-norm", "policy-max-epsilon", "policy-delta",
        "policy-private-only", "policy-registered-strategies-only", "policy-trust-server-sampling",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({"policy-min-sigma": 1.0}, "unknown node config key 'policy-min-sigma'; privacy policy keys: policy-min-noise"),
        ({"policy-min-noise-multiplier": "high"}, "node config policy-min-noise-multiplier='high' must be a positive number"),
        ({"policy-max-epsilon": True}, "node config policy-max-epsilon=True must be a positive number"),
        ({"policy-max-clip-norm": -1.0}, "node config policy-max-clip-norm=-1.0 must be a positive number"),
        ({"policy-max-clip-norm": 0}, "node config policy-max-clip-norm=0 must be a positive number"),
        ({"policy-max-epsilon": float("inf")}, "node config policy-max-epsilon=inf must be a positive number"),
        ({"policy-private-only": "yes"}, "node config policy-private-only='yes' must be true or false"),
        ({"policy-delta": 1.5}, "node config policy-delta=1.5 must be in (0, 1)"),
    ],
)
def test_malformed_policy_is_a_one_line_usage_error(node_config, message):
    with pytest.raises(UsageError) as err:
        NodePrivacyPolicy.from_node_config(node_config)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize(("noise_multiplier", "sample_rate"), [(0.0, 0.25), (1.0, 0.0), (1.0, 1.5)])
def test_the_node_counts_a_mechanism_without_noise_or_a_sample_rate_outside_0_1_as_infinite_epsilon(
    noise_multiplier, sample_rate
):
    run = PolicyRequest("dp-fedavg", noise_multiplier, 0.2, sample_rate, 1e-5, rounds=10)
    trusting = NodePrivacyPolicy(trust_server_sampling=True)
    assert trusting.epsilon_of(run, Participation(10, 3), 1e-5) == float("inf")


def test_the_node_computes_epsilon_at_sample_rate_one():
    run = PolicyRequest("dp-fedavg", 2.0, 0.2, 1.0, 1e-5, rounds=10)
    trusting = NodePrivacyPolicy(trust_server_sampling=True)
    assert trusting.epsilon_of(run, Participation(10, 10), 1e-5) == epsilon_for(2.0, 1.0, 10, 1e-5)[0] < float("inf")


def test_without_trust_in_the_servers_sampling_the_node_counts_its_own_contributions_unamplified():
    run = PolicyRequest("dp-fedavg", 2.0, 0.2, 0.01, 1e-5, rounds=40)  # the server claims q = 0.01
    policy = NodePrivacyPolicy()
    assert policy.epsilon_of(run, Participation(40, 0), 1e-5) == 0.0
    assert policy.epsilon_of(run, Participation(40, 7), 1e-5) == epsilon_for(2.0, 1.0, 7, 1e-5)[0]
    assert policy.epsilon_of(run, Participation(40, 7), 1e-5) > NodePrivacyPolicy(trust_server_sampling=True).epsilon_of(
        run, Participation(40, 7), 1e-5)


def test_minimum_noise_multiplier():
    policy = NodePrivacyPolicy(min_noise_multiplier=1.0)
    assert policy.violation(request(noise_multiplier=1.0)) is None
    assert policy.violation(request(noise_multiplier=0.5)) == "noise multiplier 0.5 is below this node's minimum 1"


def test_maximum_clip_norm_also_refuses_no_clipping():
    policy = NodePrivacyPolicy(max_clip_norm=0.5)
    assert policy.violation(request(clip_norm=0.5)) is None
    assert policy.violation(request(clip_norm=2.0)) == "clip norm 2 is above this node's maximum 0.5"
    assert policy.violation(request(private=False, noise_multiplier=0.0)) == "clip norm 0 (no clipping) is above this node's maximum 0.5"


@pytest.mark.parametrize(
    ("settings", "params"),
    [
        (RunSettings(strategy="fedavg"), {"private": False}),  # non-private strategy
        (SETTINGS, {"clipping": "paper"}),  # no formal guarantee
        (SETTINGS, {"reproducible_noise": True}),  # noise derivable from --seed
    ],
)
def test_private_only_refuses_runs_without_a_valid_guarantee(settings, params):
    reason = NodePrivacyPolicy(private_only=True).violation(request(settings, **params))
    assert "run has no valid client-level DP guarantee" in reason and reason.endswith("private runs only")
    assert NodePrivacyPolicy(private_only=True).violation(request()) is None


def test_registered_strategies_only_refuses_module_class_plugins():
    policy = NodePrivacyPolicy(registered_strategies_only=True)
    assert policy.violation(request()) is None
    reason = policy.violation(request(RunSettings(strategy="evil_plugin:NoNoise")))
    assert reason == "strategy 'evil_plugin:NoNoise' is a plugin given as module:Class, but this node runs registered strategies only"


def test_maximum_epsilon_is_computed_by_the_node_from_the_mechanism():
    # A node that trusts the server's sampling: its own RDP ε of 40 rounds at (σ, q, δ).
    epsilon = epsilon_for(1.0, 0.25, 40, 1e-5)[0]
    assert NodePrivacyPolicy(max_epsilon=epsilon * 1.01, trust_server_sampling=True).violation(request()) is None
    assert NodePrivacyPolicy(max_epsilon=epsilon, trust_server_sampling=True).violation(request()) is None
    reason = NodePrivacyPolicy(max_epsilon=epsilon * 0.99, trust_server_sampling=True).violation(request())
    assert reason == (
        f"epsilon {epsilon:.3g} at delta 1e-05 after 40 rounds (noise multiplier 1, sample rate 0.25, trusting the "
        f"server's sampling) is above this node's maximum {epsilon * 0.99:g}"
    )


def test_without_trust_maximum_epsilon_is_the_nodes_own_budget_over_its_contributions():
    # Unamplified, each contribution a Gaussian release: the node stops contributing at its budget.
    limit = epsilon_for(1.0, 1.0, 5, 1e-5)[0]
    policy = NodePrivacyPolicy(max_epsilon=limit)
    assert policy.violation(request(), Participation(20, 5)) is None
    reason = policy.violation(request(), Participation(21, 6))
    assert reason == (f"epsilon {epsilon_for(1.0, 1.0, 6, 1e-5)[0]:.3g} at delta 1e-05 after 6 contributions "
                      f"(noise multiplier 1, without amplification by sampling) is above this node's maximum {limit:g}")


def test_maximum_epsilon_uses_the_values_in_the_message_over_the_run_config():
    # A server that calibrated σ, samples at another q or runs past its rounds is judged by what it sends.
    policy = NodePrivacyPolicy(max_epsilon=epsilon_for(1.0, 0.25, 40, 1e-5)[0] * 1.01, trust_server_sampling=True)
    assert policy.violation(request(noise_multiplier=0.9)) is not None
    assert policy.violation(request(sample_rate=0.5)) is not None
    assert policy.violation(request(server_round=41)) is not None
    assert policy.violation(request(delta=1e-6)) is not None


def test_maximum_epsilon_checks_at_the_policy_delta_when_the_run_asks_for_a_larger_one():
    # A large δ in the run would make any ε look small; the node checks at its own δ.
    at_node_delta = epsilon_for(1.0, 0.25, 40, 1e-5)[0]
    reason = NodePrivacyPolicy(max_epsilon=at_node_delta * 0.99, trust_server_sampling=True).violation(request(delta=0.1))
    assert reason is not None and "at delta 1e-05" in reason
    assert epsilon_for(1.0, 0.25, 40, 0.1)[0] < at_node_delta * 0.99


def test_maximum_epsilon_refuses_a_run_whose_epsilon_is_not_valid():
    reason = NodePrivacyPolicy(max_epsilon=100.0).violation(request(clipping="paper"))
    assert reason.endswith("so it cannot be held to this node's maximum epsilon 100")


def test_every_broken_limit_is_named_on_one_line():
    policy = NodePrivacyPolicy(min_noise_multiplier=2.0, max_clip_norm=0.1, registered_strategies_only=True)
    reason = policy.violation(request(RunSettings(strategy="x:Y"), noise_multiplier=1.0, clip_norm=0.2))
    assert reason.count("; ") == 2 and "\n" not in reason
    assert "module:Class" in reason and "below this node's minimum 2" in reason and "above this node's maximum 0.1" in reason


# --- the node obeys what it checked (issue 26, finding 1): forged messages ---------------------
CHECKED = NodePrivacyPolicy(min_noise_multiplier=1.0, max_clip_norm=0.2, max_epsilon=8.0, private_only=True)


def test_the_noise_share_is_derived_from_the_checked_sigma_c_and_n_never_from_a_separate_key():
    config = train_config(noise_placement="client", noise_multiplier=2.0)
    assert CHECKED.violation(PolicyRequest.from_train(config, SETTINGS)) is None
    forged = {**config, "client-noise-std": 0.0}  # the attack: claim σ = 2, ask for no noise
    assert ClientInstructions.from_config(forged).client_noise_std == noise_share_std(2.0, 0.2, 400) > 0
    # An update multiplier below σ cannot lower the share either, and a node with limits refuses it.
    lowered = {**config, "update-noise-multiplier": 0.0}
    assert ClientInstructions.from_config(lowered).client_noise_std == noise_share_std(2.0, 0.2, 400)
    assert "update noise multiplier 0 is below the noise multiplier 2" in asked(CHECKED, lowered)


@pytest.mark.parametrize(
    ("forgery", "refusal"),
    [
        ({"reproducible-noise": True}, "run asks for reproducible noise, which anyone who knows the seed can remove"),
        ({"clipping": "paper", "sample-size": 10**9}, "run asks for clipping 'paper', which has no formal guarantee"),
        ({"sample-size": 10**9}, "sample size 1000000000 is not round(q*N) = 100"),
        ({"report-unclipped": True, "noise-placement": "client"},
         "run asks for the unnoised bit [norm <= C] while the node adds its own noise"),
    ],
)
def test_a_node_with_limits_refuses_what_no_honest_server_asks(forgery, refusal):
    config = {**train_config(noise_multiplier=2.0), **forgery}
    assert refusal in asked(CHECKED, config)
    assert asked(NodePrivacyPolicy(), config) is None  # no policy: the simulation's user is every party


def test_a_node_refuses_to_contribute_implausibly_often_for_the_claimed_sample_rate():
    # The attack: claim q = 0.01 (ε 0.21 by the claim) while asking the node every round.
    policy = NodePrivacyPolicy(min_noise_multiplier=1.0)
    participation, answers = Participation(), []
    for server_round in range(1, 21):
        config = train_config(server_round, sample_rate=0.01, noise_multiplier=2.0)
        request_ = PolicyRequest.from_train(config, SETTINGS)
        answer = policy.violation(request_, participation.after(request_))
        answers.append(answer)
        participation = participation.after(request_) if answer is None else participation
    refused = [r for r, a in enumerate(answers, 1) if a is not None]
    assert refused and refused[0] <= 4 and "implausible at sample rate 0.01" in answers[refused[0] - 1]
    # It went on contributing only as often as the claim makes plausible: far from 20 of 20.
    assert participation.contributions <= 5 and not participation.implausible_under(0.01)


def test_an_honest_sampler_passes_the_participation_test():
    # Participations as a Poisson(q) sampler gives them, up to far in its tail, are accepted.
    policy = NodePrivacyPolicy(min_noise_multiplier=1.0)
    assert not Participation(40, 20).implausible_under(0.25)  # expected 10: 20 is 3.6 sd above
    assert Participation(40, 28).implausible_under(0.25)
    assert policy.violation(request(server_round=40), Participation(40, 20)) is None
    assert 0 < SAMPLING_TEST_LEVEL < 1e-3


def test_noise_only_messages_are_not_contributions():
    req = PolicyRequest.from_train(train_config(3, contribute=False, noise_placement="client"), SETTINGS)
    assert Participation(2, 2).after(req) == Participation(3, 2)


def test_a_claimed_validity_flag_plays_no_part():
    # The node computes whether ε is valid from what it obeys; there is no key to claim it.
    req = request(clipping="paper")
    assert not req.epsilon_valid and request().epsilon_valid
    assert not PolicyRequest.from_train(train_config(), RunSettings(strategy="fedavg"), private_strategy=False).epsilon_valid


def test_repeated_round_numbers_count_as_rounds_and_refused_messages_count_nothing():
    # The attack: re-send rounds 1, 2, 1, 2, ... so that a node trusting the sampling keeps its ε flat.
    trusting = NodePrivacyPolicy(min_noise_multiplier=1.0, trust_server_sampling=True)
    participation = Participation()
    for server_round in [1, 2] * 10:
        req = request(server_round=server_round, sample_rate=1.0)
        participation = participation.after(req)
    assert participation == Participation(rounds=2, contributions=20, repeats=18)
    run = request(sample_rate=1.0)  # 40 planned rounds
    assert trusting.epsilon_of(run, participation, 1e-5) == epsilon_for(1.0, 1.0, 40, 1e-5)[0]
    beyond = participation
    for server_round in [1, 2] * 15:
        beyond = beyond.after(request(server_round=server_round, sample_rate=1.0))
    assert trusting.epsilon_of(run, beyond, 1e-5) == epsilon_for(1.0, 1.0, 50, 1e-5)[0]  # past the plan
    # At a claimed q, repeats make the count implausible as quickly as new rounds would.
    assert Participation(rounds=2, contributions=19, repeats=17).implausible_under(0.25)


@pytest.mark.parametrize(
    ("forgery", "refusal"),
    [
        ({"noise-multiplier": float("inf")}, "noise multiplier inf is not a finite number"),
        ({"noise-multiplier": float("nan")}, "noise multiplier nan is not a finite number"),
        ({"clip-norm": -1.0}, "clip norm -1.0 is not a finite number >= 0"),
        ({"sample-rate": float("nan")}, "sample rate nan is not in [0, 1]"),
        ({"delta": 0.0}, "delta 0.0 is not in (0, 1)"),
        ({"num-clients": -5}, "-5 clients"),
    ],
)
def test_values_that_are_no_mechanism_are_refused_whatever_the_policy(forgery, refusal):
    config = {**train_config(), **forgery}
    for policy in (NodePrivacyPolicy(), CHECKED):
        assert refusal in asked(policy, config)


def test_a_node_with_any_limit_refuses_noise_without_clipping():
    # The attack: a node whose only limit is a minimum σ is told σ = 2 and C = 0 (no clipping at all).
    config = {**train_config(noise_multiplier=2.0), "clip-norm": 0.0}
    assert "noise without clipping" in asked(NodePrivacyPolicy(min_noise_multiplier=1.0), config)
