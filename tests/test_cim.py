"""Unit tests of the simulated compute-in-memory device (dpfl.cim)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dpfl.cim import circuit
from dpfl.cim.circuit import NodalSolver, row_transfer, solve_fixed_point
from dpfl.cim.device import CrossbarDevice
from dpfl.cim.engine import _bit_planes, effective_weights, simulate_matmul, transfer_matrix, transfer_weights
from dpfl.cim.mapping import map_matrix, quantise_weights, slice_magnitudes
from dpfl.cim.model import calibrate, mappable_layers, quantise_activations, resolve_mode, to_crossbars
from dpfl.cim.names import MAPPINGS, MODES
from dpfl.errors import UsageError
from dpfl.task.data import load_dataset
from conftest import fit_on_digits

IDEAL = CrossbarDevice(tile_size=32, r_wordline=0.0, r_bitline=0.0)


def random_tile(rng: np.random.Generator, rows: int, cols: int, r_on: float, r_off: float) -> np.ndarray:
    return np.where(rng.random((rows, cols)) < 0.3, 1 / r_on, 1 / r_off)


def bell_shaped_integers(generator: torch.Generator, outputs: int, inputs: int, bits: int = 8) -> torch.Tensor:
    weights = torch.distributions.Laplace(0.0, 1.0).sample((outputs, inputs))
    return quantise_weights(weights.double(), bits)[0]


@pytest.mark.parametrize("size", [8, 16, 33, 64])
@pytest.mark.parametrize(
    "r_on, r_off, r_wordline, r_bitline",
    [(100e3, 10e6, 1.0, 1.0), (10e3, 1e6, 2.0, 2.0), (100e3, 10e6, 5.0, 0.5), (50e3, 5e6, 0.0, 3.0), (50e3, 5e6, 3.0, 0.0)],
)
def test_fixed_point_matches_exact_nodal_solve(size, r_on, r_off, r_wordline, r_bitline):
    rng = np.random.default_rng(size)
    conductance = random_tile(rng, size, size, r_on, r_off)
    voltages = np.where(rng.random((6, size)) < 0.5, 0.2, 0.0)
    exact = NodalSolver(conductance, r_wordline, r_bitline).cell_currents(voltages)
    fast = solve_fixed_point(torch.tensor(conductance), torch.tensor(voltages), r_wordline, r_bitline).numpy()
    assert np.abs(fast - exact).max() <= 1e-6 * np.abs(exact).max()
    exact_columns, fast_columns = exact.sum(1), fast.sum(1)
    assert np.abs(fast_columns - exact_columns).max() <= 1e-6 * np.abs(exact_columns).max()
    ideal = voltages @ conductance
    assert (exact_columns < ideal + 1e-15).all()  # parasitics only ever lose current


@pytest.mark.parametrize("rows, cols", [(1, 1), (1, 9), (9, 1), (16, 16), (20, 33)])
@pytest.mark.parametrize(
    "r_on, r_off, r_wordline, r_bitline",
    [(100e3, 10e6, 1.0, 1.0), (6e3, 9e5, 2.46, 2.46), (100e3, 10e6, 5.0, 0.5), (1e3, 1e5, 40.0, 3.0)],
)
def test_direct_transfer_matches_exact_nodal_solve(rows, cols, r_on, r_off, r_wordline, r_bitline, monkeypatch):
    """The block elimination is the nodal system solved another way: column currents
    per volt on each row alone, and by superposition any input's column currents."""
    rng = np.random.default_rng(rows * 100 + cols)
    conductance = random_tile(rng, rows, cols, r_on, r_off)
    nodal = NodalSolver(conductance, r_wordline, r_bitline)
    transfer = row_transfer(conductance, r_wordline, r_bitline)
    unit_reads = nodal.cell_currents(np.eye(rows)).sum(1)
    assert np.abs(transfer - unit_reads).max() <= 1e-10 * np.abs(unit_reads).max()
    # The wordline solves in chunks of 3 rows (memory bound) change nothing.
    monkeypatch.setattr(circuit, "WORDLINE_SOLVE_FLOATS", 3 * cols * (cols + 1))
    np.testing.assert_array_equal(row_transfer(conductance, r_wordline, r_bitline), transfer)
    voltages = np.where(rng.random((5, rows)) < 0.5, 0.2, 0.0)
    columns = nodal.cell_currents(voltages).sum(1)
    assert np.abs(voltages @ transfer - columns).max() <= 1e-10 * np.abs(columns).max()


