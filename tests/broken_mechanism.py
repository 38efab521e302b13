"""A deliberately broken mechanism for the audit tests: the accountant is told σ, the noise is not σ.

A strategy plugin can no longer do this (the mechanism's randomness is read-only and a
strategy that names the mechanism is refused when it is defined), so the test breaks the
noise the only way left, the way code running with the server's rights could: it replaces
the Gaussian sampler of the secure streams, for the duration of a ``with`` block only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from dpfl.privacy.randomness import RandomStream


@contextmanager
def scaled_noise(scale: float) -> Iterator[None]:
    """Every Gaussian a secure stream draws is ``scale`` times the std asked for (0: none).

    Both samplers: ``gaussian`` and ``gaussian_segments`` (the flat update's noise, which the
    mechanism draws since issue 29; patching only the first left the noise whole).
    """
    gaussian, segments = RandomStream.gaussian, RandomStream.gaussian_segments
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RandomStream, "gaussian", lambda stream, shape, std: gaussian(stream, shape, std * scale))
        patch.setattr(RandomStream, "gaussian_segments", lambda stream, sizes, std: segments(stream, sizes, std * scale))
        yield
