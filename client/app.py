"""The ClientApp: trains the strategy's local update rule and returns the private part."""

from __future__ import annotations

import math

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from dpfl.client.data import load_client_partition
from dpfl.client.local_dp import LocalDP
from dpfl.client.training import train_private_update
from dpfl.settings import RunSettings
from dpfl.strategies import get_strategy_class
from dpfl.strategies.base import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, UPDATE_KEY

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    settings = RunSettings.from_run_config(context.run_config)
    partition = load_client_partition(settings, context.node_config)
    config = msg.content[CONFIG_KEY]
    records = {
        key: record.to_torch_state_dict()
        for key, record in msg.content.array_records.items()
        if key != ARRAYS_KEY
    }
    rule = get_strategy_class(settings.strategy).local_update_rule(config, records)
    model = partition.spec.build()
    model.load_state_dict(msg.content[ARRAYS_KEY].to_torch_state_dict())
    # A distinct, reproducible stream per (run seed, round, node) for shuffling and noise.
    generator = torch.Generator().manual_seed(hash((settings.seed, int(config["server-round"]), context.node_id)) % 2**63)
    # Sample-level DP inside the client: the accountant of its earlier rounds comes
    # from the node's persistent state, so the epsilon it reports is cumulative.
    local_dp = (
        LocalDP(settings.local_noise_multiplier, settings.local_clip, settings.local_delta, context.state)
        if settings.local_dp
        else None
    )
    result = train_private_update(
        model,
        partition.dataset,
        rule,
        steps=int(config["local-steps"]),
        lr=float(config["lr"]),
        batch_size=settings.batch_size,
        weight_decay=settings.weight_decay,
        grad_clip=settings.grad_clip,
        clip_norm=float(config["clip-norm"]),
        client_noise_std=float(config["client-noise-std"]),
        generator=generator,
        clipping=str(config["clipping"]),
        noise_multiplier=float(config["noise-multiplier"]),
        sample_size=int(config["sample-size"]),
        local_dp=local_dp,
    )
    metrics = MetricRecord({"update-norm": result.norm_before_clip, "local-steps": result.steps})
    if local_dp is None:
        metrics.update({"train-loss": result.train_loss, "num-examples": len(partition.dataset)})
    else:
        local_dp.save(context.state)
        # Sample-level DP covers only what derives from the privatised steps: the loss
        # of the raw batches and the exact data size would reach the server unprotected.
        metrics.update({"train-loss": math.nan, "local-epsilon": local_dp.epsilon()})
    content = RecordDict({UPDATE_KEY: ArrayRecord(result.update), METRICS_KEY: metrics})
    return Message(content=content, reply_to=msg)
