"""The randomness the privacy guarantee rests on: noise and client sampling.

Every stream is the keystream of ChaCha20 (RFC 8439, from the ``cryptography``
package) under its own 256-bit key. By default each key is drawn from the OS's
CSPRNG (``os.urandom``) and never stored or logged: nobody, whatever they know of
the run (``--seed`` included), can regenerate the noise or the sample. With
``--reproducible-noise`` the key is SHA-256 of the seed and the stream's label,
for debugging and exact reproduction only: anyone with the seed can then remove
the noise, so ε is reported as not valid.

Why by hand: torch's CPU generator (MT19937, seeded with 32 bits) and numpy's
PCG64 are not cryptographic, and Opacus's secure mode needs ``torchcsprng``, which
has no build for torch 2.x. What is written here is only the conversion of
keystream bytes to floats.

Gaussian noise is sampled in float64 from 53-bit uniforms (Box–Muller), so a
single draw reaches beyond 8.5σ (float32 ``torch.randn`` stops at 5.77σ, which
floors δ: Mironov, CCS 2012). Against the floating-point attacks of that paper,
every released coordinate is the sum of four such draws of variance σ²/4, as in
Opacus's secure mode (Holohan & Braghin, arXiv:2107.10138): the sum of
independent Gaussians is exactly N(0, σ²), the distribution the accountant is
told, while the set of floats it can produce no longer mirrors one draw's.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

# Float64 carries 53 bits of mantissa: uniforms on the grid k·2⁻⁵³.
MANTISSA_BITS = 53
SMALLEST_UNIFORM = 2.0**-MANTISSA_BITS
# Released Gaussian = sum of this many draws of variance σ²/this (Opacus secure mode).
GAUSSIAN_DRAWS_PER_SAMPLE = 4
_KEY_BYTES = 32
_ZERO_NONCE = bytes(16)  # each key is used for one stream only, so a fixed nonce is safe


class RandomStream:
    """Uniform, Gaussian and Bernoulli draws from one ChaCha20 keystream."""

    def __init__(self, key: bytes) -> None:
        if len(key) != _KEY_BYTES:
            raise ValueError(f"a stream key has {_KEY_BYTES} bytes, got {len(key)}")
        self._keystream = Cipher(algorithms.ChaCha20(key, _ZERO_NONCE), mode=None).encryptor()

    def _words(self, count: int) -> np.ndarray:
        return np.frombuffer(self._keystream.update(bytes(8 * count)), dtype="<u8")

    def uniform(self, count: int) -> np.ndarray:
        """``count`` uniforms on the 53-bit grid of [0, 1)."""
        return (self._words(count) >> np.uint64(64 - MANTISSA_BITS)).astype(np.float64) * SMALLEST_UNIFORM

    def uniform_open_closed(self, count: int) -> np.ndarray:
        """``count`` uniforms on the 53-bit grid of (0, 1]: the smallest is 2⁻⁵³, never 0."""
        return self.uniform(count) + SMALLEST_UNIFORM

    def standard_normal(self, count: int) -> np.ndarray:
        """``count`` N(0, 1) draws in float64 by Box–Muller (both outputs of each pair used)."""
        pairs = (count + 1) // 2
        radius = np.sqrt(-2.0 * np.log(self.uniform_open_closed(pairs)))
        angle = 2.0 * np.pi * self.uniform(pairs)
        return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]

    def gaussian(self, shape: Sequence[int], std: float) -> torch.Tensor:
        """N(0, std²) per coordinate in float64, each the sum of four draws (see the module doc)."""
        count = int(np.prod(shape, dtype=np.int64))
        draws = self.standard_normal(GAUSSIAN_DRAWS_PER_SAMPLE * count).reshape(GAUSSIAN_DRAWS_PER_SAMPLE, count)
        scale = std / np.sqrt(GAUSSIAN_DRAWS_PER_SAMPLE)
        return torch.from_numpy(scale * draws.sum(axis=0)).reshape(tuple(shape))

    def gaussian_segments(self, sizes: Sequence[int], std: float) -> torch.Tensor:
        """One vector of N(0, std²) draws, equal bit for bit to ``gaussian((size,), std)`` for
        each of ``sizes`` in turn, concatenated (a flat update's noise, drawn as its named
        tensors' noise would be), from one read of the keystream."""
        if not sizes:
            return torch.zeros(0, dtype=torch.float64)
        radius_at, angle_at, normal_at = _segment_indices(tuple(sizes))
        words = self.uniform(2 * len(radius_at))
        radius = np.sqrt(-2.0 * np.log(words[radius_at] + SMALLEST_UNIFORM))
        angle = 2.0 * np.pi * words[angle_at]
        normals = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])
        scale = std / np.sqrt(GAUSSIAN_DRAWS_PER_SAMPLE)
        return torch.from_numpy(scale * normals[normal_at].sum(axis=0))

    def bernoulli(self, count: int, probability: float) -> np.ndarray:
        """``count`` independent booleans, each True with ``probability``."""
        return self.uniform(count) < probability


