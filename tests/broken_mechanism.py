"""A deliberately broken mechanism for the audit's tests and benchmark: the accountant is told σ, the noise is not σ.

Not a test module (no ``test_`` prefix) and not a plugin: :func:`noise_scaled` is a
test-only path, which no run config, strategy option or plugin can reach. Inside it
every Gaussian draw of the privacy streams (:class:`dpfl.privacy.randomness.RandomStream`)
is ``scale`` times the standard deviation asked for, so a run in this process (the
audit's in-process engine) adds σ·scale while its accountant counts σ.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from dpfl.privacy.randomness import RandomStream


@contextmanager
def noise_scaled(scale: float) -> Iterator[None]:
    """Within the block, the privacy noise is ``scale`` times what the mechanism asks for (0: none)."""
    gaussian = RandomStream.gaussian
    RandomStream.gaussian = lambda self, shape, std: gaussian(self, shape, std * scale)  # type: ignore[method-assign]
    try:
        yield
    finally:
        RandomStream.gaussian = gaussian  # type: ignore[method-assign]
