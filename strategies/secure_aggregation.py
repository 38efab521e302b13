"""Secure aggregation inside a round: SecAgg+'s four exchanges as Flower Message-API messages.

The server's side of :mod:`dpfl.secagg.protocol` on a ``Grid``: before the round's train
messages, two query exchanges (advertise keys, share keys); the train messages then carry
each node's routed shares and their replies are masked inputs; after them one more query
exchange (unmask) and the sum mod 2^b. Every node of the federation takes part (sampled
or not, as under client noise placement: the number of noise shares in a sum must not
reveal the sample). A node that does not answer, answers with an error or answers
something malformed is a dropout; whatever a hostile node sends changes at most its own
input (the sum's norm is bounded on release) and can at worst make the round release
nothing. A round that cannot release a sum (fewer than t nodes left at any stage)
releases nothing; the mechanism has accounted it all the same.

The record layouts here are shared with the ClientApp's handlers
(:mod:`dpfl.client.secure_aggregation`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import bytes_to_public_key

from dpfl.secagg.protocol import SecAggServer, SecAggSetup, TooFewSurvivors, pack_nodes, unpack_nodes

ADVERTISE_KEYS = "query.secagg_advertise"
SHARE_KEYS = "query.secagg_share"
UNMASK = "query.secagg_unmask"
# The record of every secure-aggregation message and reply, and the train reply's masked input.
SECAGG_KEY = "secagg"
MASKED_KEY = "masked"
STAGES = ("advertise keys", "share keys", "masked input", "unmask")


def setup_record(setup: SecAggSetup, rotation_seed: bytes, server_round: int, **payload: Any) -> ConfigRecord:
    """A stage's message: the round's public setting (the node checks it stays the same) and the stage's payload."""
    return ConfigRecord({"round": server_round, "nodes": pack_nodes(setup.nodes), "degree": setup.degree,
                         "min-inputs": setup.min_inputs, "bits": setup.bits, "graph-seed": setup.graph_seed,
                         "rotation-seed": rotation_seed, **payload})  # fmt: skip


def read_setup(record: Mapping[str, Any]) -> tuple[SecAggSetup, bytes, int]:
    """(the setting, the rotation seed, the round) of a stage's message; ValueError if malformed."""
    setup = SecAggSetup(nodes=tuple(unpack_nodes(record["nodes"])), degree=int(record["degree"]),
                        min_inputs=int(record["min-inputs"]), bits=int(record["bits"]),
                        graph_seed=bytes(record["graph-seed"]))  # fmt: skip
    return setup, bytes(record["rotation-seed"]), int(record["round"])


def masked_dtype(bits: int) -> np.dtype:
    """The narrowest unsigned type that holds residues mod 2^b (what a masked input travels as)."""
    return np.dtype(np.uint32 if bits <= 32 else np.uint64)


