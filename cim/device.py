"""Parameters of a simulated memristive compute-in-memory tile.

Geometry and physics of one crossbar, independent of any model: wordlines (rows)
carry the input voltages from drivers at column 0; bitlines (columns) carry the cell
currents to sense amplifiers held at virtual ground below the last row. Every wire
segment between two cross-points (and the one from the driver, and the one into the
sense amplifier) has the same resistance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from dpfl.errors import UsageError


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
    bits_per_cell: int = 1
    activation_bits: int = 8  # applied bit-serially, one binary bit-plane per read cycle
    adc_bits: int | None = None  # None = ideal sense amplifier / ADC

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
        if self.bits_per_cell < 1 or self.weight_bits % self.bits_per_cell:
            raise UsageError(
                f"bits per cell {self.bits_per_cell} must be >= 1 and divide the weight bits {self.weight_bits}"
            )
        if self.tile_size < self.columns_per_weight:
            raise UsageError(
                f"tile size {self.tile_size} does not fit one {self.weight_bits}-bit signed weight "
                f"({self.columns_per_weight} columns: {self.cells_per_weight} cells x 2 for the sign); "
                f"use a tile of at least {self.columns_per_weight}"
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

    @property
    def g_on(self) -> float:
        return 1.0 / self.r_on

    @property
    def g_off(self) -> float:
        return 1.0 / self.r_off

    @property
    def cells_per_weight(self) -> int:
        return self.weight_bits // self.bits_per_cell

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

    @property
    def ideal_wires(self) -> bool:
        return self.r_wordline == 0 and self.r_bitline == 0

    def level_conductance(self, level):
        """Conductance of a cell programmed to ``level`` (0 .. cell_levels), linear in G."""
        return self.g_off + (self.g_on - self.g_off) * level / self.cell_levels

    def as_dict(self) -> dict:
        return asdict(self)
