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
* :func:`row_transfer`, the tile's whole linear map at once: the column currents per
  volt on each wordline alone, by a direct block elimination of the same nodal
  system, row by row (cost independent of how resistive the tile is).

A wire resistance of 0 is an ideal wire; with both wires ideal every cell sees its
full input voltage and both solvers return the ideal currents exactly.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch
from scipy.linalg import cho_solve
from scipy.linalg.blas import dsymm
from scipy.linalg.lapack import dpotrf, dpotri
from scipy.sparse.linalg import splu

# Convergence of the fixed point: largest change of any cell voltage, relative to the
# largest input voltage. In double precision 1e-10 keeps the currents within ~1e-9 of
# the nodal solution; single precision stalls at its rounding noise (~1e-6 after the
# cumulative sums of a 512-cell line), so it stops at 1e-5.
FIXED_POINT_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
FIXED_POINT_MAX_ITERATIONS = 2000
# Wordline solves held at once by the direct transfer elimination (float64, 32 MB).
WORDLINE_SOLVE_FLOATS = 2**22
# Relaxation below this means the tile is too resistive for the iteration to be useful.
FIXED_POINT_MIN_RELAXATION = 1e-3


class CircuitDivergedError(RuntimeError):
    """The fixed-point iteration did not converge even with heavy relaxation."""


def ideal_cell_currents(conductance: torch.Tensor, voltages: torch.Tensor) -> torch.Tensor:
    """Cell currents (B, R, C) of ideal wires: every cell sees its row's input voltage.
    ``conductance`` is one tile (R, C) or one per input (B, R, C)."""
    return voltages[:, :, None] * conductance


# Rows summed at once by one small matrix product in :func:`_cumsum_rows`.
ROW_BLOCK = 16