@pytest.mark.parametrize("r_wordline, r_bitline", [(1.0, 1.0), (250.0, 0.0), (0.0, 40.0), (1e3, 3e3)])
def test_one_cell_tile_is_its_series_resistance(r_wordline, r_bitline):
    """1x1 tile: driver, one wordline segment, the cell, one bitline segment, ground."""
    g, v = 1 / 20e3, 0.2
    expected = v / (1 / g + r_wordline + r_bitline)
    conductance, voltages = np.array([[g]]), np.array([[v]])
    assert NodalSolver(conductance, r_wordline, r_bitline).cell_currents(voltages)[0, 0, 0] == pytest.approx(expected, rel=1e-13)
    fast = solve_fixed_point(torch.tensor(conductance), torch.tensor(voltages), r_wordline, r_bitline)
    assert float(fast[0, 0, 0]) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("cells, r_wordline, r_bitline, r_cell", [(64, 50.0, 20.0, 10e3), (200, 5.0, 1.0, 100e3), (7, 500.0, 0.0, 1e3)])
def test_one_row_ladder_matches_its_closed_form(cells, r_wordline, r_bitline, r_cell):
    """1xN tile: a uniform ladder of wordline segments r and shunts 1/g = R_cell + r_bitline.
    Node voltages obey V[j+1] = (2 + r g) V[j] - V[j-1] with V[N+1] = V[N] (nothing flows
    past the last cell), so V[j] = V cosh((N + 1/2 - j) θ) / cosh((N + 1/2) θ) with
    cosh θ = 1 + r g / 2, and cell j (1-based) carries g V[j]."""
    v = 0.2
    shunt = 1 / (r_cell + r_bitline)
    theta = math.acosh(1 + r_wordline * shunt / 2)
    j = np.arange(1, cells + 1)
    expected = shunt * v * np.cosh((cells + 0.5 - j) * theta) / math.cosh((cells + 0.5) * theta)
    assert expected[-1] < 0.97 * expected[0]  # the ladder really loses current along the line
    conductance, voltages = np.full((1, cells), 1 / r_cell), np.array([[v]])
    nodal = NodalSolver(conductance, r_wordline, r_bitline).cell_currents(voltages)[0, 0]
    np.testing.assert_allclose(nodal, expected, rtol=1e-11, atol=0)
    fast = solve_fixed_point(torch.tensor(conductance), torch.tensor(voltages), r_wordline, r_bitline)[0, 0].numpy()
    np.testing.assert_allclose(fast, expected, rtol=1e-8, atol=0)


def test_zero_wire_resistance_is_ideal():
    rng = np.random.default_rng(0)
    conductance = random_tile(rng, 16, 16, 100e3, 10e6)
    voltages = np.where(rng.random((4, 16)) < 0.5, 0.2, 0.0)
    ideal = voltages[:, :, None] * conductance[None]
    assert np.array_equal(NodalSolver(conductance, 0.0, 0.0).cell_currents(voltages), ideal)
    fast = solve_fixed_point(torch.tensor(conductance), torch.tensor(voltages), 0.0, 0.0)
    assert torch.equal(fast, torch.tensor(ideal))