@functools.lru_cache(maxsize=8)
def _segment_indices(sizes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where :meth:`RandomStream.gaussian_segments` finds what per-segment calls would draw.

    Segment i's ``gaussian`` reads p_i words for Box–Muller radii, then p_i for angles
    (p_i pairs for its 4·n_i normals), and its normal j is the cosine output of pair j for
    j < p_i, else the sine output of pair j − p_i; coordinate k sums its normals k, n_i + k,
    2n_i + k, 3n_i + k. Returned: the radius and angle word of every pair (in pair order),
    and for each of the four draws of every coordinate its place in [cosines, sines].
    """
    radius_at, angle_at, normal_at = [], [], []
    word, pair, total_pairs = 0, 0, sum((GAUSSIAN_DRAWS_PER_SAMPLE * n + 1) // 2 for n in sizes)
    for n in sizes:
        pairs = (GAUSSIAN_DRAWS_PER_SAMPLE * n + 1) // 2
        radius_at.append(np.arange(word, word + pairs))
        angle_at.append(np.arange(word + pairs, word + 2 * pairs))
        j = np.arange(GAUSSIAN_DRAWS_PER_SAMPLE * n).reshape(GAUSSIAN_DRAWS_PER_SAMPLE, n)
        normal_at.append(np.where(j < pairs, pair + j, total_pairs + pair + j - pairs))
        word, pair = word + 2 * pairs, pair + pairs
    return np.concatenate(radius_at), np.concatenate(angle_at), np.concatenate(normal_at, axis=1)


def largest_standard_normal() -> float:
    """The largest |z| one Box–Muller draw can produce: √(−2 ln 2⁻⁵³) ≈ 8.57."""
    return float(np.sqrt(-2.0 * np.log(SMALLEST_UNIFORM)))


class Randomness:
    """Where every privacy stream of a run comes from.

    ``seed=None`` (the default): each stream has a fresh key from ``os.urandom``.
    A seed makes every stream a function of (seed, label): reproducible, and so
    worthless as privacy noise.
    """

    # The seed is fixed at construction: a strategy plugin holding the mechanism must not
    # be able to make secure noise reproducible by setting it afterwards.
    __slots__ = ("_seed",)

    def __init__(self, seed: int | None = None) -> None:
        if hasattr(self, "_seed"):
            raise AttributeError("Randomness is read-only: it cannot be initialised again")
        object.__setattr__(self, "_seed", seed)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Randomness is read-only: {name!r} cannot be set after construction")

    @property
    def seed(self) -> int | None:
        return self._seed

    @property
    def reproducible(self) -> bool:
        return self._seed is not None

    def stream(self, *label: str | int) -> RandomStream:
        """The stream for ``label``, e.g. ``("server-noise", round)``."""
        return RandomStream(self.key(*label))

    def key(self, *label: str | int) -> bytes:
        """The 256-bit key of ``label``'s stream: fresh from the OS, or the seed's. A key that is kept
        (correlated noise's master key, :mod:`dpfl.privacy.participation`) is as secret as its noise."""
        if self._seed is None:
            return os.urandom(_KEY_BYTES)
        return hashlib.sha256(repr(("dpfl-reproducible-noise", self._seed, *label)).encode()).digest()


def derived_stream(master_key: bytes, *label: str | int) -> RandomStream:
    """The stream of ``label`` under a kept ``master_key``: keyed by SHA-256(master key, label).

    One master key regenerates many streams (correlated noise replays every past
    round's z after a resume) while each stream still has a key of its own.
    """
    if len(master_key) != _KEY_BYTES:
        raise ValueError(f"a master key has {_KEY_BYTES} bytes, got {len(master_key)}")
    return RandomStream(hashlib.sha256(master_key + repr(label).encode()).digest())
