"""Bit-serial matrix products on programmed tiles, and the distortion they suffer.

Two ways to run a layer on its tiles:

* :func:`simulate_matmul`: every binary input bit-plane is a read cycle of the circuit
  (the converged fixed point of :mod:`dpfl.cim.circuit`); column currents pass the ADC,
  are decoded slice by slice and shift-added over bit-planes. It also measures the
  non-ideality factor NF = (I_ideal - I_real) / I_ideal per column and read cycle.
  The crossbar is a linear network (ohmic cells, ideal drivers and virtual grounds),
  so by superposition a read's column currents are ``plane @ A``, with ``A`` the
  tile's transfer matrix: the column currents when one row alone is driven
  (:func:`transfer_matrix`: one solve per used row, or a direct block elimination of
  the whole tile, whichever is cheaper). When a tile has enough distinct planes to
  read, building ``A`` once is cheaper than solving every plane, and exact. Read
  noise changes the conductances on every read, so then every read is solved.
* :func:`effective_weights`: the fast model. Per tile, a map of how much of its ideal
  current each cell keeps on average (calibrated with the circuit solve on random
  bit-planes at the layer's measured per-input bit density) scales the conductances;
  decoding those gives a distorted integer weight matrix, so a whole layer is one
  ordinary matrix product. The distortion is spatial (it depends on where each cell
  sits) but no longer on the individual input pattern. Read noise, which the exact
  path draws per cell and read cycle, becomes Gaussian output noise of the same
  variance (:func:`read_noise_variance`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dpfl.cim.circuit import (
    fixed_point_iterations, ideal_cell_currents, largest_wire_drop, row_transfer, solve_fixed_point,
)
from dpfl.cim.device import CrossbarDevice
from dpfl.cim.mapping import Tile
from dpfl.cim.nonideal import adc_quantise, read_conductance

# Cells solved per chunk of read cycles (batch x rows x columns): bounds the solver's
# memory (a few (B, R, C) buffers) at ~100 MB in float64.
CELLS_PER_CHUNK = 2**21
# The fast model of parasitics: single precision keeps a tile's currents to ~1e-6,
# far below the distortion being measured, at twice the speed of double precision.
SIMULATION_DTYPE = torch.float32
# Time of the direct transfer-matrix elimination per R·C^3 over that of one cell in
# one fixed-point step: measured 0.016-0.025 at 128-256 tiles (one thread, float32
# fixed point, OpenBLAS); only decides which of two exact methods runs.
DIRECT_TRANSFER_COST = 0.02
TRANSFER_METHODS = ("auto", "direct", "fixed-point")


@dataclass
class Distortion:
    """Pooled NF over (read cycle, mapped column) pairs whose ideal current is not zero."""

    nf_sum: float = 0.0
    count: int = 0
    tile_nf: list[float] = field(default_factory=list)

    @property
    def nf(self) -> float:
        return self.nf_sum / self.count if self.count else 0.0

    def add(self, other: "Distortion") -> None:
        self.nf_sum += other.nf_sum
        self.count += other.count
        self.tile_nf.extend(other.tile_nf)


@dataclass
class CellLoss:
    """Current each cell of one tile loses to parasitics, summed over read cycles."""

    total: torch.Tensor  # (T, T) amperes
    cycles: int = 0

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.cycles, 1)


def _chunks(total: int, tile: Tile):
    step = max(1, CELLS_PER_CHUNK // tile.conductance.numel())
    return ((start, min(start + step, total)) for start in range(0, total, step))


def _decode(tile: Tile, column_currents: torch.Tensor, num_outputs: int) -> torch.Tensor:
    """Integer-unit outputs (B, num_outputs) from physical column currents (B, T)."""
    columns = tile.used_columns
    contributions = column_currents[:, columns].double() * tile.column_weight[columns]
    out = torch.zeros(column_currents.shape[0], num_outputs, dtype=torch.float64)
    return out.index_add_(1, tile.column_output[columns], contributions)


def _tile_voltages(tile: Tile, planes: torch.Tensor, device: CrossbarDevice, dtype: torch.dtype) -> torch.Tensor:
    """Physical input voltages (B, T) from binary planes over the tile's used rows (B, n_rows)."""
    voltages = torch.zeros(planes.shape[0], tile.conductance.shape[0], dtype=dtype)
    voltages[:, tile.used_rows] = planes.to(dtype) * device.read_voltage
    return voltages