def test_zero_wire_resistance_nf_is_zero_and_output_is_digital():
    generator = torch.Generator().manual_seed(0)
    q = bell_shaped_integers(generator, 6, 50)
    x = torch.randint(-255, 256, (12, 50), generator=generator)
    for mapping in MAPPINGS:
        tiles = map_matrix(q, IDEAL, mapping)
        output, distortion = simulate_matmul(tiles, x, 6, IDEAL, dtype=torch.float64)
        assert distortion.count > 0 and distortion.nf == 0.0
        torch.testing.assert_close(output, (x @ q.T).double(), rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(effective_weights(tiles, None, 6, 50, IDEAL), q.double(), rtol=0, atol=1e-9)


@pytest.mark.parametrize("bits_per_cell", [1, 2, 4])
def test_quantise_slice_shift_add_reproduces_integer_matmul(bits_per_cell):
    device = CrossbarDevice(tile_size=64, bits_per_cell=bits_per_cell)
    generator = torch.Generator().manual_seed(bits_per_cell)
    q = bell_shaped_integers(generator, 7, 40)
    x = torch.randint(0, 256, (9, 40), generator=generator)
    positive = slice_magnitudes(q.clamp_min(0), device)
    negative = slice_magnitudes((-q).clamp_min(0), device)
    product = torch.zeros(9, 7, dtype=torch.int64)
    for bit, plane in enumerate(_bit_planes(x, 8)):
        for s in range(device.cells_per_weight):
            product += (plane @ (positive[..., s] - negative[..., s]).T) << (bit + s * bits_per_cell)
    assert torch.equal(product, x @ q.T)


def _naive_column_significance(device: CrossbarDevice, outputs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and signed significance of each column of a full naive tile, from the layout
    docs/cim.md describes (not from the mapper): differential pairs (+ then -), bit-major,
    the most significant slice next to the drivers; slice s weighs 2^(s * bits per cell)."""
    slices = device.cells_per_weight
    column = torch.arange(2 * slices * outputs)
    pair, sign = column // 2, 1 - 2 * (column % 2)
    slice_index = slices - 1 - pair // outputs
    return pair % outputs, sign * 2.0 ** (slice_index * device.bits_per_cell).double()


@pytest.mark.parametrize("bits_per_cell", [1, 2, 3, 4])  # 3: a partial top cell (8 = 3 + 3 + 2 bits)
def test_outputs_equal_an_independent_dense_computation_at_every_bits_per_cell(bits_per_cell):
    """Ideal wires: every mapping, solved read by read and through transfer matrices,
    gives x @ Q^T exactly. Resistive wires: a naive tile's outputs are the nodal
    solver's column currents, decoded with the significances of the documented layout."""
    ideal = CrossbarDevice(tile_size=32, bits_per_cell=bits_per_cell, r_wordline=0.0, r_bitline=0.0)
    generator = torch.Generator().manual_seed(10 + bits_per_cell)
    q = bell_shaped_integers(generator, 5, 45)
    x = torch.randint(-255, 256, (7, 45), generator=generator)
    expected = (x @ q.T).double()
    density = torch.rand(45, generator=generator)
    for mapping in MAPPINGS:
        tiles = map_matrix(q, ideal, mapping, density)
        solved, _ = simulate_matmul(tiles, x, 5, ideal, dtype=torch.float64, solve_every_read=True)
        transfers = [transfer_matrix(tile, ideal, torch.float64) for tile in tiles]
        through, _ = simulate_matmul(tiles, x, 5, ideal, dtype=torch.float64, transfers=transfers)
        for result in (solved, through, x.double() @ transfer_weights(tiles, transfers, 5, 45).T):
            torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-6)
        torch.testing.assert_close(effective_weights(tiles, None, 5, 45, ideal), q.double(), rtol=0, atol=1e-9)

    device = dataclasses.replace(ideal, r_on=20e3, r_off=2e6, r_wordline=2.0, r_bitline=3.0)
    outputs = device.outputs_per_tile
    q = bell_shaped_integers(generator, outputs, 32)  # one full tile
    x = torch.randint(0, 256, (3, 32), generator=generator)
    (tile,) = map_matrix(q, device, "naive")
    output_of, significance = _naive_column_significance(device, outputs)
    nodal = NodalSolver(tile.conductance.numpy(), device.r_wordline, device.r_bitline)
    level_current = (device.g_on - device.g_off) / device.cell_levels * device.read_voltage
    expected = torch.zeros(3, outputs, dtype=torch.float64)
    for bit in range(device.activation_bits):
        plane = ((x >> bit) & 1).double().numpy() * device.read_voltage
        columns = torch.from_numpy(nodal.cell_currents(plane).sum(1))[:, : output_of.numel()]
        expected.index_add_(1, output_of, columns * significance * 2.0**bit / level_current)
    analog, _ = simulate_matmul([tile], x, outputs, device, dtype=torch.float64, solve_every_read=True)
    torch.testing.assert_close(analog, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))
    assert float((expected - (x @ q.T).double()).norm() / (x @ q.T).double().norm()) > 1e-3  # the wires matter


