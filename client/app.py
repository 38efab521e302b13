"""The ClientApp: trains the strategy's local update rule and returns the privatised private part."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from logging import INFO

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore import log

from dpfl.client.cache import resident_model, run_device, run_settings
from dpfl.client.cohort import train_alone, train_together
from dpfl.client.data import load_client_partition
from dpfl.client.local_dp import LocalDP
from dpfl.client.training import LocalTraining, PrivateUpdate
from dpfl.deployment.node import DEPLOYMENT_KEY, run_node_deployment
from dpfl.errors import UsageError
from dpfl.privacy.mechanism import ClientInstructions, noise_share
from dpfl.privacy.node_policy import NodePrivacyPolicy, PolicyRequest
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
    policy = NodePrivacyPolicy.from_node_config(context.node_config)
    if refusal := policy.violation(PolicyRequest.from_train(msg.content[CONFIG_KEY], settings)):
        raise UsageError(f"this node's privacy policy refuses run {context.run_id}: {refusal}")
    config = msg.content[CONFIG_KEY]
    instructions = ClientInstructions.from_config(config)
    server_round = int(config[SERVER_ROUND_KEY])
    # The node's stable identity in a simulation is its partition; a deployed node has its own id.
    identity = int(context.node_config.get("partition-id", context.node_id))
    # Secure by default; seeded from --seed only when the run asked for reproducible noise.
    randomness = Randomness(settings.seed if instructions.reproducible_noise else None)
    noise_stream = randomness.stream("client-noise", server_round, identity)
    global_weights = record_tensors(msg.content[ARRAYS_KEY])
    if not instructions.contribute_update:  # not sampled: only this client's noise share
        return update_reply(msg, noise_share(global_weights, instructions, noise_stream))
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
    )
    if local_dp is not None:
        local_dp.save(context.state)
        # The client's own sample-level epsilon depends on its data size: it stays in the node's log.
        log(INFO, "dpfl client: sample-level epsilon %.3f (delta %g) after round %d", local_dp.epsilon(),
            settings.local_delta, server_round)  # fmt: skip
    # Only the privatised update leaves the client (with adaptive clipping, also the bit
    # [norm <= C] the server noises): no loss, norm or data size.
    return update_reply(msg, result.update, instructions.unclipped_report(result.norm_before_clip))


@app.query()
def deploy(msg: Message, context: Context) -> Message:
    """The deployment round: compress the final model with this node's data and run it
    on this node's simulated CIM device; only the shareable summary goes back."""
    settings = run_settings(context.run_config)
    node_config = context.node_config

    def local_data():
        partition = load_client_partition(settings, node_config)
        return partition.spec, settings.dataset, partition.dataset

    label = f"partition-{node_config['partition-id']}" if "partition-id" in node_config else f"node-{context.node_id}"
    weights = record_tensors(msg.content[ARRAYS_KEY])
    summary = run_node_deployment(context.run_config, node_config, label, local_data, weights)
    return Message(content=RecordDict({DEPLOYMENT_KEY: ConfigRecord(summary)}), reply_to=msg)


def update_reply(msg: Message, update: dict[str, torch.Tensor], report: dict[str, int] | None = None) -> Message:
    records = {UPDATE_KEY: tensor_record(update), **({METRICS_KEY: MetricRecord(report)} if report else {})}
    return Message(content=RecordDict(records), reply_to=msg)
