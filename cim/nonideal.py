"""Device non-idealities of a programmed crossbar: pure functions of conductances.

The split follows aihwkit's inference noise models: what happens once, when a tile is
programmed (stuck cells, programming noise), what has happened by the time it is
read (drift since programming, and the digital compensation of it), what happens on
every read (read noise), and the ADC that digitises each column. Parameters are
fields of :class:`dpfl.cim.device.CrossbarDevice`; random draws come from an explicit
``torch.Generator``, so a seed fixes the whole device.

Written by hand: aihwkit's noise models need its compiled tiles, which do not install
with this project's torch, and CrossSim is not on PyPI (see docs/cim.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dpfl.cim.device import CrossbarDevice

# Independent random streams derived from one user seed: what programs the tiles and
# what draws read noise (the fast mode's calibration reads keep the seed itself).
PROGRAMMING_STREAM, READ_STREAM = 1, 2


def stream_generator(seed: int, stream: int) -> torch.Generator:
    """A torch generator for one purpose (``*_STREAM``), independent of the others."""
    state = np.random.SeedSequence((seed, stream)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


@dataclass(frozen=True)
class ProgrammedConductance:
    """What a tile holds: at the verify read after programming and at inference time."""

    at_programming: torch.Tensor  # G(t0): faults and programming noise
    at_inference: torch.Tensor  # G(t): after drift


def program(target: torch.Tensor, device: CrossbarDevice, generator: torch.Generator) -> ProgrammedConductance:
    """Conductances a tile realises for ``target`` conductances (R, C), float64.

    Order of events: a stuck cell holds G_on or G_off whatever is written and does
    not drift; every other cell lands at target + Normal(0, sigma) with sigma
    proportional to the target (level-dependent) or to G_on, clipped at 0 (no
    negative conductance), then drifts as G(t0) (t/t0)^(-nu) with nu drawn per cell.
    With every effect off, no random number is drawn and the target is returned.
    """
    if device.programs_exactly:
        return ProgrammedConductance(target, target)
    shape = target.shape
    conductance = target.clone()
    if device.programming_noise:
        scale = target if device.programming_noise_model == "proportional" else torch.full_like(target, device.g_on)
        noise = torch.randn(shape, generator=generator, dtype=torch.float64)
        conductance = (conductance + device.programming_noise * scale * noise).clamp_min(0.0)
    stuck = torch.zeros(shape, dtype=torch.bool)
    if device.stuck_on_rate or device.stuck_off_rate:
        draw = torch.rand(shape, generator=generator, dtype=torch.float64)
        stuck_on = draw < device.stuck_on_rate
        stuck = draw < device.stuck_on_rate + device.stuck_off_rate
        conductance = torch.where(stuck_on, device.g_on, torch.where(stuck, device.g_off, conductance))
    drifted = conductance
    if device.drift_nu or device.drift_nu_std:
        nu = (device.drift_nu + device.drift_nu_std * torch.randn(shape, generator=generator, dtype=torch.float64))
        decay = (device.drift_time / device.drift_t0) ** (-nu.clamp_min(0.0))
        drifted = torch.where(stuck, conductance, conductance * decay)
    return ProgrammedConductance(conductance, drifted)


def compensation_factor(reference: torch.Tensor, drifted: torch.Tensor) -> float:
    """Global drift compensation of one tile (aihwkit's ``GlobalDriftCompensation``):
    the periphery reads the tile with one-hot inputs right after programming and again
    at inference time and scales every output by the ratio of the summed magnitudes.
    ``reference`` and ``drifted`` are the weights those reads decode, any shape."""
    now = float(drifted.abs().sum())
    return float(reference.abs().sum()) / now if now > 0 else 1.0


def read_conductance(
    conductance: torch.Tensor, device: CrossbarDevice, reads: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Conductances (reads, R, C) seen by ``reads`` read cycles: each cell fluctuates by
    Normal(0, read_noise x G) independently per cycle (clipped at 0). Without read
    noise, the (R, C) conductances themselves (broadcast by the solvers)."""
    if not device.read_noise:
        return conductance
    if generator is None:
        raise ValueError("read noise needs a generator")
    noise = torch.randn((reads, *conductance.shape), generator=generator, dtype=torch.float64)
    return (conductance * (1.0 + device.read_noise * noise.to(conductance.dtype))).clamp_min(0.0)


def adc_full_scale(device: CrossbarDevice) -> float:
    """Largest column current the ADC converts: every cell of the column at G_on."""
    return device.tile_size * device.g_on * device.read_voltage


def adc_step(device: CrossbarDevice) -> float:
    """Current of one ADC code step (LSB): full scale over 2^bits - 1 steps."""
    return adc_full_scale(device) / (2**device.adc_bits - 1)


def adc_quantise(currents: torch.Tensor, device: CrossbarDevice) -> torch.Tensor:
    """Column currents after a uniform ``adc_bits`` ADC over [0, full scale]: 2^bits
    codes, 0 to full scale inclusive, nearest code, saturating outside. ``None`` bits
    is an ideal converter."""
    if device.adc_bits is None:
        return currents
    step = adc_step(device)
    return torch.round(currents.clamp(0, adc_full_scale(device)) / step) * step


__all__ = [
    "PROGRAMMING_STREAM", "READ_STREAM", "ProgrammedConductance", "adc_full_scale",
    "adc_quantise", "adc_step", "compensation_factor", "program", "read_conductance", "stream_generator",
]