@pytest.mark.parametrize("bits_per_cell", [1, 2])
def test_mdm_row_cost_is_expected_active_cells_and_its_order_minimises_manhattan_distance(bits_per_cell):
    """MDM's definition: a row's cost is its count of active (non-off) cells times the
    probability that its input bit is 1; rows sit in ascending cost order towards the
    sense amplifiers, which minimises the expected Manhattan distance of active cells."""
    device = CrossbarDevice(tile_size=64, bits_per_cell=bits_per_cell)
    generator = torch.Generator().manual_seed(20 + bits_per_cell)
    q = bell_shaped_integers(generator, device.outputs_per_tile, 50)
    density = torch.rand(50, generator=generator).double()
    (tile,) = map_matrix(q, device, "mdm", density)
    rows = tile.used_rows
    active = (tile.conductance[rows] > device.g_off * (1 + 1e-9)).sum(1).double()
    expected_active = active * density[tile.row_input[rows]]
    assert torch.equal(rows, torch.arange(64 - 50, 64))  # bottom-aligned: the unused rows fill the top
    assert bool((expected_active[1:] >= expected_active[:-1]).all()), expected_active
    distance_to_sense = (device.tile_size - rows).double()
    cost = float((expected_active * distance_to_sense).sum())
    smallest = float((expected_active.sort(descending=True).values * distance_to_sense.sort().values).sum())
    assert cost == pytest.approx(smallest, rel=1e-12)
    by_count = float((expected_active[torch.argsort(active, stable=True)] * distance_to_sense).sum())
    assert cost < by_count  # ignoring the input-bit density places the rows worse


def test_mdm_row_permutation_leaves_ideal_result_unchanged():
    generator = torch.Generator().manual_seed(1)
    q = bell_shaped_integers(generator, 5, 70)
    x = torch.randint(0, 256, (8, 70), generator=generator)
    density = torch.rand(70, generator=generator)
    naive = map_matrix(q, IDEAL, "naive")
    mdm = map_matrix(q, IDEAL, "mdm", density)
    weighted = map_matrix(q, IDEAL, "sw-mdm", density)
    assert any(not torch.equal(a.row_input, b.row_input) for a, b in zip(naive, mdm))
    assert any(not torch.equal(a.column_output, b.column_output) for a, b in zip(mdm, weighted))
    for tile in mdm + weighted:
        used = tile.row_input[tile.used_rows]
        assert torch.equal(used.sort().values, torch.arange(int(used.min()), int(used.max()) + 1))
    expected = (x @ q.T).double()
    for tiles in (naive, mdm, weighted):
        torch.testing.assert_close(simulate_matmul(tiles, x, 5, IDEAL, dtype=torch.float64)[0], expected)