def _cumsum_rows(source: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``torch.cumsum(source, -2, out=out)`` for (B, R, C) tensors, written by hand because
    torch's cumulative sum along a dimension other than the last runs ~5x slower than
    memory speed on CPU (it dominated the fixed point). Rows go in blocks of
    :data:`ROW_BLOCK`: a lower-triangular matrix of ones sums within each block in one
    batched matrix product, then each block adds the running total of the blocks above."""
    rows = source.shape[-2]
    if rows % ROW_BLOCK:
        return torch.cumsum(source, -2, out=out)
    blocks = source.shape[0], rows // ROW_BLOCK, ROW_BLOCK, source.shape[-1]
    lower = torch.ones(ROW_BLOCK, ROW_BLOCK, dtype=source.dtype).tril_()
    blocked = torch.matmul(lower, source.view(blocks), out=out.view(blocks))
    block_totals = blocked[:, :, -1, :].cumsum(1)
    blocked[:, 1:].add_(block_totals[:, :-1, None, :])
    return out


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
        _cumsum_rows(currents, scratch)
        _cumsum_rows(scratch, bitline)
        torch.sub(scratch, bitline, out=bitline)
        bitline.add_(scratch.sum(-2, keepdim=True))
        drop.mul_(-r_wordline).add_(bitline, alpha=-r_bitline).add_(voltages[:, :, None])
        return drop


def largest_wire_drop(conductance: torch.Tensor, r_wordline: float, r_bitline: float) -> float:
    """Largest wire drop (volts) on a tile (R, C) when every cell sees 1 V: the bound
    ``rho`` on the spectral radius of the fixed-point iteration (see :func:`solve_fixed_point`)."""
    unit = (1, *conductance.shape)
    all_cells_at_one_volt = torch.ones(unit, dtype=conductance.dtype)
    no_input = torch.zeros(1, conductance.shape[0], dtype=conductance.dtype)
    return -float(
        _FixedPointWorkspace(unit, conductance.dtype)
        .cell_voltages(all_cells_at_one_volt, conductance, no_input, r_wordline, r_bitline)
        .min()
    )


def fixed_point_iterations(largest_drop: float, dtype: torch.dtype) -> float:
    """Iterations the relaxed fixed point needs at most (no restart) to converge on a
    tile with :func:`largest_wire_drop` ``largest_drop``: it contracts by
    ``rho / (2 + rho)`` per step down to :data:`FIXED_POINT_TOLERANCE`."""
    contraction = largest_drop / (2.0 + largest_drop)
    if contraction <= 0:
        return 1.0
    return max(1.0, math.log(FIXED_POINT_TOLERANCE[dtype]) / math.log(contraction))


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
    relaxation = 2.0 / (2.0 + largest_wire_drop(tile, r_wordline, r_bitline))

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
            smallest_step, largest_step = torch.aminmax(step)
            change = max(float(largest_step), -float(smallest_step))
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


def _wordline_solves(conductance: np.ndarray, g_w: float) -> np.ndarray:
    """``T_k^-1 [G_k | g_w e_0]`` (R, C, C + 1) for every wordline ``k`` at once, with
    ``T_k`` (C, C) the tridiagonal Laplacian of wordline ``k``'s segments (driver
    segment included, far end open) plus ``G_k = diag(row k's cells)``.

    The Thomas algorithm, vectorised over the rows; stable without pivoting because
    every ``T_k`` is diagonally dominant. (scipy's ``solveh_banded`` does one row per
    call, which costs more in call overhead than in arithmetic here.)"""
    rows, cols = conductance.shape
    diagonal = conductance + 2 * g_w  # (R, C)
    diagonal[:, -1] -= g_w
    # Right-hand sides: the identity scaled by the cells, and the driver column.
    sides = np.zeros((rows, cols, cols + 1))
    sides[:, np.arange(cols), np.arange(cols)] = conductance
    sides[:, 0, cols] = g_w
    ratio = np.empty((rows, cols))  # c'_j of the forward sweep (off-diagonal is -g_w)
    pivot = diagonal[:, 0]
    ratio[:, 0] = -g_w / pivot
    sides[:, 0] /= pivot[:, None]
    for j in range(1, cols):
        pivot = diagonal[:, j] + g_w * ratio[:, j - 1]
        ratio[:, j] = -g_w / pivot
        sides[:, j] += g_w * sides[:, j - 1]
        sides[:, j] /= pivot[:, None]
    for j in range(cols - 2, -1, -1):
        sides[:, j] -= ratio[:, j, None] * sides[:, j + 1]
    return sides


def row_transfer(conductance: np.ndarray, r_wordline: float, r_bitline: float) -> np.ndarray:
    """Column currents (R, C), float64, per volt on wordline ``i`` alone (every other
    driver at 0 V): by superposition, inputs ``V`` (B, R) give column currents ``V @ this``.

    Exact nodal analysis, needing both wires resistive. Wordline ``k`` is a chain, so
    its nodes are eliminated by a tridiagonal solve: ``W_k = T_k^-1 (g_w V_k e_0 + G_k B_k)``
    (:func:`_wordline_solves`). What remains couples bitline row ``k`` only to rows
    ``k - 1`` and ``k + 1`` (through ``g_b``):

        -g_b B_{k-1} + M_k B_k - g_b B_{k+1} = V_k h_k,
        M_k = deg_k + G_k - G_k T_k^-1 G_k,   h_k = g_w G_k T_k^-1 e_0,

    a block-tridiagonal system with symmetric positive-definite C x C blocks. Block
    elimination from the top row down (``S_k = M_k - g_b^2 S_{k-1}^-1``, right-hand
    sides carried along, one per driven row) ends at the last bitline row, whose
    nodes alone set the currents into the sense amplifiers, ``g_b B_{R-1}``: no back
    substitution. Cost about ``R C^3`` flops whatever the conductances, where the
    fixed point needs more iterations the more resistive the tile. Written by hand
    because a general sparse factorisation (:class:`NodalSolver`) fills in and
    neither exploits the chains nor stops at the last row. The symmetric blocks are
    kept as lower triangles only (LAPACK potrf/potri and BLAS symm read no more).
    """
    if not (r_wordline > 0 and r_bitline > 0):
        raise ValueError("row_transfer needs resistive wordlines and bitlines")
    conductance = np.asarray(conductance, dtype=np.float64)
    rows, cols = conductance.shape
    g_w, g_b = 1.0 / r_wordline, 1.0 / r_bitline
    diagonal = np.arange(cols)
    sides = np.zeros((cols, rows))  # one right-hand side per driven row
    schur = None
    # Wordline solves for a chunk of rows at a time bound the memory (R·C² floats at once
    # would be 1 GB at 512x512).
    chunk = max(1, WORDLINE_SOLVE_FLOATS // (cols * (cols + 1)))
    for k in range(rows):
        if k % chunk == 0:
            solved = _wordline_solves(conductance[k : k + chunk], g_w)
        cells = conductance[k]
        block = solved[k % chunk, :, :cols]
        block *= -cells[:, None]
        # Bitline node degree: row 0 has only the segment below it, the others two.
        block[diagonal, diagonal] += cells + (g_b if k == 0 else 2 * g_b)
        if schur is not None:
            factor, info = dpotrf(schur, lower=1, clean=0, overwrite_a=1)
            inverse, info = dpotri(factor, lower=1, overwrite_c=1) if info == 0 else (None, info)
            if info != 0:
                raise np.linalg.LinAlgError(f"crossbar Schur complement not positive definite (LAPACK info {info})")
            block -= g_b**2 * inverse  # the upper triangle of both is left unused
            sides[:, :k] = dsymm(g_b, inverse, sides[:, :k], lower=1)
        sides[:, k] = cells * solved[k % chunk, :, cols]
        schur = block
    factor, info = dpotrf(schur, lower=1, clean=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"crossbar Schur complement not positive definite (LAPACK info {info})")
    return g_b * cho_solve((factor, True), sides, check_finite=False).T
