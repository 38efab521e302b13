"""Placing a quantised weight matrix on crossbar tiles, and reading it back.

A layer is a matrix product ``y = x · Qᵀ`` with integer weights ``Q`` (outputs × inputs)
and unsigned integer inputs ``x`` applied bit-serially. Each weight magnitude is split
into ``cells_per_weight`` slices of ``bits_per_cell`` bits; a signed weight occupies a
differential column pair per slice (positive part in one column, negative part in the
other), so the off-state conductance cancels in the difference. A tile holds every
slice of ``outputs_per_tile`` outputs for up to ``tile_size`` inputs, laid out
bit-major: all columns of one slice significance sit next to each other.

Where things sit is the mapping:

* ``naive``: most significant slices next to the drivers (column 0), inputs in their
  natural order from the top row.
* ``mdm`` (Manhattan Distance Mapping): least significant slices, the dense ones for
  bell-shaped weights, next to the drivers; rows ordered so that the total Manhattan
  distance from active cells to the sense amplifiers is smallest. A row's position
  changes the bitline part of the distance of each of its active cells equally, so
  (rearrangement inequality) the optimum puts the rows with the most expected active
  cells, weighted by how often their input bit is 1, nearest the sense amplifiers.

* ``sw-mdm`` (significance-weighted MDM, this project's): MDM's cost weighs every
  active cell alike, but a cell's lost current enters the output multiplied by its
  slice significance 2^(slice·bits_per_cell), so moving the most significant columns
  away from the drivers can raise the output error while NF falls. Here every cell
  counts with its expected current times its significance, ``a = level · 2^shift ·
  density``. The Manhattan cost Σ a·((column + 1) + (rows - row)) splits into a
  column part and a row part, so (rearrangement inequality again) it is minimised
  exactly by putting the differential column pairs with the largest Σ a next to the
  drivers and the rows with the largest Σ a next to the sense amplifiers. Pairs stay
  adjacent so that the off-state currents of their two columns see the same wires
  and still cancel.

* ``gf-mdm`` (gain-free MDM, this project's): what costs accuracy is the distortion a
  GroupNorm after the layer cannot divide out, the part left after the best common
  gain (the gain-free error, :func:`dpfl.cim.metrics.relative_errors`), not the size
  of the loss. Currents cause the wire drops, significance decides what a drop
  costs. Along a wordline the voltage falls fastest next to the driver and hardly at
  the far end, where every column loses about the same share: a common gain. So the
  pairs with the most significance-weighted current (the sparse, most significant
  slices of bell-shaped weights) go farthest from the drivers, the light, dense
  low-order pairs next to them (as MDM does, by slice). Rows keep sw-MDM's order:
  the most significance-weighted current nearest the sense amplifiers, where the
  bitline drop is smallest. (Measured on a trained ResNet-10, docs/cim.md: the
  order that lowers the gain-free error most among the sortings tried.)

A row permutation is applied to the input vector too, so mapping never changes the
ideal result; only the parasitic distortion differs. Programming a tile realises its
target conductances on the device (:func:`dpfl.cim.nonideal.program`): programming
noise, stuck cells and drift are drawn per tile from the caller's generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpfl.cim.device import CrossbarDevice
from dpfl.cim.nonideal import compensation_factor, program
from dpfl.cim.names import MAPPINGS
from dpfl.errors import UsageError


def quantise_weights(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output quantisation of (O, K) weights to signed ``bits``-bit magnitudes.

    Returns integer weights (O, K) in [-(2^bits - 1), 2^bits - 1] and the step per output.
    """
    top = 2**bits - 1
    step = weight.abs().amax(dim=1).clamp_min(torch.finfo(weight.dtype).tiny) / top
    return torch.round(weight / step[:, None]).clamp(-top, top).to(torch.int64), step


def slice_magnitudes(magnitude: torch.Tensor, device: CrossbarDevice) -> torch.Tensor:
    """Cell levels (..., S) of non-negative integers, slice 0 least significant."""
    shifts = torch.arange(device.cells_per_weight) * device.bits_per_cell
    return (magnitude[..., None] >> shifts) & device.cell_levels


@dataclass
class Tile:
    """One programmed crossbar and which logical rows and outputs it serves.

    ``row_input[r]`` is the layer input feeding physical row ``r`` (-1: unused row, held
    at 0 V). ``column_output[c]`` is the layer output a physical column contributes to
    (-1: unused column) and ``column_weight[c]`` the factor that turns that column's
    current at read voltage into integer units: ±2^(slice·bits_per_cell) / (ΔG·V_read),
    ΔG being the conductance step of one level, times the tile's drift compensation.
    ``conductance`` is what the device holds at inference time (targets plus
    programming noise, stuck cells and drift).
    """

    conductance: torch.Tensor  # (T, T) siemens, float64
    row_input: torch.Tensor  # (T,) int64
    column_output: torch.Tensor  # (T,) int64
    column_weight: torch.Tensor  # (T,) float64

    @property
    def used_rows(self) -> torch.Tensor:
        return (self.row_input >= 0).nonzero().squeeze(1)

    @property
    def used_columns(self) -> torch.Tensor:
        return (self.column_output >= 0).nonzero().squeeze(1)

    def decoded_weights(self, cell_values: torch.Tensor, num_outputs: int, power: int = 1) -> torch.Tensor:
        """Per-cell values (T, T) times their column's weight, raised to ``power`` and
        summed per used row and output: (used rows, num_outputs). With ``conductance ·
        V_read`` as values, the integer weights the tile realises on ideal wires; with
        power 2, what independent per-cell fluctuations add to an output's variance."""
        rows, columns = self.used_rows, self.used_columns
        per_column = (cell_values[rows][:, columns] * self.column_weight[columns]) ** power
        per_output = torch.zeros(rows.numel(), num_outputs, dtype=torch.float64)
        return per_output.index_add_(1, self.column_output[columns], per_column)


