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

A row permutation is applied to the input vector too, so mapping never changes the
ideal result; only the parasitic distortion differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpfl.cim.device import CrossbarDevice
from dpfl.errors import UsageError

MAPPINGS = ("naive", "mdm")


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
    ΔG being the conductance step of one level.
    """

    conductance: torch.Tensor  # (T, T) siemens, float64
    row_input: torch.Tensor  # (T,) int64
    column_output: torch.Tensor  # (T,) int64
    column_weight: torch.Tensor  # (T,) float64
    active_cells: torch.Tensor  # (T, T) bool: cells above the off level

    @property
    def used_rows(self) -> torch.Tensor:
        return (self.row_input >= 0).nonzero().squeeze(1)

    @property
    def used_columns(self) -> torch.Tensor:
        return (self.column_output >= 0).nonzero().squeeze(1)


def map_matrix(
    q: torch.Tensor, device: CrossbarDevice, mapping: str, row_density: torch.Tensor | None = None
) -> list[Tile]:
    """Split signed integer weights (O, K) into tiles laid out by ``mapping``.

    ``row_density`` (K,) is how often each input bit is 1 (measured on data); MDM uses it
    to weigh a row's active cells. Tiles whose weights are all zero (off-diagonal blocks
    of grouped convolutions) are not programmed.
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
            tiles.append(
                _program_tile(block, out_start, row_start, density[row_start : row_start + size], device, mapping)
            )
    return tiles


def _program_tile(
    block: torch.Tensor, out_start: int, row_start: int, density: torch.Tensor,
    device: CrossbarDevice, mapping: str,
) -> Tile:
    size, slices = device.tile_size, device.cells_per_weight
    n_out, n_rows = block.shape
    # levels[k, s, o, sign]: the cell of input k, slice s, output o, sign (0 = +, 1 = -).
    levels = torch.stack(
        [slice_magnitudes(block.clamp_min(0), device), slice_magnitudes((-block).clamp_min(0), device)], dim=-1
    ).permute(1, 2, 0, 3)
    if mapping == "naive":
        levels = levels.flip(1)  # most significant slice first, next to the drivers
        slice_of_group = torch.arange(slices - 1, -1, -1)
    else:
        slice_of_group = torch.arange(slices)
    used_columns = slices * n_out * 2
    logical = levels.reshape(n_rows, used_columns)  # columns bit-major: (slice group, output, sign)

    level_grid = torch.zeros(size, size, dtype=torch.int64)
    row_input = torch.full((size,), -1, dtype=torch.int64)
    if mapping == "naive":
        rows = torch.arange(n_rows)
    else:
        expected_active = (logical > 0).sum(1).double() * density
        # Stable ascending sort, then bottom-aligned: the largest cost sits in the last
        # row, next to the sense amplifiers; unused rows (cost 0) fill the top.
        rows = size - n_rows + torch.argsort(torch.argsort(expected_active, stable=True))
    level_grid[rows, :used_columns] = logical
    row_input[rows] = row_start + torch.arange(n_rows)

    group = torch.arange(used_columns) // (2 * n_out)
    sign = 1.0 - 2.0 * (torch.arange(used_columns) % 2)
    column_output = torch.full((size,), -1, dtype=torch.int64)
    column_output[:used_columns] = out_start + (torch.arange(used_columns) // 2) % n_out
    column_weight = torch.zeros(size, dtype=torch.float64)
    level_step = (device.g_on - device.g_off) / device.cell_levels
    column_weight[:used_columns] = (
        sign * 2.0 ** (slice_of_group[group] * device.bits_per_cell).double() / (level_step * device.read_voltage)
    )
    return Tile(
        conductance=device.level_conductance(level_grid.double()),
        row_input=row_input,
        column_output=column_output,
        column_weight=column_weight,
        active_cells=level_grid > 0,
    )


__all__ = ["MAPPINGS", "Tile", "map_matrix", "quantise_weights", "slice_magnitudes"]