def _read_cycles(
    tile: Tile, planes: torch.Tensor, device: CrossbarDevice, dtype: torch.dtype,
    cell_loss: CellLoss | None = None, generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and ideal-wire column currents (B, T), float64, of binary planes (B, n_rows),
    each a read cycle solved as a circuit (with its own read noise, from ``generator``).
    If given, ``cell_loss`` accumulates the current each cell loses to parasitics."""
    tile_conductance = tile.conductance.to(dtype)
    real_columns = torch.empty(planes.shape[0], tile_conductance.shape[1], dtype=torch.float64)
    ideal_columns = torch.empty_like(real_columns)
    for start, stop in _chunks(planes.shape[0], tile):
        voltages = _tile_voltages(tile, planes[start:stop], device, dtype)
        conductance = read_conductance(tile_conductance, device, stop - start, generator)
        real = solve_fixed_point(conductance, voltages, device.r_wordline, device.r_bitline)
        ideal = ideal_cell_currents(conductance, voltages)
        if cell_loss is not None:
            cell_loss.total += (ideal - real).sum(0).double()
            cell_loss.cycles += stop - start
        real_columns[start:stop], ideal_columns[start:stop] = real.sum(1), ideal.sum(1)
    return real_columns, ideal_columns


def _solve_costs(tile: Tile, device: CrossbarDevice, dtype: torch.dtype) -> tuple[float, float]:
    """Estimated cost (in fixed-point cell updates) of solving one read of ``tile`` by
    the fixed point in ``dtype``, and of its direct transfer elimination (infinite
    without two resistive wires): what decides between exact methods, never results."""
    rows, cols = tile.conductance.shape
    if not (device.r_wordline > 0 and device.r_bitline > 0):
        return float(rows * cols), math.inf
    drop = largest_wire_drop(tile.conductance.to(dtype), device.r_wordline, device.r_bitline)
    return (fixed_point_iterations(drop, dtype) + 2) * rows * cols, DIRECT_TRANSFER_COST * rows * cols**3


def transfer_matrix(
    tile: Tile, device: CrossbarDevice, dtype: torch.dtype = SIMULATION_DTYPE, method: str = "auto"
) -> torch.Tensor:
    """Column currents (n_rows, T), float64, when each used row alone is at the read
    voltage and every other row is driven at 0 V: a read of plane ``p`` gives ``p @ A``.

    Two exact methods: ``"fixed-point"``, one fixed-point solve per used row in
    ``dtype`` (cost ~ iterations x used rows x R x C: cheap for partly used or weakly
    resistive tiles), and ``"direct"``, the block elimination of :func:`row_transfer`
    in float64 (cost ~ R x C^3 whatever the resistances; needs both wires resistive,
    else ValueError). ``"auto"`` picks the cheaper one for this tile.
    """
    if method not in TRANSFER_METHODS:
        raise ValueError(f"transfer method {method!r} is not one of {', '.join(TRANSFER_METHODS)}")
    used = tile.used_rows.numel()
    if method == "auto":
        per_read, direct = _solve_costs(tile, device, dtype)
        method = "direct" if direct <= per_read * used else "fixed-point"
    if method == "direct":
        per_volt = row_transfer(tile.conductance.numpy(), device.r_wordline, device.r_bitline)
        return torch.from_numpy(per_volt)[tile.used_rows] * device.read_voltage
    return _read_cycles(tile, torch.eye(used, dtype=torch.int64), device, dtype)[0]


def _decode_cycles(
    tile: Tile, real: torch.Tensor, ideal: torch.Tensor | None, device: CrossbarDevice, num_outputs: int
) -> tuple[torch.Tensor, Distortion]:
    """Decoded outputs (B, num_outputs) of column currents (B, T) read through the ADC,
    and their NF against the ideal-wire currents of the same reads (none if ``ideal``
    is None)."""
    columns = tile.used_columns
    outputs = _decode(tile, adc_quantise(real, device), num_outputs)
    if ideal is None:
        return outputs, Distortion()
    ideal_used = ideal[:, columns]
    lit = ideal_used > 0
    nf = (ideal_used - real[:, columns])[lit] / ideal_used[lit]
    distortion = Distortion(float(nf.sum()), int(lit.sum()))
    distortion.tile_nf.append(distortion.nf)
    return outputs, distortion


def _bit_planes(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Binary planes (bits, N, K) of non-negative integers (N, K), plane 0 least significant."""
    return (x[None] >> torch.arange(bits)[:, None, None]) & 1


def _signed_parts(x: torch.Tensor):
    """(sign, magnitudes) of signed integer inputs (N, K): the positive part, then the
    negative part as a second pass (a part that is all zero is skipped)."""
    for sign, part in ((1.0, x.clamp_min(0)), (-1.0, (-x).clamp_min(0))):
        if part.any():
            yield sign, part


def _tile_planes(tile: Tile, part: torch.Tensor, bits: int) -> torch.Tensor:
    """Binary planes (bits·N, used rows) of non-negative inputs (N, K) on the tile's rows."""
    return _bit_planes(part[:, tile.row_input[tile.used_rows]], bits).reshape(-1, tile.used_rows.numel())


def simulate_matmul(
    tiles: list[Tile], x: torch.Tensor, num_outputs: int, device: CrossbarDevice,
    dtype: torch.dtype = SIMULATION_DTYPE, generator: torch.Generator | None = None,
    transfers: list[torch.Tensor] | None = None, solve_every_read: bool = False, measure_nf: bool = True,
) -> tuple[torch.Tensor, Distortion]:
    """Analog ``x · Qᵀ`` (N, num_outputs) of signed integer inputs (N, K) on ``tiles``.

    Negative inputs are a second pass with the magnitudes of the negative part,
    subtracted digitally. Identical bit-planes are read once, so NF pools over the
    distinct reads of each tile; not if the device has read noise (every read differs;
    ``generator`` draws it), nor for inference through given ``transfers`` (a matrix
    product costs less than finding the duplicates). ``measure_nf=False`` skips the NF
    (the returned Distortion is empty) for inference, which needs only the outputs. Reads go through the
    tiles' transfer matrices (``transfers``, or computed here when that costs less
    than solving the tile's distinct planes), else each is solved; ``solve_every_read``
    forces the latter (benchmarks, cross-checks).
    """
    if device.read_noise and transfers is not None:
        raise ValueError("transfer matrices cannot carry read noise: every read has its own conductances")
    bits = device.activation_bits
    result = torch.zeros(x.shape[0], num_outputs, dtype=torch.float64)
    distortion = Distortion()
    significance = 2.0 ** torch.arange(bits, dtype=torch.float64)
    for sign, part in _signed_parts(x):
        for index, tile in enumerate(tiles):
            planes = _tile_planes(tile, part, bits)
            if device.read_noise or (transfers is not None and not measure_nf):
                unique, inverse = planes, None
            else:
                unique, inverse = torch.unique(planes, dim=0, return_inverse=True)
            solve = solve_every_read or device.read_noise
            if transfers is None and not solve:
                # Solve the distinct reads, or build the transfer matrix: whichever costs less.
                per_read, direct = _solve_costs(tile, device, dtype)
                solve = per_read * unique.shape[0] <= min(direct, per_read * unique.shape[1])
            if transfers is not None or not solve:
                transfer = transfer_matrix(tile, device, dtype) if transfers is None else transfers[index]
                ideal_rows = tile.conductance[tile.used_rows] * device.read_voltage
                real = unique.double() @ transfer
                ideal = unique.double() @ ideal_rows if measure_nf else None
            else:
                real, ideal = _read_cycles(tile, unique, device, dtype, generator=generator)
            outputs, tile_distortion = _decode_cycles(tile, real, ideal if measure_nf else None, device, num_outputs)
            per_plane = (outputs if inverse is None else outputs[inverse]).reshape(bits, x.shape[0], num_outputs)
            result += sign * torch.einsum("b,bno->no", significance, per_plane)
            distortion.add(tile_distortion)
    return result, distortion


def cell_current_loss(
    tile: Tile, x: torch.Tensor, device: CrossbarDevice, generator: torch.Generator | None = None,
    dtype: torch.dtype = SIMULATION_DTYPE,
) -> CellLoss:
    """Current each cell of ``tile`` loses to parasitics over the read cycles of signed
    integer inputs (N, K), as :func:`simulate_matmul` reads them (distinct bit-planes
    once, unless under read noise). The crossbar is linear, so the loss summed over
    reads is the loss of the reads' summed voltages: one solve instead of one per read.
    Under read noise every read has conductances of its own, so each is solved."""
    loss = CellLoss(torch.zeros_like(tile.conductance))
    for _, part in _signed_parts(x):
        planes = _tile_planes(tile, part, device.activation_bits)
        if device.read_noise:
            _read_cycles(tile, planes, device, dtype, loss, generator)
            continue
        unique = torch.unique(planes, dim=0)
        voltages = _tile_voltages(tile, unique.sum(0, keepdim=True), device, dtype)
        conductance = tile.conductance.to(dtype)
        real = solve_fixed_point(conductance, voltages, device.r_wordline, device.r_bitline)
        loss.total += (ideal_cell_currents(conductance, voltages) - real)[0].double()
        loss.cycles += unique.shape[0]
    return loss


def attenuation_map(
    tile: Tile, row_density: torch.Tensor, device: CrossbarDevice, samples: int,
    generator: torch.Generator, dtype: torch.dtype = SIMULATION_DTYPE,
) -> torch.Tensor:
    """Share of its ideal current each cell keeps (T, T), averaged over random read cycles.

    Each used row's bit is 1 with its measured probability ``row_density[input]``.
    Cells that never see a voltage keep a factor of 1.
    """
    density = row_density[tile.row_input[tile.used_rows]].double()
    planes = torch.bernoulli(density.expand(samples, -1), generator=generator)
    conductance = tile.conductance.to(dtype)
    real_sum = torch.zeros_like(tile.conductance)
    ideal_sum = torch.zeros_like(tile.conductance)
    for start, stop in _chunks(samples, tile):
        voltages = _tile_voltages(tile, planes[start:stop], device, dtype)
        real_sum += solve_fixed_point(conductance, voltages, device.r_wordline, device.r_bitline).sum(0).double()
        ideal_sum += ideal_cell_currents(conductance, voltages).sum(0).double()
    return torch.where(ideal_sum > 0, real_sum / ideal_sum.clamp_min(torch.finfo(torch.float64).tiny), 1.0)


def _tile_sum(
    tiles: list[Tile], cell_values: list[torch.Tensor], num_outputs: int, num_inputs: int, power: int
) -> torch.Tensor:
    """(O, K): the tiles' :meth:`Tile.decoded_weights` of ``cell_values``, placed at their inputs."""
    total = torch.zeros(num_outputs, num_inputs, dtype=torch.float64)
    for tile, values in zip(tiles, cell_values):
        total[:, tile.row_input[tile.used_rows]] += tile.decoded_weights(values, num_outputs, power).T
    return total


def effective_weights(
    tiles: list[Tile], attenuation: list[torch.Tensor] | None, num_outputs: int, num_inputs: int,
    device: CrossbarDevice,
) -> torch.Tensor:
    """Integer-unit weights (O, K) the tiles realise when each cell's conductance is
    scaled by its attenuation (``None``: ideal wires, which decodes back to ``Q`` on an
    exactly programmed device)."""
    factors = [1.0] * len(tiles) if attenuation is None else attenuation
    values = [tile.conductance * factor * device.read_voltage for tile, factor in zip(tiles, factors)]
    return _tile_sum(tiles, values, num_outputs, num_inputs, power=1)


def transfer_weights(
    tiles: list[Tile], transfers: list[torch.Tensor], num_outputs: int, num_inputs: int
) -> torch.Tensor:
    """Integer-unit weights (O, K) the tiles realise through their transfer matrices:
    without an ADC (and without read noise) the decoded, shift-added output is linear
    in the input, so ``x @ this.T`` is exactly what reading every bit-plane gives."""
    values = []
    for tile, transfer in zip(tiles, transfers):
        per_row = torch.zeros_like(tile.conductance)  # column currents per row at V_read, placed at the used rows
        per_row[tile.used_rows] = transfer
        values.append(per_row)
    return _tile_sum(tiles, values, num_outputs, num_inputs, power=1)


def read_noise_variance(
    tiles: list[Tile], attenuation: list[torch.Tensor] | None, num_outputs: int, num_inputs: int,
    device: CrossbarDevice,
) -> torch.Tensor:
    """(O, K): variance that one read cycle with input bit k at 1 adds to output o, in
    squared integer units: Σ over o's columns of (read_noise · G · V_read · weight)².
    Read noise is independent per cell and read, so a bit-serial product's output
    variance is Σ_b 4^b Σ_k bit_bk · this (see :func:`bit_serial_variance`)."""
    factors = [1.0] * len(tiles) if attenuation is None else attenuation
    values = [tile.conductance * factor * device.read_voltage * device.read_noise for tile, factor in zip(tiles, factors)]
    return _tile_sum(tiles, values, num_outputs, num_inputs, power=2)


def bit_serial_variance(x: torch.Tensor, per_read: torch.Tensor, bits: int) -> torch.Tensor:
    """Output variance (N, O) of bit-serial products of integer inputs (N, K) whose every
    read adds ``per_read`` (O, K) per active input bit; plane b counts 4^b (shift-add)."""
    planes = _bit_planes(x.abs(), bits).double()
    squared_significance = torch.einsum("b,bnk->nk", 4.0 ** torch.arange(bits, dtype=torch.float64), planes)
    return squared_significance @ per_read.T


__all__ = [
    "TRANSFER_METHODS", "CellLoss", "Distortion", "attenuation_map", "bit_serial_variance", "cell_current_loss",
    "effective_weights",
    "read_noise_variance", "simulate_matmul", "transfer_matrix", "transfer_weights",
]