def map_matrix(
    q: torch.Tensor, device: CrossbarDevice, mapping: str, row_density: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> list[Tile]:
    """Split signed integer weights (O, K) into tiles laid out by ``mapping`` and program them.

    ``row_density`` (K,) is how often each input bit is 1 (measured on data); MDM uses it
    to weigh a row's active cells. Tiles whose weights are all zero (off-diagonal blocks
    of grouped convolutions) are not programmed. ``generator`` draws the device's
    programming non-idealities (needed only if the device has any).
    """
    if mapping not in MAPPINGS:
        raise UsageError(f"unknown mapping {mapping!r}; choose one of {', '.join(MAPPINGS)}")
    outputs, inputs = q.shape
    size, per_tile = device.tile_size, device.outputs_per_tile
    density = torch.ones(inputs, dtype=torch.float64) if row_density is None else row_density.double()
    tiles = []
    for row_start in range(0, inputs, size):
        for out_start in range(0, outputs, per_tile):
            block = q[out_start : out_start + per_tile, row_start : row_start + size]
            if not block.any():
                continue
            target = _layout_tile(block, out_start, row_start, density[row_start : row_start + size], device, mapping)
            tiles.append(target if device.programs_exactly else _program(target, device, generator))
    return tiles


def _program(target: Tile, device: CrossbarDevice, generator: torch.Generator | None) -> Tile:
    """The tile as the device realises it, its outputs drift-compensated if asked."""
    if generator is None:
        raise ValueError("programming a device with non-idealities needs a generator")
    programmed = program(target.conductance, device, generator)
    column_weight = target.column_weight
    if device.drift_compensation:
        outputs = int(target.column_output.max()) + 1
        reference = target.decoded_weights(programmed.at_programming, outputs)
        drifted = target.decoded_weights(programmed.at_inference, outputs)
        column_weight = column_weight * compensation_factor(reference, drifted)
    return Tile(programmed.at_inference, target.row_input, target.column_output, column_weight)


def _layout_tile(
    block: torch.Tensor, out_start: int, row_start: int, density: torch.Tensor,
    device: CrossbarDevice, mapping: str,
) -> Tile:
    """The target tile of one weight block: which cell holds which level."""
    size, slices = device.tile_size, device.cells_per_weight
    n_out, n_rows = block.shape
    # levels[k, s, o, sign]: the cell of input k, slice s, output o, sign (0 = +, 1 = -).
    levels = torch.stack(
        [slice_magnitudes(block.clamp_min(0), device), slice_magnitudes((-block).clamp_min(0), device)], dim=-1
    ).permute(1, 2, 0, 3)
    pair_levels = levels.reshape(n_rows, slices * n_out, 2)  # pairs slice-major: pair p = (p // n_out, p % n_out)
    pair_slice = torch.arange(slices * n_out) // n_out
    significance = 2.0 ** (pair_slice * device.bits_per_cell).double()
    # Expected current of each cell in level units (sw-mdm weighs it by its significance).
    expected = pair_levels.double() * density[:, None, None]
    pair_load = expected.sum((0, 2)) * significance
    if mapping == "naive":  # most significant slice first, next to the drivers
        pair_order = torch.argsort(-pair_slice, stable=True)
    elif mapping == "mdm":  # least significant (densest) slice first
        pair_order = torch.arange(slices * n_out)
    elif mapping == "sw-mdm":  # the pairs carrying the most significance-weighted current first
        pair_order = torch.argsort(pair_load, descending=True, stable=True)
    else:  # gf-mdm: the pairs carrying the most significance-weighted current last, at the flat far end
        pair_order = torch.argsort(pair_load, stable=True)
    logical = pair_levels[:, pair_order].reshape(n_rows, -1)  # columns: (pair in placement order, sign)
    used_columns = logical.shape[1]

    level_grid = torch.zeros(size, size, dtype=torch.int64)
    row_input = torch.full((size,), -1, dtype=torch.int64)
    if mapping == "naive":
        rows = torch.arange(n_rows)
    else:
        if mapping == "mdm":
            cost = (logical > 0).sum(1).double() * density
        else:  # sw-mdm, gf-mdm
            cost = (expected.sum(2) * significance).sum(1)
        # Stable ascending sort, then bottom-aligned: the largest cost sits in the last
        # row, next to the sense amplifiers; unused rows (cost 0) fill the top.
        rows = size - n_rows + torch.argsort(torch.argsort(cost, stable=True))
    level_grid[rows, :used_columns] = logical
    row_input[rows] = row_start + torch.arange(n_rows)

    placed_pair = pair_order.repeat_interleave(2)
    sign = 1.0 - 2.0 * (torch.arange(used_columns) % 2)
    column_output = torch.full((size,), -1, dtype=torch.int64)
    column_output[:used_columns] = out_start + placed_pair % n_out
    column_weight = torch.zeros(size, dtype=torch.float64)
    level_step = (device.g_on - device.g_off) / device.cell_levels
    column_weight[:used_columns] = sign * significance[placed_pair] / (level_step * device.read_voltage)
    return Tile(
        conductance=device.level_conductance(level_grid.double()),
        row_input=row_input,
        column_output=column_output,
        column_weight=column_weight,
    )


__all__ = ["Tile", "map_matrix", "quantise_weights", "slice_magnitudes"]
