"""Currents of a resistive crossbar with parasitic wire resistance.

Topology (see :mod:`dpfl.cim.device`): wordline ``i`` is driven at voltage ``V_i``
through one wire segment into cross-point ``(i, 0)`` and continues through a segment
per column; bitline ``j`` runs down through a segment per row and one more segment
into its sense amplifier at virtual ground below row ``R - 1``. The cell at
``(i, j)`` joins wordline node ``(i, j)`` and bitline node ``(i, j)`` with
conductance ``G_ij``. Devices are linear (ohmic), so the network is a linear system.

Two solvers, hand-written because the reference simulators (aihwkit, CrossSim,
NeuroSim, MemTorch) do not install with this project's torch:

* :class:`NodalSolver`, the reference: exact nodal analysis, one node per wire
  cross-point (2·R·C unknowns), a sparse symmetric positive-definite system that is
  LU-factorised once per programmed tile and back-solved per input vector.
* :func:`solve_fixed_point`, the fast one: the wordline/bitline cumulative-sum
  fixed-point iteration (CrossSim's ``solve_mvm`` scheme) batched over inputs in
  torch, run to convergence, so it reaches the nodal solution, not an approximation.

A wire resistance of 0 is an ideal wire; with both wires ideal every cell sees its
full input voltage and both solvers return the ideal currents exactly.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import splu

# Convergence of the fixed point: largest change of any cell voltage, relative to the
# largest input voltage. In double precision 1e-10 keeps the currents within ~1e-9 of
# the nodal solution; single precision stalls at its rounding noise (~1e-6 after the
# cumulative sums of a 512-cell line), so it stops at 1e-5.
FIXED_POINT_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
FIXED_POINT_MAX_ITERATIONS = 2000
# Relaxation below this means the tile is too resistive for the iteration to be useful.
FIXED_POINT_MIN_RELAXATION = 1e-3


class CircuitDivergedError(RuntimeError):
    """The fixed-point iteration did not converge even with heavy relaxation."""


def ideal_cell_currents(conductance: torch.Tensor, voltages: torch.Tensor) -> torch.Tensor:
    """Cell currents (B, R, C) of ideal wires: every cell sees its row's input voltage.
    ``conductance`` is one tile (R, C) or one per input (B, R, C)."""
    return voltages[:, :, None] * conductance


class _FixedPointWorkspace:
    """Preallocated (B, R, C) buffers: the iteration runs in place, because allocating
    fresh tensors of this size every step costs more than the arithmetic (page faults)."""

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype) -> None:
        self.currents, self.scratch, self.drop, self.bitline = (torch.empty(shape, dtype=dtype) for _ in range(4))

    def cell_voltages(
        self, cell_voltages: torch.Tensor, conductance: torch.Tensor, voltages: torch.Tensor,
        r_wordline: float, r_bitline: float,
    ) -> torch.Tensor:
        """Cell voltages implied by the currents of ``cell_voltages`` flowing through the wires.

        Wordline segment ``j`` (from node ``j - 1``, or the driver, to node ``j``) carries
        the currents of cells ``j..C-1``; a wordline node sits below its driver by the
        cumulative sum of the drops of the segments before it. Bitline segment below node
        ``i`` carries the currents of cells ``0..i``; a bitline node sits above ground by
        the sum of the drops of the segments below it. Returns a view of ``self.drop``.
        """
        currents, scratch, drop, bitline = self.currents, self.scratch, self.drop, self.bitline
        torch.mul(conductance, cell_voltages, out=currents)
        # Reverse cumulative sum along the wordline: total - cumsum + self.
        torch.cumsum(currents, -1, out=scratch)
        torch.sub(currents, scratch, out=scratch)
        scratch.add_(currents.sum(-1, keepdim=True))
        torch.cumsum(scratch, -1, out=drop)
        # Segment currents down the bitline, then their reverse cumulative sum.
        torch.cumsum(currents, -2, out=scratch)
        torch.cumsum(scratch, -2, out=bitline)
        torch.sub(scratch, bitline, out=bitline)
        bitline.add_(scratch.sum(-2, keepdim=True))
        drop.mul_(-r_wordline).add_(bitline, alpha=-r_bitline).add_(voltages[:, :, None])
        return drop


def solve_fixed_point(
    conductance: torch.Tensor,
    voltages: torch.Tensor,
    r_wordline: float,
    r_bitline: float,
    tolerance: float | None = None,
) -> torch.Tensor:
    """Cell currents (B, R, C) for input voltages (B, R) on a tile of conductances (R, C),
    or on one realisation of the tile per input (B, R, C) (read noise).

    Iterates ``v <- v + gamma * (f(G * v) - v)`` on the cell voltages, starting from the
    ideal ones, until no cell voltage would move by more than ``tolerance`` times the
    largest input (default: :data:`FIXED_POINT_TOLERANCE` of the dtype). Runs in the
    dtype of ``conductance`` (float32 or float64).

    Why this relaxation: ``f(G * v) = V - K G v`` with ``K`` the (symmetric, positive)
    map from cell currents to wire drops, so the iteration matrix ``-K G`` has real
    eigenvalues in ``[-rho, 0]``. Plain iteration (gamma = 1) contracts by ``rho``, which
    exceeds 1 on large low-resistance tiles; ``gamma = 2 / (2 + rho)`` contracts by
    ``rho / (2 + rho) < 1`` always. ``rho`` is bounded by the infinity norm of ``K G``:
    the largest wire drop when every cell sees 1 V. Halving gamma and restarting
    remains as a guard against rounding trouble. With one tile per input, the bound is
    taken on their elementwise maximum, which bounds every one of them (the drops grow
    with every conductance).
    """
    if r_wordline == 0 and r_bitline == 0:
        return ideal_cell_currents(conductance, voltages)
    voltages = voltages.to(conductance.dtype)
    if tolerance is None:
        tolerance = FIXED_POINT_TOLERANCE[conductance.dtype]
    v_max = float(voltages.abs().max()) if voltages.numel() else 0.0
    if v_max == 0.0:
        return torch.zeros(voltages.shape[0], *conductance.shape[-2:], dtype=conductance.dtype)
    tile = conductance if conductance.dim() == 2 else conductance.amax(0)
    unit = (1, *tile.shape)
    all_cells_at_one_volt = torch.ones(unit, dtype=conductance.dtype)
    no_input = torch.zeros(1, tile.shape[0], dtype=conductance.dtype)
    largest_drop = -float(
        _FixedPointWorkspace(unit, conductance.dtype)
        .cell_voltages(all_cells_at_one_volt, tile, no_input, r_wordline, r_bitline)
        .min()
    )
    relaxation = 2.0 / (2.0 + largest_drop)

    shape = (voltages.shape[0], *tile.shape)
    workspace = _FixedPointWorkspace(shape, conductance.dtype)
    cell_voltages = torch.empty(shape, dtype=conductance.dtype)
    while relaxation >= FIXED_POINT_MIN_RELAXATION:
        cell_voltages.copy_(voltages[:, :, None].expand(shape))
        smallest_change = float("inf")
        for _ in range(FIXED_POINT_MAX_ITERATIONS):
            target = workspace.cell_voltages(cell_voltages, conductance, voltages, r_wordline, r_bitline)
            step = target.sub_(cell_voltages)
            cell_voltages.add_(step, alpha=relaxation)
            change = float(step.abs_().max())
            if change <= tolerance * v_max:
                # Converged: one more evaluation at the final voltages gives the currents.
                return conductance * workspace.cell_voltages(cell_voltages, conductance, voltages, r_wordline, r_bitline)
            # The max-norm may rise transiently while contracting; a clear rise (or NaN) is divergence.
            if not change <= 4 * smallest_change:
                break
            smallest_change = min(smallest_change, change)
        relaxation /= 2
    raise CircuitDivergedError(
        f"crossbar fixed point did not converge for a {tuple(conductance.shape)} tile "
        f"(wire resistance {r_wordline:g}/{r_bitline:g} ohm); the tile is too resistive"
    )


class NodalSolver:
    """Exact nodal analysis of one programmed tile: factorise once, solve per input.

    Unknowns are the voltages of the wordline and bitline cross-point nodes; a line
    with zero wire resistance has no unknowns (its nodes are its driver, or ground).
    """

    def __init__(self, conductance: np.ndarray, r_wordline: float, r_bitline: float) -> None:
        self.conductance = np.asarray(conductance, dtype=np.float64)
        rows, cols = self.conductance.shape
        cells = rows * cols
        n_wordline = cells if r_wordline > 0 else 0
        n_bitline = cells if r_bitline > 0 else 0
        self.num_unknowns = n = n_wordline + n_bitline
        source = n + np.arange(rows)  # node of row i's driver
        ground = n + rows
        grid = np.arange(cells).reshape(rows, cols)
        self._wordline_nodes = grid if n_wordline else np.broadcast_to(source[:, None], (rows, cols))
        self._bitline_nodes = n_wordline + grid if n_bitline else np.full((rows, cols), ground)

        edges = [(self._wordline_nodes.ravel(), self._bitline_nodes.ravel(), self.conductance.ravel())]
        if n_wordline:
            w = self._wordline_nodes
            g = np.full(rows * cols, 1.0 / r_wordline)
            edges.append((np.concatenate([source, w[:, :-1].ravel()]), np.concatenate([w[:, 0], w[:, 1:].ravel()]), g))
        if n_bitline:
            b = self._bitline_nodes
            g = np.full(rows * cols, 1.0 / r_bitline)
            edges.append((np.concatenate([b[:-1].ravel(), b[-1]]), np.concatenate([b[1:].ravel(), np.full(cols, ground)]), g))
        a, b, g = (np.concatenate(parts) for parts in zip(*edges))
        size = ground + 1
        laplacian = sp.coo_matrix(
            (np.concatenate([g, g, -g, -g]), (np.concatenate([a, b, a, b]), np.concatenate([a, b, b, a]))),
            shape=(size, size),
        ).tocsc()
        self._source_coupling = -laplacian[:n, n : n + rows]
        # The matrix is symmetric: a minimum-degree ordering on A^T + A keeps the fill low.
        self._lu = splu(laplacian[:n, :n].tocsc(), permc_spec="MMD_AT_PLUS_A") if n else None

    def cell_currents(self, voltages: np.ndarray) -> np.ndarray:
        """Cell currents (B, R, C) for input voltages (B, R)."""
        voltages = np.asarray(voltages, dtype=np.float64)
        batch, rows = voltages.shape
        nodes = np.zeros((batch, self.num_unknowns + rows + 1))
        nodes[:, self.num_unknowns : self.num_unknowns + rows] = voltages
        if self._lu is not None:
            nodes[:, : self.num_unknowns] = self._lu.solve(np.asarray(self._source_coupling @ voltages.T)).T
        return self.conductance * (nodes[:, self._wordline_nodes] - nodes[:, self._bitline_nodes])
