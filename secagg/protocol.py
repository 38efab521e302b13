"""SecAgg+ (Bell, Bonawitz, Gascón, Lepoint, Raykova, CCS 2020) as four exchanges of bytes.

The server learns the sum mod 2^b of the inputs of the clients that survive to the
masking stage, and nothing else about any one input, while up to the dropouts the
thresholds allow happen at any stage. The stages, each one request and one reply per
client (what the Message-API glue carries):

0. **advertise keys**: each client makes two key pairs, one to agree on pairwise masks
   (pk1) and one to agree on keys that encrypt the shares it sends (pk2);
1. **share keys**: it draws a self-mask seed b_i and Shamir-shares b_i and its first
   secret key sk1_i among its neighbours and itself (threshold r), each share encrypted
   for its holder;
2. **masked input**: it sends y_i = x_i + PRG(b_i) + Σ_j ±PRG(s_ij) mod 2^b, over its
   neighbours j that reached stage 1 (s_ij agreed from sk1_i and pk1_j; + if i < j, −
   otherwise, so pairwise masks cancel in the sum);
3. **unmask**: told who sent a masked input, each client first checks that they are at
   least t (the fewest inputs a released sum may hold: the distributed noise is sized for
   t), then reveals, for each neighbour, its share of b_j if j sent a masked input and of
   sk1_j if it did not, never both. The server rebuilds the seeds and removes the masks.

Neighbourhoods (the "+" of SecAgg+): a Harary graph of even degree k on a public random
order of the round's clients (each linked to the k/2 before and after it), complete when
k ≥ n − 1. Shamir's threshold is r = ⌊(k+1)/2⌋ + 1 of a client's k + 1 holders, a strict
majority: the server cannot gather r shares of b_i from one group and r of sk1_i from
another. Security holds against an honest-but-curious server and fewer than r colluding
clients in any neighbourhood; a server that lies about who dropped (the malicious model)
needs the consistency round of Bell et al., which this does not have.

Reused from Flower (``flwr.common.secure_aggregation`` and ``flwr.supercore.primitives``),
because they are the audited pieces of its own SecAgg+ and fit as they are: key pairs on
SECP384R1 (``generate_key_pairs``, ``public_key_to_bytes``), ECDH + HKDF-SHA256 key
agreement (``generate_shared_key``), Fernet authenticated encryption of the shares
(``encrypt``/``decrypt``), and Shamir sharing over GF(2^128) from pycryptodome
(``create_shares``/``combine_shares``). Not reused: Flower's mask generator
``pseudo_rand_gen``, which folds the seed to 32 bits and draws from MT19937 in
[0, range − 1), so its masks could be found by trying 2^32 seeds and are not uniform;
masks here are the ChaCha20 keystream under the 256-bit seed, cut to b bits (exactly
uniform mod 2^b). Nothing here is stored: the key material lives in these objects for one
round and is never written to a checkpoint or a log.

No Message API and no I/O here: the glue serialises what these methods return.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from dpfl.privacy.secure_sum import setup_problem
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

_NONCE = bytes(16)  # every mask key is used for one mask only
_SEED_BYTES = 32
_ID_BYTES = 8


class TooFewSurvivors(Exception):
    """Too few clients are left for the round's sum to be released: nothing is."""


@dataclass(frozen=True)
class SecAggSetup:
    """One round's public setting: its clients, the neighbourhood degree k, the minimum
    number of inputs t of a released sum, the modulus 2^b, and the seed of the graph."""

    nodes: tuple[int, ...]
    degree: int
    min_inputs: int
    bits: int
    graph_seed: bytes

    def __post_init__(self) -> None:
        if problem := setup_problem(len(self.nodes), self.degree, self.min_inputs, self.bits):
            raise ValueError(problem)

    @property
    def share_threshold(self) -> int:
        """r: a strict majority of a client's k + 1 share holders (itself included)."""
        return (min(self.degree, len(self.nodes) - 1) + 1) // 2 + 1

    @cached_property
    def _graph(self) -> dict[int, frozenset[int]]:
        n = len(self.nodes)
        if self.degree >= n - 1:
            return {node: frozenset(self.nodes) - {node} for node in self.nodes}
        order = sorted(self.nodes, key=lambda other: hashlib.sha256(self.graph_seed + other.to_bytes(8, "little")).digest())
        half = self.degree // 2
        return {node: frozenset(order[(position + offset) % n] for offset in range(-half, half + 1) if offset)
                for position, node in enumerate(order)}  # fmt: skip

    def neighbours(self, node: int) -> frozenset[int]:
        """``node``'s neighbours in the Harary graph on the public random order of the clients."""
        return self._graph[node]