@dataclass
class SecureRound:
    """One round of secure aggregation on the server: who is still in it, and where it stopped."""

    setup: SecAggSetup
    rotation_seed: bytes
    server_round: int
    padded_size: int
    # The stage that left too few nodes (None once the sum is unmasked).
    failed_stage: str | None = STAGES[0]
    survivors: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._server = SecAggServer(self.setup)

    @classmethod
    def begin(cls, nodes: Sequence[int], degree: int, threshold: int, bits: int, seeds: tuple[bytes, bytes],
              server_round: int, padded_size: int) -> SecureRound | None:  # fmt: skip
        """The round over ``nodes``, or None when they are fewer than t (the round cannot release)."""
        try:
            setup = SecAggSetup(tuple(sorted(nodes)), degree, threshold, bits, graph_seed=seeds[1])
        except ValueError:
            return None
        return cls(setup, seeds[0], server_round, padded_size)

    def _ask(self, grid: Grid, timeout: float, message_type: str, payloads: Mapping[int, dict]) -> dict[int, ConfigRecord]:
        messages = [
            Message(content=RecordDict({SECAGG_KEY: setup_record(self.setup, self.rotation_seed, self.server_round,
                                                                 **payload)}),  # fmt: skip
                    dst_node_id=node, message_type=message_type)
            for node, payload in payloads.items()
        ]
        return {reply.metadata.src_node_id: reply.content.config_records[SECAGG_KEY]
                for reply in grid.send_and_receive(messages, timeout=timeout) if _readable(reply, payloads)}  # fmt: skip

    def exchange_keys(self, grid: Grid, timeout: float) -> dict[int, ConfigRecord]:
        """Stages 0 and 1; for each node still in the round, the record its train message carries
        (the shares its neighbours encrypted for it). Empty if the round failed."""
        try:
            advertised = {}
            for node, record in self._ask(grid, timeout, ADVERTISE_KEYS, {node: {} for node in self.setup.nodes}).items():
                keys = _public_keys(record)
                if keys is not None:
                    advertised[node] = keys
            keys_for = self._server.public_keys_for(advertised)
            payloads = {node: {"peers": pack_nodes(sorted(peers)), "peer-mask-keys": [peers[p][0] for p in sorted(peers)],
                               "peer-share-keys": [peers[p][1] for p in sorted(peers)]}
                        for node, peers in keys_for.items()}  # fmt: skip
            self.failed_stage = STAGES[1]
            sent = {}
            for node, record in self._ask(grid, timeout, SHARE_KEYS, payloads).items():
                ciphertexts = _ciphertexts(record, "to")
                if ciphertexts is not None:
                    sent[node] = ciphertexts
            routed = self._server.route_shares(sent)
        except TooFewSurvivors:
            return {}
        self.failed_stage = STAGES[2]
        return {node: setup_record(self.setup, self.rotation_seed, self.server_round, **{
                    "from": pack_nodes(sorted(shares)), "ciphertexts": [shares[src] for src in sorted(shares)]})
                for node, shares in routed.items()}  # fmt: skip

    def unmasked_sum(self, replies: Iterable[Message], grid: Grid, timeout: float) -> np.ndarray | None:
        """Stages 2 and 3: the sum mod 2^b of the masked inputs in ``replies`` (the train replies),
        or None when too few arrived or answered the unmask request."""
        if self.failed_stage != STAGES[2]:
            return None
        masked = {}
        for reply in replies:
            vector = _masked_input(reply, self.setup, self.padded_size)
            if vector is not None:
                masked.setdefault(reply.metadata.src_node_id, vector)
        try:
            self.survivors = self._server.survivors(masked)
            self.failed_stage = STAGES[3]
            survivors = pack_nodes(self.survivors)
            revealed = {node: shares for node, record in
                        self._ask(grid, timeout, UNMASK, {node: {"survivors": survivors} for node in self.survivors}).items()
                        if (shares := _revealed(record)) is not None}  # fmt: skip
            total = self._server.unmasked_sum(revealed)
        except Exception:  # noqa: BLE001 - too few survivors, or hostile shares that rebuild no key: no release
            return None
        self.failed_stage = None
        return total


def _readable(reply: Message, asked: Mapping[int, Any]) -> bool:
    return (not reply.has_error() and reply.metadata.src_node_id in asked
            and SECAGG_KEY in reply.content.config_records)  # fmt: skip


def _public_keys(record: ConfigRecord) -> tuple[bytes, bytes] | None:
    """A node's two public keys if both parse (a key that does not would fail its neighbours)."""
    try:
        keys = bytes(record["mask-key"]), bytes(record["share-key"])
        for key in keys:
            bytes_to_public_key(key)
    except Exception:  # noqa: BLE001 - whatever a broken or hostile node sent: a dropout
        return None
    return keys


def _ciphertexts(record: ConfigRecord, nodes_key: str) -> dict[int, bytes] | None:
    try:
        nodes, ciphertexts = unpack_nodes(record[nodes_key]), record["ciphertexts"]
        if len(nodes) != len(ciphertexts) or not all(isinstance(c, bytes) for c in ciphertexts):
            return None
        return dict(zip(nodes, ciphertexts))
    except Exception:  # noqa: BLE001
        return None


def _masked_input(reply: Message, setup: SecAggSetup, size: int) -> np.ndarray | None:
    """A train reply's masked input as residues mod 2^b, or None if it is not one."""
    try:
        if reply.has_error() or reply.metadata.src_node_id not in setup.nodes:
            return None
        vector = reply.content.array_records[MASKED_KEY][MASKED_KEY].numpy()
    except Exception:  # noqa: BLE001
        return None
    if vector.dtype != masked_dtype(setup.bits) or vector.shape != (size,):
        return None
    vector = vector.astype(np.uint64)
    return vector if not np.any(vector >> np.uint64(setup.bits)) else None


def _revealed(record: ConfigRecord) -> dict[int, tuple[str, bytes]] | None:
    try:
        owners, kinds, shares = unpack_nodes(record["owners"]), list(record["kinds"]), list(record["shares"])
        if not (len(owners) == len(kinds) == len(shares)) or not set(kinds) <= {"seed", "key"}:
            return None
        return {owner: (kind, bytes(share)) for owner, kind, share in zip(owners, kinds, shares)}
    except Exception:  # noqa: BLE001
        return None
