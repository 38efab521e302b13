"""The ClientApp: trains the strategy's local update rule and returns the privatised private part.

Before it touches its data, a node checks every train message against its own privacy
policy, counting in its own state how often it has been asked to contribute
(:mod:`dpfl.privacy.node_policy`), and then does exactly what it checked: its clipping
and noise share derive from the checked values. Per-client facts (its ε, its
participation, its sample-level ε) go to its private log (:mod:`dpfl.client.node`),
never to Flower's log, which the server publishes.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from flwr.clientapp import ClientApp

from dpfl.client.cache import resident_model, run_device, run_settings
from dpfl.client.cohort import train_alone, train_together
from dpfl.client.data import load_client_partition
from dpfl.client.local_dp import LocalDP
from dpfl.client.node import NodeMemory, log_privately, node_dir, node_label, own_node_config, weights_digest
from dpfl.client.training import LocalTraining, PrivateUpdate
from dpfl.deployment.node import (
    ALREADY_DEPLOYED, DEPLOYMENT_KEY, NOT_LAST_WEIGHTS, POLICY_REFUSAL, failure_summary, run_node_deployment,
)  # fmt: skip
from dpfl.errors import UsageError
from dpfl.client.secure_aggregation import advertise_keys, masked_reply, round_setting, share_keys, unmask
from dpfl.flat import Layout
from dpfl.privacy.distributed_dp import node_epsilon
from dpfl.privacy.mechanism import ClientInstructions, encode_secure_update, noise_share
from dpfl.privacy.node_policy import NodePrivacyPolicy, PolicyRequest, amplified_epsilon, unamplified_epsilon
from dpfl.privacy.randomness import Randomness
from dpfl.records import record_tensors, tensor_record
from dpfl.strategies import get_strategy_class
from dpfl.strategies.base import ARRAYS_KEY, CONFIG_KEY, LOCAL_STEPS_KEY, LR_KEY, METRICS_KEY, SERVER_ROUND_KEY, UPDATE_KEY

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return train_alone(_train(msg, context))


def train_cohort(deliveries: Sequence[tuple[Message, Context]]) -> list[Message | Exception]:
    """The replies to several nodes' train messages (or the exception each raised), their
    local training vectorised where it can be (an engine that holds many nodes calls this)."""
    return train_together([_train(msg, context) for msg, context in deliveries])


def _train(msg: Message, context: Context) -> Generator[LocalTraining, PrivateUpdate, Message]:
    """The node's part around its local training: yields the training, then replies."""
    settings = run_settings(context.run_config)
    node_config = own_node_config(context.node_config)
    policy = NodePrivacyPolicy.from_node_config(node_config)
    private_log = node_dir(node_config, settings, context)
    config = msg.content[CONFIG_KEY]
    try:
        request = PolicyRequest.from_train(config, settings, get_strategy_class(settings.strategy).private)
    except (KeyError, TypeError, ValueError) as err:
        raise UsageError(f"this node refuses a malformed train message ({type(err).__name__}: {err})") from None
    memory = NodeMemory(context)
    participation = memory.participation.after(request)
    # A refused message changes nothing the node remembers: a server cannot advance its round count.
    if refusal := policy.violation(request, participation):
        log_privately(private_log, {"round": request.server_round, "refused": refusal})
        raise UsageError(f"this node's privacy policy refuses run {context.run_id}: {refusal}")
    instructions = ClientInstructions.from_config(config)
    global_weights = record_tensors(msg.content[ARRAYS_KEY])
    secure = None
    if instructions.secure_sum is not None:
        # Secure aggregation: the node's ε from the threshold it is told, its own share and its own
        # contributions (dpfl.privacy.node_policy), and a round setting that matches the mechanism's.
        try:
            setting = round_setting(msg)
            secure = instructions.distributed_params(Layout(global_weights).size)
        except ValueError as err:
            raise UsageError(f"this node refuses secure-aggregation values that are no mechanism: {err}") from None
        if setting is None or (setting[0].min_inputs, setting[0].bits) != instructions.secure_sum:
            raise UsageError("this node refuses a secure-aggregation round whose threshold or modulus differs from "
                             "its train message's")  # fmt: skip
        delta = min(request.delta, policy.delta)
        if refusal := policy.secure_aggregation_violation(secure, participation, request.rounds, request.sample_rate, delta):
            log_privately(private_log, {"round": request.server_round, "refused": refusal})
            raise UsageError(f"this node's privacy policy refuses run {context.run_id}: {refusal}")
        log_privately(private_log, {"round": request.server_round, "contributions": participation.contributions,
                                    "secagg-threshold": secure.threshold, "delta": delta,
                                    "epsilon-own-contributions": node_epsilon(secure, participation.contributions, delta)})  # fmt: skip
    # Counted before training: a node that fails mid-round has still been asked. The weights
    # are remembered only for a run that announces a deployment round: without one, a query
    # finds nothing to match and is refused.
    memory.participation = participation
    memory.last_weights = weights_digest(global_weights) if settings.deploy else ""
    memory.save()
    server_round = int(config[SERVER_ROUND_KEY])
    # The node's stable identity in a simulation is its partition; a deployed node has its own id.
    identity = int(context.node_config.get("partition-id", context.node_id))
    # Secure by default; seeded from --seed only when the run asked for reproducible noise.
    randomness = Randomness(settings.seed if instructions.reproducible_noise else None)
    noise_stream = randomness.stream("client-noise", server_round, identity)
    if secure is not None and not instructions.contribute_update:  # not sampled: a zero update and its share
        return masked_reply(msg, context, encode_secure_update(None, global_weights, secure, setting[1], noise_stream))
    if not instructions.contribute_update:  # not sampled: only this client's noise share
        return update_reply(msg, noise_share(global_weights, instructions, noise_stream))
    if request.epsilon_valid and secure is None:
        delta = min(request.delta, policy.delta)
        log_privately(private_log, {
            "round": server_round, "contributions": participation.contributions, "rounds-seen": participation.rounds,
            "delta": delta, "epsilon-own-contributions": unamplified_epsilon(request, participation, delta),
            "epsilon-if-sampling-honest": amplified_epsilon(request, participation, delta),
        })  # fmt: skip
    partition = load_client_partition(settings, context.node_config)
    device = run_device(settings.device)
    records = {key: {name: t.to(device) for name, t in record_tensors(record).items()}
               for key, record in msg.content.array_records.items() if key != ARRAYS_KEY}  # fmt: skip
    rule = get_strategy_class(settings.strategy).local_update_rule(config, records)
    model = resident_model(partition.spec, device)
    # --seed drives only the local shuffling (comparable experiments), never the noise.
    local_seed = hash((settings.seed, server_round, identity)) % 2**63
    shuffle = torch.Generator().manual_seed(local_seed)
    # Sample-level DP inside the client: the accountant of its earlier rounds comes
    # from the node's persistent state, so its epsilon is cumulative.
    local_dp = (
        LocalDP(settings.local_noise_multiplier, settings.local_clip, settings.local_delta, context.state,
                randomness=randomness, label=(server_round, identity))  # fmt: skip
        if settings.local_dp
        else None
    )
    # Anything else random in local training (a strategy's own draws) is seeded the same
    # way (local_seed), so that a client computes the same whichever process or engine runs it.
    result = yield LocalTraining(
        model,
        global_weights,
        partition.dataset,
        rule,
        steps=int(config[LOCAL_STEPS_KEY]),
        lr=float(config[LR_KEY]),
        batch_size=settings.batch_size,
        weight_decay=settings.weight_decay,
        grad_clip=settings.grad_clip,
        instructions=instructions,
        generator=shuffle,
        noise_stream=noise_stream,
        seed=local_seed,
        local_dp=local_dp,
        train_bit_widths=settings.bit_widths(),
    )
    if local_dp is not None:
        local_dp.save(context.state)
        # Depends on the client's data size and how often it was sampled: the node's alone.
        log_privately(private_log, {"round": server_round, "sample-level-epsilon": local_dp.epsilon(),
                                    "local-delta": settings.local_delta})  # fmt: skip
    if secure is not None:  # only its masked noisy encoding leaves the node
        return masked_reply(msg, context, encode_secure_update(result.update, global_weights, secure, setting[1],
                                                               noise_stream))  # fmt: skip
    # Only the privatised update leaves the client (with adaptive clipping, also the bit
    # [norm <= C] the server noises): no loss, norm or data size.
    return update_reply(msg, result.update, instructions.unclipped_report(result.norm_before_clip))