def pack_nodes(nodes: Sequence[int]) -> bytes:
    """Node ids as bytes (Flower's node ids are unsigned 64-bit; a config record's ints are signed)."""
    return np.asarray(nodes, dtype="<u8").tobytes()


def unpack_nodes(packed: bytes) -> list[int]:
    return [int(node) for node in np.frombuffer(bytes(packed), dtype="<u8")]


def mask(seed: bytes, size: int, bits: int) -> np.ndarray:
    """PRG(seed): ``size`` uniform residues mod 2^b, the ChaCha20 keystream under SHA-256(seed)."""
    key = hashlib.sha256(b"dpfl-secagg-mask" + seed).digest()
    stream = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
    words = np.frombuffer(stream.update(bytes(8 * size)), dtype="<u8")
    return words & np.uint64((1 << bits) - 1)


def _pairwise_seed(own_secret: ec.EllipticCurvePrivateKey, their_public: bytes) -> bytes:
    return base64.urlsafe_b64decode(generate_shared_key(own_secret, bytes_to_public_key(their_public)))


def _pack_shares(src: int, dst: int, seed_share: bytes, key_share: bytes) -> bytes:
    return b"".join([src.to_bytes(_ID_BYTES, "little"), dst.to_bytes(_ID_BYTES, "little"),
                     len(seed_share).to_bytes(4, "little"), seed_share, key_share])  # fmt: skip


def _unpack_shares(plaintext: bytes) -> tuple[int, int, bytes, bytes]:
    src = int.from_bytes(plaintext[:_ID_BYTES], "little")
    dst = int.from_bytes(plaintext[_ID_BYTES : 2 * _ID_BYTES], "little")
    length = int.from_bytes(plaintext[2 * _ID_BYTES : 2 * _ID_BYTES + 4], "little")
    start = 2 * _ID_BYTES + 4
    return src, dst, plaintext[start : start + length], plaintext[start + length :]


