"""The node's side of secure aggregation: its answers to the round's exchanges, and its masked input.

Between the exchanges of a round the node keeps its secrets (two secret keys, its self-mask
seed, the shares it holds) in its own ``context.state``, as Flower's SecAgg+ mod does: the
node's memory, which the SuperNode holds and never sends (dpfl's engines hand it only to
the process that serves the node's next message). A new round's first exchange replaces
them and the last one erases them. The node checks that every message of the round names
the same setting (clients, degree, threshold, modulus, seeds) as the first one it answered,
so a server cannot change the threshold between the masks and the unmasking.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from dpfl.errors import UsageError
from dpfl.secagg.protocol import SecAggClient, SecAggSetup, pack_nodes, unpack_nodes
from dpfl.strategies.secure_aggregation import MASKED_KEY, SECAGG_KEY, masked_dtype, read_setup

# The node's round secrets in its context.state (never in a reply, a log or a file).
STATE_KEY = "dpfl-secagg"
_SETTING_KEYS = ("round", "nodes", "degree", "min-inputs", "bits", "graph-seed", "rotation-seed")


def advertise_keys(msg: Message, context: Context) -> Message:
    """Exchange 0: a fresh client for the round; its two public keys go back."""
    record = msg.content.config_records[SECAGG_KEY]
    setup, _, _ = _setup(record)
    client = SecAggClient(context.node_id, setup)
    _keep(context, record, client)
    mask_key, share_key = client.advertise()
    return _reply(msg, {"mask-key": mask_key, "share-key": share_key})


def share_keys(msg: Message, context: Context) -> Message:
    """Exchange 1: the shares of its self-mask seed and mask key, encrypted for each neighbour."""
    record = msg.content.config_records[SECAGG_KEY]
    client = round_client(record, context)
    peers = unpack_nodes(record["peers"])
    keys = {peer: (bytes(mask_key), bytes(share_key)) for peer, mask_key, share_key
            in zip(peers, record["peer-mask-keys"], record["peer-share-keys"], strict=True)}  # fmt: skip
    ciphertexts = client.share_keys(keys)
    _keep(context, record, client)
    return _reply(msg, {"to": pack_nodes(sorted(ciphertexts)), "ciphertexts": [ciphertexts[n] for n in sorted(ciphertexts)]})


def masked_reply(msg: Message, context: Context, encoded: np.ndarray) -> Message:
    """Exchange 2 (the train reply): ``encoded`` (its residues mod 2^b) masked."""
    record = msg.content.config_records[SECAGG_KEY]
    client = round_client(record, context)
    shares = dict(zip(unpack_nodes(record["from"]), (bytes(c) for c in record["ciphertexts"]), strict=True))
    masked = client.masked_input(shares, encoded)
    _keep(context, record, client)
    array = Array(masked.astype(masked_dtype(client.setup.bits)))
    return Message(content=RecordDict({MASKED_KEY: ArrayRecord({MASKED_KEY: array})}), reply_to=msg)


def unmask(msg: Message, context: Context) -> Message:
    """Exchange 3: told who sent a masked input, its shares of their seeds (of the others' keys);
    refused when they are fewer than t. The round's secrets are erased either way."""
    record = msg.content.config_records[SECAGG_KEY]
    client = round_client(record, context)
    del context.state[STATE_KEY]
    revealed = client.unmask(unpack_nodes(record["survivors"]))
    owners = sorted(revealed)
    return _reply(msg, {"owners": pack_nodes(owners), "kinds": [revealed[o][0] for o in owners],
                        "shares": [revealed[o][1] for o in owners]})  # fmt: skip


def round_setting(msg: Message) -> tuple[SecAggSetup, bytes] | None:
    """(the setting, the rotation seed) of a train message under secure aggregation, or None."""
    if SECAGG_KEY not in msg.content.config_records:
        return None
    setup, rotation_seed, _ = _setup(msg.content.config_records[SECAGG_KEY])
    return setup, rotation_seed


def round_client(record: ConfigRecord, context: Context) -> SecAggClient:
    """This round's client from the node's state, refused if the message names another setting."""
    if STATE_KEY not in context.state:
        raise UsageError("this node holds no secure-aggregation round: its first exchange never reached it")
    kept = context.state[STATE_KEY]
    changed = [key for key in _SETTING_KEYS if kept[key] != record[key]]
    if changed:
        raise UsageError(f"this node refuses a secure-aggregation message whose {', '.join(changed)} differ from "
                         "the round's first message")  # fmt: skip
    setup, _, _ = _setup(record)
    secrets = {key: value for key, value in kept.items() if key not in _SETTING_KEYS}
    return SecAggClient.from_secrets(context.node_id, setup, secrets)


def _setup(record: ConfigRecord) -> tuple[SecAggSetup, bytes, int]:
    try:
        return read_setup(record)
    except (KeyError, TypeError, ValueError) as err:
        raise UsageError(f"this node refuses a malformed secure-aggregation message ({type(err).__name__}: {err})") from None


def _keep(context: Context, record: ConfigRecord, client: SecAggClient) -> None:
    context.state[STATE_KEY] = ConfigRecord({**{key: record[key] for key in _SETTING_KEYS}, **client.secrets()})


def _reply(msg: Message, values: dict[str, Any]) -> Message:
    return Message(content=RecordDict({SECAGG_KEY: ConfigRecord(values)}), reply_to=msg)
