"""Parameters of a simulated memristive compute-in-memory tile.

Geometry and physics of one crossbar, independent of any model: wordlines (rows)
carry the input voltages from drivers at column 0; bitlines (columns) carry the cell
currents to sense amplifiers held at virtual ground below the last row. Every wire
segment between two cross-points (and the one from the driver, and the one into the
sense amplifier) has the same resistance.

Device non-idealities (all off by default, so a default device is the ideal-cell
model): programming noise, stuck-at faults, read noise, conductance drift with
optional global drift compensation, and ADC resolution. Their physics lives in
:mod:`dpfl.cim.nonideal`; this module only holds and checks the parameters (like
aihwkit's ``InferenceRPUConfig`` fields and CrossSim's ``DeviceParameters``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from dpfl.errors import UsageError

PROGRAMMING_NOISE_MODELS = ("proportional", "independent")


@dataclass(frozen=True)
class CrossbarDevice:
    """One memristive crossbar tile and how weights and activations are encoded on it.

    Units: ohms, volts, amperes, siemens.
    """

    tile_size: int = 128  # rows = columns
    r_on: float = 100e3  # low-resistance state (a 1 bit, or the top level of a multi-bit cell)
    r_off: float = 10e6  # high-resistance state (a 0 bit)
    r_wordline: float = 1.0  # wire resistance per wordline segment (0 = ideal wire)
    r_bitline: float = 1.0  # wire resistance per bitline segment (0 = ideal wire)
    read_voltage: float = 0.2  # voltage of an active input bit
    weight_bits: int = 8  # magnitude bits; the sign is the differential column pair
    bits_per_cell: int = 1  # cells per weight: weight_bits / bits_per_cell, rounded up
    activation_bits: int = 8  # input (DAC) bits, applied bit-serially, one binary bit-plane per read cycle
    adc_bits: int | None = None  # output (ADC) bits per column read; None = ideal sense amplifier / ADC
    # Programming noise: per-cell Gaussian conductance error drawn once per programmed
    # tile, standard deviation programming_noise x the cell's target conductance
    # ("proportional", level-dependent) or x G_on ("independent" of the level).
    programming_noise: float = 0.0
    programming_noise_model: str = "proportional"
    stuck_on_rate: float = 0.0  # share of cells stuck at G_on whatever is programmed
    stuck_off_rate: float = 0.0  # share of cells stuck at G_off
    read_noise: float = 0.0  # relative sigma of a cell's conductance, drawn anew every read cycle
    # Drift G(t) = G(t0) (t / t0)^(-nu), nu ~ Normal(drift_nu, drift_nu_std) per cell (clipped at 0),
    # t = drift_time seconds after programming; t0 = drift_t0 is when G(t0) was verified.
    drift_nu: float = 0.0
    drift_nu_std: float = 0.0
    drift_time: float | None = None
    drift_t0: float = 20.0
    drift_compensation: bool = False  # scale each tile's outputs by a reference read (aihwkit's global compensation)

    def __post_init__(self) -> None:
        for name in ("tile_size", "weight_bits", "bits_per_cell", "activation_bits"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise UsageError(f"{name} must be an integer, got {value!r}")
        if self.tile_size < 2:
            raise UsageError(f"tile size {self.tile_size} is too small; it must be >= 2")
        if self.weight_bits < 1 or self.activation_bits < 1:
            raise UsageError(
                f"weight bits ({self.weight_bits}) and activation bits ({self.activation_bits}) must be >= 1"
            )
        if self.bits_per_cell < 1:
            raise UsageError(f"bits per cell must be >= 1, got {self.bits_per_cell}")
        if self.tile_size < self.columns_per_weight:
            raise UsageError(
                f"tile size {self.tile_size} does not fit one {self.weight_bits}-bit signed weight "
                f"({self.columns_per_weight} columns: {self.cells_per_weight} cells of {self.bits_per_cell} bit(s) x 2 "
                f"for the sign); it holds at most {self.max_weight_bits} weight bits, or use a tile of at least "
                f"{self.columns_per_weight}"
            )
        for name in ("r_on", "r_off", "read_voltage"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise UsageError(f"{name} must be a positive finite number, got {value!r}")
        for name in ("r_wordline", "r_bitline"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise UsageError(f"{name} must be >= 0 ohm (0 = ideal wire), got {value!r}")
        if self.r_off <= self.r_on:
            raise UsageError(f"r_off ({self.r_off:g} ohm) must be larger than r_on ({self.r_on:g} ohm)")
        if self.adc_bits is not None and (not isinstance(self.adc_bits, int) or self.adc_bits < 1):
            raise UsageError(f"adc_bits must be a positive integer or None (ideal), got {self.adc_bits!r}")
        self._check_nonidealities()

    def _check_nonidealities(self) -> None:
        for name in ("programming_noise", "read_noise"):
            value = getattr(self, name)
            if not (0 <= value < 1):
                raise UsageError(f"{name} is a relative sigma and must be in [0, 1), got {value!r}")
        if self.programming_noise_model not in PROGRAMMING_NOISE_MODELS:
            raise UsageError(
                f"programming_noise_model {self.programming_noise_model!r} is unknown; "
                f"choose one of {', '.join(PROGRAMMING_NOISE_MODELS)}"
            )
        for name in ("stuck_on_rate", "stuck_off_rate"):
            value = getattr(self, name)
            if not (0 <= value <= 1):
                raise UsageError(f"{name} is a share of cells and must be in [0, 1], got {value!r}")
        if self.stuck_on_rate + self.stuck_off_rate > 1:
            raise UsageError(
                f"stuck_on_rate + stuck_off_rate = {self.stuck_on_rate + self.stuck_off_rate:g} exceeds 1"
            )
        for name in ("drift_nu", "drift_nu_std"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise UsageError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (self.drift_t0 > 0 and math.isfinite(self.drift_t0)):
            raise UsageError(f"drift_t0 must be a positive number of seconds, got {self.drift_t0!r}")
        if self.drift_time is None:
            if self.drift_nu or self.drift_nu_std:
                raise UsageError("a drift exponent needs a drift time: give drift_time, seconds since programming")
            if self.drift_compensation:
                raise UsageError("drift compensation needs a drift time: give drift_time, seconds since programming")
        elif not (self.drift_time >= self.drift_t0 and math.isfinite(self.drift_time)):
            raise UsageError(
                f"drift_time {self.drift_time!r} s must be finite and at least drift_t0 = {self.drift_t0:g} s "
                "(the time the programmed conductances were verified)"
            )

    @property
    def programs_exactly(self) -> bool:
        """True if every cell holds its target conductance at inference time (no
        programming noise, stuck cells or drift): programming draws no random numbers."""
        return not (
            self.programming_noise or self.stuck_on_rate or self.stuck_off_rate
            or self.drift_nu or self.drift_nu_std
        )

    @property
    def g_on(self) -> float:
        return 1.0 / self.r_on

    @property
    def g_off(self) -> float:
        return 1.0 / self.r_off

    @property
    def cells_per_weight(self) -> int:
        """Slices of one weight magnitude; the most significant one holds the remaining
        bits when bits_per_cell does not divide weight_bits (6 bits on 4-bit cells: 4 + 2)."""
        return -(-self.weight_bits // self.bits_per_cell)

    @property
    def max_weight_bits(self) -> int:
        """The most magnitude bits one signed weight can have on this tile: half its
        columns (the other half is the sign's pair) times the bits of a cell."""
        return self.tile_size // 2 * self.bits_per_cell

    @property
    def adc_bits_needed(self) -> int:
        """ADC resolution that tells every column sum apart: its step (full scale, every
        cell of the column at G_on, over 2^bits - 1 steps, :mod:`dpfl.cim.nonideal`) is
        at most one cell level, (G_on - G_off) / cell_levels at the read voltage, so sums
        one level apart land on different codes. Nearly ISAAC's rule for bit-serial
        inputs, log2(rows · cell_levels + 1) (Shafiee et al., ISCA 2016); the G_off
        offset makes a level slightly smaller than G_on / cell_levels."""
        levels_in_full_scale = self.tile_size * self.cell_levels * self.g_on / (self.g_on - self.g_off)
        return math.ceil(math.log2(levels_in_full_scale + 1))

    def check_precision(self) -> None:
        """One-line UsageError unless the device reads back every bit a deployment
        stores: weights at ``weight_bits`` (checked on construction: the tile holds the
        slices) read through an ADC fine enough for the column sum. A coarser ADC
        merges sums that differ in the weights' least significant levels; it remains
        a device non-ideality for studies of the converter (:mod:`dpfl.cim.nonideal`)."""
        if self.adc_bits is not None and self.adc_bits < self.adc_bits_needed:
            raise UsageError(
                f"adc_bits {self.adc_bits} is too coarse for the sum of a {self.tile_size}-row column of "
                f"{self.bits_per_cell}-bit cells (0 to {self.tile_size * self.cell_levels} cell levels): this device "
                f"needs adc_bits >= {self.adc_bits_needed}, or an ideal ADC"
            )

    @property
    def columns_per_weight(self) -> int:
        return 2 * self.cells_per_weight

    @property
    def cell_levels(self) -> int:
        """Highest programmable level of one cell (1 for binary cells)."""
        return 2**self.bits_per_cell - 1

    @property
    def outputs_per_tile(self) -> int:
        return self.tile_size // self.columns_per_weight

    def level_conductance(self, level):
        """Conductance of a cell programmed to ``level`` (0 .. cell_levels), linear in G."""
        return self.g_off + (self.g_on - self.g_off) * level / self.cell_levels

    def as_dict(self) -> dict:
        return asdict(self)