class SecAggClient:
    """One client's side of one round; it checks what the server tells it before it acts."""

    def __init__(self, node: int, setup: SecAggSetup) -> None:
        if node not in setup.nodes:
            raise ValueError(f"node {node} is not one of the round's clients")
        self.node = node
        self.setup = setup
        self._neighbours = setup.neighbours(node)
        self._mask_key, mask_public = generate_key_pairs()
        self._share_key, share_public = generate_key_pairs()
        self.public_keys = (public_key_to_bytes(mask_public), public_key_to_bytes(share_public))
        self._peer_keys: dict[int, tuple[bytes, bytes]] = {}
        # The shares this client holds: holder of (b_j, sk1_j) for each j that sent it some.
        self._held: dict[int, tuple[bytes, bytes]] = {}
        self._masked_with: frozenset[int] = frozenset()

    def __getstate__(self) -> None:
        raise TypeError("a SecAgg client holds the round's secret keys and seeds: it is never pickled "
                        "(no checkpoint or log may carry them; the node keeps them with secrets())")

    def secrets(self) -> dict[str, bytes | list[bytes]]:
        """What the node keeps between the round's exchanges, in its own memory only (Flower's
        SecAgg+ mod keeps the same in the node's ``context.state``): its secret keys, its
        self-mask seed, its neighbours' public keys and the shares it holds."""
        peers, held = sorted(self._peer_keys), sorted(self._held)
        return {"mask-key": private_key_to_bytes(self._mask_key), "share-key": private_key_to_bytes(self._share_key),
                "self-seed": getattr(self, "_self_seed", b""), "peers": pack_nodes(peers),
                "peer-mask-keys": [self._peer_keys[peer][0] for peer in peers],
                "peer-share-keys": [self._peer_keys[peer][1] for peer in peers],
                "holders": pack_nodes(held), "seed-shares": [self._held[owner][0] for owner in held],
                "key-shares": [self._held[owner][1] for owner in held],
                "masked-with": pack_nodes(sorted(self._masked_with))}  # fmt: skip

    @classmethod
    def from_secrets(cls, node: int, setup: SecAggSetup, secrets: Mapping[str, Any]) -> SecAggClient:
        """The client of :meth:`secrets`, for the round's next exchange."""
        client = cls.__new__(cls)
        client.node, client.setup, client._neighbours = node, setup, setup.neighbours(node)
        client._mask_key = bytes_to_private_key(bytes(secrets["mask-key"]))
        client._share_key = bytes_to_private_key(bytes(secrets["share-key"]))
        client.public_keys = (public_key_to_bytes(client._mask_key.public_key()),
                              public_key_to_bytes(client._share_key.public_key()))  # fmt: skip
        if secrets["self-seed"]:
            client._self_seed = bytes(secrets["self-seed"])
        client._peer_keys = {peer: (bytes(mask_key), bytes(share_key)) for peer, mask_key, share_key in
                             zip(unpack_nodes(secrets["peers"]), secrets["peer-mask-keys"], secrets["peer-share-keys"])}  # fmt: skip
        client._held = {owner: (bytes(seed), bytes(key)) for owner, seed, key in
                        zip(unpack_nodes(secrets["holders"]), secrets["seed-shares"], secrets["key-shares"])}  # fmt: skip
        client._masked_with = frozenset(unpack_nodes(secrets["masked-with"]))
        return client

    def advertise(self) -> tuple[bytes, bytes]:
        """Stage 0: (pk1, pk2)."""
        return self.public_keys

    def share_keys(self, peer_keys: Mapping[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Stage 1: given its neighbours' public keys, the encrypted shares for each of them."""
        if not set(peer_keys) <= self._neighbours:
            raise ValueError("the server sent public keys of clients that are not this client's neighbours")
        if len({key for pair in peer_keys.values() for key in pair} | set(self.public_keys)) != 2 * (len(peer_keys) + 1):
            raise ValueError("the server sent repeated public keys")
        holders = sorted({*peer_keys, self.node})
        if len(holders) < self.setup.share_threshold:
            raise TooFewSurvivors(f"{len(holders)} share holders, fewer than the threshold {self.setup.share_threshold}")
        self._peer_keys = dict(peer_keys)
        self._self_seed = os.urandom(_SEED_BYTES)
        secret_key = private_key_to_bytes(self._mask_key)
        seed_shares = create_shares(self._self_seed, self.setup.share_threshold, len(holders))
        key_shares = create_shares(secret_key, self.setup.share_threshold, len(holders))
        out = {}
        for holder, seed_share, key_share in zip(holders, seed_shares, key_shares):
            if holder == self.node:
                self._held[self.node] = (seed_share, key_share)
                continue
            encryption_key = generate_shared_key(self._share_key, bytes_to_public_key(peer_keys[holder][1]))
            out[holder] = encrypt(encryption_key, _pack_shares(self.node, holder, seed_share, key_share))
        return out

    def masked_input(self, ciphertexts: Mapping[int, bytes], encoded: np.ndarray) -> np.ndarray:
        """Stage 2: ``encoded`` (residues mod 2^b) masked, given the shares its neighbours sent it."""
        if not set(ciphertexts) <= set(self._peer_keys):
            raise ValueError("the server forwarded shares from clients that are not this client's neighbours")
        for src, ciphertext in ciphertexts.items():
            key = generate_shared_key(self._share_key, bytes_to_public_key(self._peer_keys[src][1]))
            sender, receiver, seed_share, key_share = _unpack_shares(decrypt(key, ciphertext))
            if (sender, receiver) != (src, self.node):
                raise ValueError(f"a share from node {src} names the route {sender} -> {receiver}")
            self._held[src] = (seed_share, key_share)
        if len(ciphertexts) + 1 < self.setup.share_threshold:
            raise TooFewSurvivors(f"shares from {len(ciphertexts)} neighbours, too few to recover from a dropout")
        bits, size = self.setup.bits, encoded.size
        modulus_mask = np.uint64((1 << bits) - 1)
        masked = (np.asarray(encoded, dtype=np.uint64) + mask(self._self_seed, size, bits)) & modulus_mask
        for peer in sorted(ciphertexts):
            pairwise = mask(_pairwise_seed(self._mask_key, self._peer_keys[peer][0]), size, bits)
            masked = (masked + pairwise if self.node < peer else masked - pairwise) & modulus_mask
        self._masked_with = frozenset(ciphertexts)
        return masked

    def unmask(self, survivors: Collection[int]) -> dict[int, tuple[str, bytes]]:
        """Stage 3: for each client whose shares it holds, ("seed", its share of b_j) if j is among
        ``survivors`` (it sent a masked input), else ("key", its share of sk1_j); refused when the
        survivors are fewer than the round's minimum number of inputs."""
        survivors = set(survivors)
        if len(survivors) < self.setup.min_inputs:
            raise TooFewSurvivors(f"{len(survivors)} masked inputs, fewer than the threshold {self.setup.min_inputs}")
        if self.node not in survivors or not survivors <= set(self.setup.nodes):
            raise ValueError("the survivor list does not hold this client or names clients outside the round")
        return {
            owner: ("seed", seed_share) if owner in survivors else ("key", key_share)
            for owner, (seed_share, key_share) in self._held.items()
        }


class SecAggServer:
    """The server's side of one round: routes what clients send and unmasks the sum."""

    def __getstate__(self) -> None:
        raise TypeError("a SecAgg server's round state (masked inputs, rebuilt seeds) is never serialised")

    def __init__(self, setup: SecAggSetup) -> None:
        self.setup = setup
        self._public_keys: dict[int, tuple[bytes, bytes]] = {}
        self._sharers: frozenset[int] = frozenset()
        self._masked: dict[int, np.ndarray] = {}

    def _at_least(self, count: int, stage: str) -> None:
        if count < self.setup.min_inputs:
            raise TooFewSurvivors(f"{count} clients {stage}, fewer than the threshold {self.setup.min_inputs}")

    def public_keys_for(self, advertised: Mapping[int, tuple[bytes, bytes]]) -> dict[int, dict[int, tuple[bytes, bytes]]]:
        """After stage 0: for each client that advertised, its advertising neighbours' keys."""
        self._at_least(len(advertised), "advertised keys")
        self._public_keys = dict(advertised)
        return {node: {peer: advertised[peer] for peer in self.setup.neighbours(node) if peer in advertised}
                for node in advertised}  # fmt: skip

    def route_shares(self, sent: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """After stage 1: for each client that shared, the ciphertexts addressed to it by the others that did."""
        self._at_least(len(sent), "shared their keys")
        self._sharers = frozenset(sent)
        routed: dict[int, dict[int, bytes]] = {node: {} for node in sent}
        for src, ciphertexts in sent.items():
            for dst, ciphertext in ciphertexts.items():
                if dst in routed and dst in self.setup.neighbours(src):
                    routed[dst][src] = ciphertext
        return routed

    def survivors(self, masked: Mapping[int, np.ndarray]) -> list[int]:
        """After stage 2: the clients whose masked input arrived (told to every one of them)."""
        accepted = {node: vector for node, vector in masked.items() if node in self._sharers}
        self._at_least(len(accepted), "sent a masked input")
        self._masked = accepted
        return sorted(accepted)

    def unmasked_sum(self, revealed: Mapping[int, Mapping[int, tuple[str, bytes]]]) -> np.ndarray:
        """After stage 3: Σ x_i mod 2^b over the survivors, from the shares the responders revealed."""
        self._at_least(len(revealed), "answered the unmask request")
        bits = self.setup.bits
        modulus_mask = np.uint64((1 << bits) - 1)
        size = next(iter(self._masked.values())).size
        total = np.zeros(size, dtype=np.uint64)
        for vector in self._masked.values():
            total = (total + np.asarray(vector, dtype=np.uint64)) & modulus_mask
        for owner in sorted(self._sharers):
            # A sharer whose masked input arrived: its self-mask. One that dropped after sharing:
            # the pairwise masks its surviving neighbours added with it.
            kind = "seed" if owner in self._masked else "key"
            masked_neighbours = [peer for peer in sorted(self.setup.neighbours(owner)) if peer in self._masked]
            if kind == "key" and not masked_neighbours:
                continue
            secret = self._reconstruct(owner, kind, revealed)
            if kind == "seed":
                total = (total - mask(secret, size, bits)) & modulus_mask
                continue
            owner_key = bytes_to_private_key(secret)
            for peer in masked_neighbours:
                pairwise = mask(_pairwise_seed(owner_key, self._public_keys[peer][0]), size, bits)
                # The survivor added +mask if it is the smaller id, −mask otherwise: undo that.
                total = (total - pairwise if peer < owner else total + pairwise) & modulus_mask
        return total

    def _reconstruct(self, owner: int, kind: str, revealed: Mapping[int, Mapping[int, tuple[str, bytes]]]) -> bytes:
        shares = [reply[owner][1] for reply in revealed.values() if owner in reply and reply[owner][0] == kind]
        threshold = self.setup.share_threshold
        if len(shares) < threshold:
            raise TooFewSurvivors(f"{len(shares)} shares of node {owner}'s {kind}, fewer than the threshold {threshold}")
        return combine_shares(shares[:threshold])


# Called after each client's answer with (stage, node, CPU seconds it took, bytes it sent).
StageObserver = Callable[[int, int, float, int], None]


def reply_bytes(stage: int, reply: Any, bits: int) -> int:
    """What a client's answer at ``stage`` weighs on the wire (a masked vector packed at b bits)."""
    if stage == 0:
        return sum(len(key) for key in reply)
    if stage == 1:
        return sum(len(ciphertext) for ciphertext in reply.values())
    if stage == 2:
        return (reply.size * bits + 7) // 8
    return sum(_ID_BYTES + len(share) for _, share in reply.values())


def run_round(
    setup: SecAggSetup,
    inputs: Mapping[int, np.ndarray],
    dropped_before: Mapping[int, Sequence[int]] | None = None,
    observe: StageObserver | None = None,
) -> tuple[np.ndarray, list[int]]:
    """One whole round in one process: (the unmasked sum, the survivors whose inputs it holds).

    ``dropped_before[stage]`` lists the clients that drop out before ``stage`` (0-3) answers.
    A client that refuses (too few survivors where it checks) counts as dropped at that stage.
    Raises :class:`TooFewSurvivors` when the server cannot release the sum. ``observe``, if
    given, hears each client's CPU time and bytes per stage (the benchmark's measure).
    """
    dropped_before = dropped_before or {}
    gone: set[int] = set()
    clients = {node: SecAggClient(node, setup) for node in setup.nodes}

    def answers(stage: int, candidates: Collection[int], ask: Callable[[SecAggClient], Any]) -> dict[int, Any]:
        gone.update(dropped_before.get(stage, ()))
        replies = {}
        for node in candidates:
            if node in gone:
                continue
            started = time.process_time()
            try:
                replies[node] = ask(clients[node])
            except TooFewSurvivors:  # the client refuses: for the server, a dropout
                gone.add(node)
                continue
            if observe is not None:
                observe(stage, node, time.process_time() - started, reply_bytes(stage, replies[node], setup.bits))
        return replies

    server = SecAggServer(setup)
    keys_for = server.public_keys_for(answers(0, setup.nodes, SecAggClient.advertise))
    routed = server.route_shares(answers(1, keys_for, lambda client: client.share_keys(keys_for[client.node])))
    masked = answers(2, routed, lambda client: client.masked_input(routed[client.node], inputs[client.node]))
    survivors = server.survivors(masked)
    revealed = answers(3, survivors, lambda client: client.unmask(survivors))
    return server.unmasked_sum(revealed), survivors