def _weighted_manhattan_cost(tile, device, density, row_position, pair_position) -> float:
    """Σ over cells of level · significance · input density · Manhattan distance, for
    the tile's cells placed at the given row and column-pair positions."""
    level = ((tile.conductance - device.g_off) / (device.g_on - device.g_off)).numpy()
    significance = (tile.column_weight.abs() * (device.g_on - device.g_off) * device.read_voltage).numpy()
    rows, columns = tile.used_rows.numpy(), tile.used_columns.numpy()
    load = level[np.ix_(rows, columns)] * significance[columns] * density[tile.row_input[rows].numpy()][:, None]
    distance = (2 * pair_position[columns // 2] + columns % 2 + 1)[None] + (device.tile_size - row_position[rows])[:, None]
    return float((load * distance).sum())


def test_sw_mdm_minimises_the_significance_weighted_manhattan_cost():
    device = CrossbarDevice(tile_size=64)
    generator = torch.Generator().manual_seed(3)
    q = bell_shaped_integers(generator, 4, 64)
    density = torch.rand(64, generator=generator).double().numpy()
    rng = np.random.default_rng(0)
    tile = map_matrix(q, device, "sw-mdm", torch.tensor(density))[0]
    identity_rows, identity_pairs = np.arange(64), np.arange(32)
    best = _weighted_manhattan_cost(tile, device, density, identity_rows, identity_pairs)
    for mapping in ("naive", "mdm"):
        other = map_matrix(q, device, mapping, torch.tensor(density))[0]
        assert best < _weighted_manhattan_cost(other, device, density, identity_rows, identity_pairs)
    for _ in range(200):  # any other placement of the same rows and pairs costs more
        moved = _weighted_manhattan_cost(tile, device, density, rng.permutation(64), rng.permutation(32))
        assert best <= moved * (1 + 1e-12)


def _nf(device: CrossbarDevice, q: torch.Tensor, x: torch.Tensor, mapping: str = "naive") -> float:
    return simulate_matmul(map_matrix(q, device, mapping), x, q.shape[0], device)[1].nf


def test_nf_grows_with_tile_size_and_wire_resistance():
    generator = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (4, 128), generator=generator)
    sizes = [16, 32, 64, 128]
    # One tile per size: as many rows as the tile and enough outputs to fill its columns.
    by_size = [_nf(CrossbarDevice(tile_size=n), bell_shaped_integers(generator, n // 16, n), x[:, :n]) for n in sizes]
    assert all(a < b for a, b in zip(by_size, by_size[1:])), by_size
    q = bell_shaped_integers(generator, 4, 64)
    by_wire = [_nf(CrossbarDevice(tile_size=64, r_wordline=r, r_bitline=r), q, x[:, :64]) for r in (0.25, 0.5, 1, 2, 4)]
    assert all(a < b for a, b in zip(by_wire, by_wire[1:])), by_wire


def test_single_cell_loses_more_current_farther_from_drivers_and_sense_amplifiers():
    size, device = 32, CrossbarDevice(tile_size=32)
    loss = {}
    for row, col in [(31, 0), (20, 10), (0, 31)]:
        conductance = torch.full((size, size), device.g_off, dtype=torch.float64)
        conductance[row, col] = device.g_on
        voltages = torch.zeros(1, size, dtype=torch.float64)
        voltages[0, row] = device.read_voltage
        real = solve_fixed_point(conductance, voltages, 1.0, 1.0)[0, row, col]
        loss[(col + 1) + (size - row)] = 1 - float(real) / (device.read_voltage * device.g_on)
    distances = sorted(loss)
    assert all(loss[a] < loss[b] for a, b in zip(distances, distances[1:]))


@pytest.fixture(scope="module")
def trained_mlp():
    """A two-layer perceptron trained on digits for a second: bell-shaped weights."""
    torch.manual_seed(0)
    images = load_dataset("digits").train.tensors[0]
    model = fit_on_digits(nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), 8, 1e-2, 128)
    return model, images[:64]


def test_mdm_nf_not_above_naive_on_trained_weights(trained_mlp):
    model, images = trained_mlp
    device = CrossbarDevice(tile_size=64)
    statistics = calibrate(model, images, device, 16, torch.Generator().manual_seed(0))
    for name, layer in mappable_layers(model).items():
        q, _ = quantise_weights(layer.weight.detach().double(), device.weight_bits)
        x = statistics[name].sample
        naive = simulate_matmul(map_matrix(q, device, "naive"), x, q.shape[0], device)[1]
        mdm = simulate_matmul(map_matrix(q, device, "mdm", statistics[name].row_density), x, q.shape[0], device)[1]
        assert mdm.nf <= naive.nf, (name, mdm.nf, naive.nf)
        assert all(m <= n for m, n in zip(mdm.tile_nf, naive.tile_nf)), (name, mdm.tile_nf, naive.tile_nf)


class GroupedConvNet(nn.Module):
    """The layer shapes a compressed model is made of: 1x1, k x 1 / 1 x k depthwise, grouped."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, 1),
            nn.ReLU(),
            nn.Conv2d(4, 4, (3, 1), padding=(1, 0), groups=4, bias=False),
            nn.Conv2d(4, 4, (1, 3), padding=(0, 1), groups=4, bias=False),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, padding=1, stride=2, groups=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(6 * 4 * 4, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_grouped_and_depthwise_convs_map_exactly():
    torch.manual_seed(0)
    model = GroupedConvNet().eval()
    images = torch.randn(6, 1, 8, 8)
    device = CrossbarDevice(tile_size=16, r_wordline=0.0, r_bitline=0.0)
    statistics = calibrate(model, images, device, 8, torch.Generator().manual_seed(0))
    with torch.no_grad():
        digital = model(images)
        quantised = to_crossbars(model, statistics, device, "mdm", "ideal")(images)
        analog = to_crossbars(model, statistics, device, "mdm", "exact")(images)
        fast = to_crossbars(model, statistics, device, "naive", "fast")(images)
    torch.testing.assert_close(analog, quantised, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast, quantised, rtol=1e-4, atol=1e-5)
    assert float((quantised - digital).norm() / digital.norm()) < 0.02
    # The depthwise layer's off-diagonal blocks are never programmed: one output per
    # tile (16 columns = 8 bits x 2), so 4 tiles rather than one per (row, output) block.
    depthwise = to_crossbars(model, statistics, device, "naive", "ideal").body[2]
    assert len(depthwise.tiles) == 4


def test_fast_mode_tracks_exact_mode_on_a_small_model(trained_mlp):
    model, images = trained_mlp
    # A lossy device, so the distortion is large enough to compare.
    device = CrossbarDevice(tile_size=64, r_on=20e3, r_off=2e6, r_wordline=2.0, r_bitline=2.0)
    statistics = calibrate(model, images, device, 8, torch.Generator().manual_seed(0))
    test = images[:16]
    with torch.no_grad():
        ideal, fast, exact = (to_crossbars(model, statistics, device, "mdm", mode)(test) for mode in ("ideal", "fast", "exact"))
    fast_error = float((fast - exact).norm() / exact.norm())
    ideal_error = float((ideal - exact).norm() / exact.norm())
    assert ideal_error > 0.01  # the device really distorts
    assert fast_error < 0.5 * ideal_error, (fast_error, ideal_error)
    assert (fast.argmax(1) == exact.argmax(1)).float().mean() >= 0.9


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tile_size": 1}, "tile size 1"),
        ({"tile_size": 8}, "does not fit one 8-bit signed weight .* it holds at most 4 weight bits"),
        ({"tile_size": 4, "weight_bits": 7, "bits_per_cell": 3}, "does not fit .* it holds at most 6 weight bits"),
        ({"tile_size": 32, "bits_per_cell": 0}, "bits per cell must be >= 1"),
        ({"r_on": 0.0}, "r_on"),
        ({"r_off": -5.0}, "r_off"),
        ({"r_on": 1e6, "r_off": 1e6}, "larger than r_on"),
        ({"r_wordline": -1.0}, "r_wordline"),
        ({"adc_bits": 0}, "adc_bits"),
    ],
)
def test_bad_device_parameters_are_one_line_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message) as raised:
        CrossbarDevice(**kwargs)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "model, message",
    [
        (nn.Sequential(nn.Conv1d(1, 2, 3)), r"layer '0' \(Conv1d\)"),
        (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")), r"layer '0' \(Conv2d\): padding mode 'reflect'"),
        (nn.Sequential(nn.MultiheadAttention(8, 2)), r"layer '0' \(MultiheadAttention\): attention"),
        (nn.Sequential(nn.ReLU()), "no Conv2d or Linear"),
    ],
)
def test_unmappable_layers_are_named_in_one_line(model, message):
    with pytest.raises(UsageError, match=message) as raised:
        mappable_layers(model)
    assert "\n" not in str(raised.value)


def test_every_mode_builds_and_an_unknown_mode_is_a_one_line_error():
    model = nn.Sequential(nn.Linear(4, 3))
    images = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    device = CrossbarDevice(tile_size=16)
    statistics = calibrate(model, images, device, 4, torch.Generator().manual_seed(0))
    for mode in MODES:
        assert to_crossbars(model, statistics, device, "mdm", mode)(images).shape == (5, 3)
    with pytest.raises(UsageError, match="mode 'slow' is not one of fast, exact, ideal") as raised:
        to_crossbars(model, statistics, device, "mdm", "slow")
    assert "\n" not in str(raised.value)


def test_auto_mode_is_exact_unless_every_read_would_be_a_circuit_solve():
    assert resolve_mode("auto", CrossbarDevice()) == "exact"
    assert resolve_mode("auto", CrossbarDevice(read_noise=0.01)) == "fast"
    for mode in MODES:  # an explicit mode is kept, read noise or not
        assert resolve_mode(mode, CrossbarDevice(read_noise=0.01)) == mode
    with pytest.raises(UsageError, match="mode 'slow' is not one of auto, fast, exact, ideal"):
        resolve_mode("slow", CrossbarDevice())


@pytest.mark.parametrize("adc_bits", [None, 6])
def test_reads_through_the_transfer_matrix_equal_solving_every_read(adc_bits):
    """Superposition: a linear crossbar's column currents are plane @ transfer matrix."""
    device = CrossbarDevice(tile_size=64, r_on=20e3, r_off=2e6, r_wordline=2.0, r_bitline=3.0, adc_bits=adc_bits)
    generator = torch.Generator().manual_seed(4)
    q = bell_shaped_integers(generator, 6, 100)
    x = torch.randint(-255, 256, (12, 100), generator=generator)
    tiles = map_matrix(q, device, "mdm")
    solved, solved_nf = simulate_matmul(tiles, x, 6, device, dtype=torch.float64, solve_every_read=True)
    transfers = [transfer_matrix(tile, device, torch.float64) for tile in tiles]
    through, through_nf = simulate_matmul(tiles, x, 6, device, dtype=torch.float64, transfers=transfers)
    scale = float((x @ q.T).abs().max())
    assert float((through - solved).abs().max()) <= 1e-9 * scale
    assert through_nf.nf == pytest.approx(solved_nf.nf, rel=1e-9) and solved_nf.nf > 0.01
    if adc_bits is None:  # (with an ADC, a float32 current may round to the neighbouring code)
        # Without an ADC the whole bit-serial product is linear: one matrix does it.
        weights = transfer_weights(tiles, transfers, 6, 100)
        assert float((x.double() @ weights.T - solved).abs().max()) <= 1e-9 * scale
        # Many reads: simulate_matmul switches to the transfer matrix by itself (float32).
        automatic, _ = simulate_matmul(tiles, x, 6, device)
        reference, _ = simulate_matmul(tiles, x, 6, device, dtype=torch.float64, transfers=transfers)
        assert float((automatic - reference).abs().max()) <= 1e-4 * float((x @ q.T).abs().max())


def test_direct_and_fixed_point_transfer_matrices_agree_on_partly_used_tiles():
    device = CrossbarDevice(tile_size=32, r_on=20e3, r_off=2e6, r_wordline=2.0, r_bitline=3.0)
    q = bell_shaped_integers(torch.Generator().manual_seed(5), 3, 40)
    tiles = map_matrix(q, device, "mdm")
    assert {tile.used_rows.numel() for tile in tiles} == {32, 8}
    for tile in tiles:
        direct = transfer_matrix(tile, device, method="direct")
        fixed_point = transfer_matrix(tile, device, torch.float64, method="fixed-point")
        assert float((direct - fixed_point).abs().max()) <= 1e-9 * float(fixed_point.abs().max())
    with pytest.raises(ValueError, match="needs resistive"):
        transfer_matrix(tiles[0], dataclasses.replace(device, r_bitline=0.0), method="direct")


NOISY_CELLS = dict(
    programming_noise=0.05, stuck_on_rate=0.02, stuck_off_rate=0.02, drift_nu=0.05, drift_nu_std=0.02,
    drift_time=86400.0, drift_compensation=True,
)


@pytest.mark.parametrize(
    "device_fields, tolerance",
    [
        (dict(r_wordline=2.0, r_bitline=3.0), 1e-9),
        (dict(r_wordline=2.0, r_bitline=3.0, **NOISY_CELLS), 1e-9),
        (dict(r_wordline=2.0, r_bitline=3.0, adc_bits=6, **NOISY_CELLS), 1e-9),  # every plane through A and the ADC
        # An ideal wire: one float32 fixed-point solve per row (ideal currents if both are ideal).
        (dict(r_wordline=0.0, r_bitline=3.0, **NOISY_CELLS), 1e-5),
        (dict(r_wordline=0.0, r_bitline=0.0, **NOISY_CELLS), 1e-5),
    ],
)
def test_exact_mode_layer_equals_solving_every_read(device_fields, tolerance):
    """The exact mode's one matrix product per layer (through the transfer matrices;
    with an ADC, every plane through them) is what reading every bit-plane of every
    input through the circuit gives, on
    partly used tiles, with signed inputs, and with programming noise, stuck cells
    and compensated drift (drawn once per programmed tile, so both see the same device)."""
    device = CrossbarDevice(tile_size=32, r_on=20e3, r_off=2e6, **device_fields)
    layer = nn.Linear(40, 6).double()  # float64 outputs, so the comparison is not limited by float32
    inputs = torch.randn(10, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    statistics = calibrate(layer, inputs, device, 4, torch.Generator().manual_seed(0))
    for mapping in MAPPINGS:
        analog = to_crossbars(layer, statistics, device, mapping, "exact", seed=3)
        assert (analog.effective is not None) == (device.adc_bits is None)  # one product per layer without an ADC
        with torch.no_grad():
            fast = analog(inputs)
        integers = quantise_activations(inputs, analog.input_scale, device.activation_bits)
        products, _ = simulate_matmul(analog.tiles, integers, 6, device, dtype=torch.float64, solve_every_read=True)
        solved = products * analog.weight_step * analog.input_scale + layer.bias.detach()
        scale = float((products * analog.weight_step * analog.input_scale).abs().max())
        assert float((fast - solved).abs().max()) <= tolerance * scale


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3), row_blocks=st.integers(0, 5), extra_rows=st.integers(0, 17), cols=st.integers(1, 9),
    dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16),
)
def test_blocked_row_cumsum_equals_torch_cumsum(batch, row_blocks, extra_rows, cols, dtype, seed):
    rows = row_blocks * circuit.ROW_BLOCK + extra_rows
    source = torch.randn(batch, rows, cols, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    out = torch.empty_like(source)
    assert circuit._cumsum_rows(source, out) is out
    torch.testing.assert_close(out, torch.cumsum(source, -2))
