"""A deliberately broken strategy plugin for the audit tests: the accountant is told σ, the noise is not σ.

Not a test module (no ``test_`` prefix): ``dpfl audit --strategy broken_mechanism:QuietNoiseDPFedAvg``
loads it as any strategy plugin, on the server and in every client.
"""

from __future__ import annotations

from dpfl.privacy.randomness import Randomness, RandomStream
from dpfl.strategies.dp_fedavg import DPFedAvg


class QuietRandomness(Randomness):
    """Secure streams whose Gaussian noise is ``scale`` times the std asked for (0: none)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def stream(self, *label: str | int) -> RandomStream:
        stream = super().stream(*label)
        gaussian = stream.gaussian
        stream.gaussian = lambda shape, std: gaussian(shape, std * self.scale)  # type: ignore[method-assign]
        return stream


class QuietNoiseDPFedAvg(DPFedAvg):
    """DP-FedAvg whose server noise is 100 times smaller than the σ the accountant counts."""

    name = "quiet-noise-dp-fedavg"
    description = "BROKEN on purpose: server noise at sigma/100 while epsilon is computed for sigma"
    scale = 0.01

    def apply_settings(self, settings) -> None:
        self.mechanism.randomness = QuietRandomness(self.scale)


class NoNoiseDPFedAvg(QuietNoiseDPFedAvg):
    """DP-FedAvg that adds no noise at all while ε is computed for σ."""

    name = "no-noise-dp-fedavg"
    description = "BROKEN on purpose: no server noise while epsilon is computed for sigma"
    scale = 0.0