@app.query("secagg_advertise")
def secagg_advertise(msg: Message, context: Context) -> Message:
    return advertise_keys(msg, context)


@app.query("secagg_share")
def secagg_share(msg: Message, context: Context) -> Message:
    return share_keys(msg, context)


@app.query("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    return unmask(msg, context)


@app.query()
def deploy(msg: Message, context: Context) -> Message:
    """The deployment round: compress the weights of this node's last train message with its
    data and run them on its simulated CIM device; only what it chose to share goes back.

    One query per run, for the weights of a train message its policy checked: a server
    cannot probe the node's data with many crafted models. (It chooses the one model;
    a node that shares its accuracy shares one statistic of its data per run.)
    """
    settings = run_settings(context.run_config)
    node_config = own_node_config(context.node_config)
    policy = NodePrivacyPolicy.from_node_config(node_config)
    private_log = node_dir(node_config, settings, context)
    memory = NodeMemory(context)
    weights = record_tensors(msg.content[ARRAYS_KEY])
    if policy.registered_strategies_only and ":" in settings.strategy:
        summary, detail = failure_summary(POLICY_REFUSAL, node_config), f"plugin strategy {settings.strategy!r}"
    elif memory.deployed:
        summary, detail = failure_summary(ALREADY_DEPLOYED, node_config), "a second deployment query in this run"
    elif not memory.last_weights or weights_digest(weights) != memory.last_weights:
        summary, detail = failure_summary(NOT_LAST_WEIGHTS, node_config), "query weights differ from the last train message's"
    else:
        memory.deployed = True  # before the data are touched: whatever happens, one query per run
        memory.save()

        def local_data():
            partition = load_client_partition(settings, context.node_config)
            return partition.spec, settings.dataset, partition.dataset

        summary, detail = run_node_deployment(settings, node_config, private_log, local_data, weights)
    if detail:
        log_privately(private_log, {"deployment-failed": detail})
    return Message(content=RecordDict({DEPLOYMENT_KEY: ConfigRecord(summary)}), reply_to=msg)


def update_reply(msg: Message, update: dict[str, torch.Tensor], report: dict[str, int] | None = None) -> Message:
    records = {UPDATE_KEY: tensor_record(update), **({METRICS_KEY: MetricRecord(report)} if report else {})}
    return Message(content=RecordDict(records), reply_to=msg)
