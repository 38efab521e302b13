"""Device non-idealities and the ADC (dpfl.cim.nonideal) against closed forms and statistics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dpfl.cim.device import CrossbarDevice
from dpfl.cim.engine import bit_serial_variance, effective_weights, read_noise_variance, simulate_matmul
from dpfl.cim.mapping import map_matrix, quantise_weights
from dpfl.cim.model import calibrate, to_crossbars
from dpfl.cim.nonideal import adc_quantise, adc_step, program
from dpfl.cim.metrics import Interval, model_distortion, relative_errors
from dpfl.errors import UsageError

IDEAL_WIRES = {"r_wordline": 0.0, "r_bitline": 0.0}


def random_levels(seed: int, size: int, device: CrossbarDevice) -> torch.Tensor:
    """Target conductances (size, size) of uniformly random cell levels."""
    levels = torch.randint(0, device.cell_levels + 1, (size, size), generator=torch.Generator().manual_seed(seed))
    return device.level_conductance(levels.double())


def signed_integers(seed: int, outputs: int, inputs: int, bits: int) -> torch.Tensor:
    weights = torch.randn(outputs, inputs, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return quantise_weights(weights, bits)[0]


# --- off by default ------------------------------------------------------------------


def test_default_device_programs_targets_exactly_and_draws_nothing():
    device = CrossbarDevice(tile_size=32)
    assert device.programs_exactly and device.read_noise == 0 and device.adc_bits is None
    target = random_levels(0, 32, device)
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    programmed = program(target, device, generator)
    assert programmed.at_programming is target and programmed.at_inference is target
    assert torch.equal(generator.get_state(), state)
    q = signed_integers(0, 3, 40, 8)
    tiles = map_matrix(q, device, "mdm", generator=generator)
    assert torch.equal(generator.get_state(), state)
    torch.testing.assert_close(effective_weights(tiles, None, 3, 40, device), q.double(), rtol=0, atol=1e-9)


# --- programming noise, stuck cells, drift -------------------------------------------


@pytest.mark.parametrize("model", ["proportional", "independent"])
def test_programming_noise_has_the_configured_sigma(model):
    sigma = 0.05
    # G_off far above sigma · G_on, so that clipping at 0 S does not bias the off level.
    device = CrossbarDevice(tile_size=256, bits_per_cell=2, r_off=300e3, programming_noise=sigma,
                            programming_noise_model=model)
    target = random_levels(1, 256, device)
    realised = program(target, device, torch.Generator().manual_seed(0)).at_inference
    for level in range(device.cell_levels + 1):
        level_conductance = float(target.unique()[level])
        cells = target == level_conductance
        scale = level_conductance if model == "proportional" else device.g_on
        error = (realised[cells] - target[cells]) / scale
        count = int(cells.sum())
        # Sample mean within 5 standard errors of 0; sample sigma within 5 of its standard error.
        assert abs(float(error.mean())) < 5 * sigma / math.sqrt(count), (level, float(error.mean()))
        assert abs(float(error.std()) - sigma) < 5 * sigma / math.sqrt(2 * count), (level, float(error.std()))


def test_stuck_cells_occur_at_their_rates_and_hold_their_state():
    device = CrossbarDevice(tile_size=256, stuck_on_rate=0.02, stuck_off_rate=0.09)
    target = random_levels(2, 256, device)
    realised = program(target, device, torch.Generator().manual_seed(1)).at_inference
    cells = target.numel()
    for rate, state, other in ((0.02, device.g_on, device.g_off), (0.09, device.g_off, device.g_on)):
        # Cells programmed to the other state that ended at this one were stuck.
        programmed_other = target == other
        stuck = int((realised[programmed_other] == state).sum())
        expected = rate * int(programmed_other.sum())
        assert abs(stuck - expected) < 5 * math.sqrt(expected * (1 - rate)), (rate, stuck, expected)
    assert set(realised.unique().tolist()) == {device.g_off, device.g_on}
    assert 0 < int((realised != target).sum()) < 0.11 * cells


def test_drift_follows_the_power_law_with_the_configured_exponent_spread():
    t, t0, nu, spread = 3600.0 * 24, 20.0, 0.06, 0.01
    device = CrossbarDevice(tile_size=256, drift_nu=nu, drift_nu_std=spread, drift_time=t)
    target = random_levels(3, 256, device)
    programmed = program(target, device, torch.Generator().manual_seed(2))
    assert torch.equal(programmed.at_programming, target)
    exponent = -torch.log(programmed.at_inference / target) / math.log(t / t0)
    count = exponent.numel()
    assert abs(float(exponent.mean()) - nu) < 5 * spread / math.sqrt(count)
    assert abs(float(exponent.std()) - spread) < 5 * spread / math.sqrt(2 * count)

    fixed = CrossbarDevice(tile_size=32, drift_nu=nu, drift_time=t)
    small = random_levels(4, 32, fixed)
    drifted = program(small, fixed, torch.Generator().manual_seed(0)).at_inference
    torch.testing.assert_close(drifted, small * (t / t0) ** -nu, rtol=1e-14, atol=0)


def test_global_drift_compensation_undoes_a_uniform_drift():
    t, nu = 1e5, 0.05
    q = signed_integers(3, 4, 64, 8)
    decay = (t / 20.0) ** -nu
    for compensate, expected in ((False, decay * q.double()), (True, q.double())):
        device = CrossbarDevice(tile_size=64, drift_nu=nu, drift_time=t, drift_compensation=compensate, **IDEAL_WIRES)
        tiles = map_matrix(q, device, "naive", generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(effective_weights(tiles, None, 4, 64, device), expected, rtol=1e-12, atol=1e-9)


def test_drift_compensation_restores_the_scale_of_a_spread_drift():
    """With nu ~ Normal(m, s) per cell, a weight decays on average by the lognormal mean
    E[(t/t0)^-nu] = exp(-m L + s² L² / 2), L = ln(t/t0); compensation restores scale 1."""
    nu, spread, t = 0.05, 0.02, 1e6
    log_time = math.log(t / 20.0)
    mean_decay = math.exp(-nu * log_time + (spread * log_time) ** 2 / 2)
    q = signed_integers(4, 8, 128, 8).double()
    for compensate, expected_scale in ((False, mean_decay), (True, 1.0)):
        device = CrossbarDevice(tile_size=128, drift_nu=nu, drift_nu_std=spread, drift_time=t,
                                drift_compensation=compensate, **IDEAL_WIRES)
        tiles = map_matrix(q.long(), device, "mdm", generator=torch.Generator().manual_seed(0))
        realised = effective_weights(tiles, None, 8, 128, device)
        scale = float((realised * q).sum() / (q * q).sum())  # least-squares gain of realised over q
        assert scale == pytest.approx(expected_scale, rel=0.03), (compensate, scale, expected_scale)


# --- read noise ----------------------------------------------------------------------


def test_read_noise_variance_matches_its_closed_form_and_the_exact_path():
    sigma = 0.05
    device = CrossbarDevice(tile_size=16, weight_bits=4, activation_bits=2, read_noise=sigma, **IDEAL_WIRES)
    q = torch.tensor([[5, -3, 0, 7], [-6, 2, 1, 0]])
    tiles = map_matrix(q, device, "naive")
    per_read = read_noise_variance(tiles, None, 2, 4, device)
    # Closed form: a cell at level l of slice s adds (sigma · G(l) · 2^s / ΔG)² per read.
    step = device.g_on - device.g_off
    for o in range(2):
        for k in range(4):
            magnitude, negative = abs(int(q[o, k])), int(q[o, k]) < 0
            expected = 0.0
            for s in range(4):
                bit = (magnitude >> s) & 1
                for column_is_negative in (False, True):
                    level = bit if column_is_negative == negative else 0
                    expected += (sigma * (device.g_off + level * step) * 2**s / step) ** 2
            assert per_read[o, k] == pytest.approx(expected, rel=1e-12)
    # The exact path draws noise per cell and read: its empirical variance agrees.
    x = torch.tensor([[3, 1, 2, 3]]).repeat(4000, 1)
    outputs, _ = simulate_matmul(tiles, x, 2, device, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    predicted = bit_serial_variance(x[:1], per_read, device.activation_bits)[0]
    torch.testing.assert_close(outputs.mean(0), (x[0] @ q.T).double(), rtol=0, atol=float(4 * (predicted / 4000).sqrt().max()))
    ratio = outputs.var(0) / predicted
    assert ((ratio - 1).abs() < 5 * math.sqrt(2 / 4000)).all(), ratio


def test_fast_mode_read_noise_matches_the_exact_mode_spread():
    torch.manual_seed(0)
    layer = nn.Linear(24, 3)
    device = CrossbarDevice(tile_size=48, read_noise=0.03, **IDEAL_WIRES)
    images = torch.rand(8, 24)
    statistics = calibrate(layer, images, device, 4, torch.Generator().manual_seed(0))
    repeated = images[:1].repeat(1500, 1)
    with torch.no_grad():
        spread = {mode: to_crossbars(layer, statistics, device, "mdm", mode, seed=1)(repeated).std(0) for mode in ("fast", "exact")}
    assert (spread["exact"] > 0).all()
    torch.testing.assert_close(spread["fast"], spread["exact"], rtol=0.12, atol=0)


# --- ADC (issue 18: "the ADC's level count wrong") ----------------------------------


@pytest.mark.parametrize("bits", [1, 4, 6])
def test_adc_has_two_to_the_bits_codes_evenly_spaced_over_full_scale(bits):
    device = CrossbarDevice(tile_size=32, adc_bits=bits)
    full_scale = 32 * device.g_on * device.read_voltage
    currents = torch.linspace(-0.2 * full_scale, 1.2 * full_scale, 200_001, dtype=torch.float64)
    codes = adc_quantise(currents, device).unique()
    assert codes.numel() == 2**bits
    torch.testing.assert_close(codes, torch.linspace(0, full_scale, 2**bits, dtype=torch.float64), rtol=1e-12, atol=0)
    assert adc_step(device) == pytest.approx(full_scale / (2**bits - 1), rel=1e-15)
    inside = (currents >= 0) & (currents <= full_scale)
    error = (adc_quantise(currents, device) - currents)[inside].abs().max()
    assert 0.499 * adc_step(device) < error <= 0.5 * adc_step(device) * (1 + 1e-9)


def _adc_product(bits: int | None, x: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, CrossbarDevice]:
    device = CrossbarDevice(tile_size=8, weight_bits=2, activation_bits=2, adc_bits=bits, **IDEAL_WIRES)
    tiles = map_matrix(q, device, "naive")
    return simulate_matmul(tiles, x, q.shape[0], device, dtype=torch.float64)[0], device


def _half_lsb_bound(device: CrossbarDevice, x: torch.Tensor, outputs: int) -> float:
    """Largest decoded error if every conversion is off by half an LSB: each read cycle
    converts 2 columns per slice of an output, weighted 2^slice / (ΔG·V), shift-added
    over input bits and over the positive and negative input passes."""
    per_conversion = adc_step(device) / 2 / ((device.g_on - device.g_off) * device.read_voltage)
    slices = sum(2.0**s for s in range(device.cells_per_weight)) * 2
    planes = sum(2.0**b for b in range(device.activation_bits))
    passes = 2 if (x < 0).any() and (x > 0).any() else 1
    return per_conversion * slices * planes * passes


def test_adc_at_16_bits_decodes_exactly_and_at_4_bits_within_half_an_lsb():
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(-3, 4, (4, 6), generator=generator)
    x = torch.randint(-3, 4, (50, 6), generator=generator)
    exact = (x @ q.T).double()
    ideal, _ = _adc_product(None, x, q)
    torch.testing.assert_close(ideal, exact, rtol=0, atol=1e-9)

    fine, device = _adc_product(16, x, q)
    assert _half_lsb_bound(device, x, 4) < 0.5  # so rounding must recover the integers
    assert (fine - exact).abs().max() <= _half_lsb_bound(device, x, 4)
    assert torch.equal(fine.round(), exact)

    coarse, device = _adc_product(4, x, q)
    bound = _half_lsb_bound(device, x, 4)
    error = (coarse - exact).abs().max()
    assert 0 < error <= bound, (float(error), bound)
    # A converter with half the step (one bit more) is within half that bound.
    finer, finer_device = _adc_product(5, x, q)
    assert (finer - exact).abs().max() <= _half_lsb_bound(finer_device, x, 4)


# --- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"stuck_on_rate": -0.01}, "stuck_on_rate"),
        ({"stuck_off_rate": 1.5}, "stuck_off_rate"),
        ({"stuck_on_rate": 0.6, "stuck_off_rate": 0.6}, "exceeds 1"),
        ({"programming_noise": 1.0}, "programming_noise"),
        ({"programming_noise": -0.1}, "programming_noise"),
        ({"read_noise": 2.0}, "read_noise"),
        ({"programming_noise_model": "lognormal"}, "programming_noise_model 'lognormal'"),
        ({"drift_nu": 0.05}, "drift exponent needs a drift time"),
        ({"drift_nu": -0.05, "drift_time": 100.0}, "drift_nu"),
        ({"drift_nu": 0.05, "drift_time": 5.0}, "at least drift_t0"),
        ({"drift_compensation": True}, "drift compensation needs a drift time"),
    ],
)
def test_bad_nonideality_parameters_are_one_line_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message) as raised:
        CrossbarDevice(**kwargs)
    assert "\n" not in str(raised.value)


def test_trial_interval_is_the_student_t_interval_of_the_mean():
    values = [0.91, 0.93, 0.96, 0.94]
    mean = sum(values) / 4
    sample_std = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
    interval = Interval.of(values)
    assert interval.mean == pytest.approx(mean, rel=1e-15)
    # t quantile 0.975 with 3 degrees of freedom, from tables: 3.182446305284263
    assert interval.half_width == pytest.approx(3.182446305284263 * sample_std / 2, rel=1e-12)
    assert Interval.of([0.5]).half_width is None and Interval.of([0.7, 0.7]).half_width == 0.0


# --- gain-free output error ----------------------------------------------------------


def test_gain_free_error_removes_a_common_gain_and_keeps_orthogonal_error():
    """analog = exact + e with e orthogonal to exact and |e| = a |exact|: the output error
    is a; the best gain 1 / (1 + a²) leaves a / sqrt(1 + a²). A pure gain leaves nothing."""
    exact = torch.randn(64, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    other = torch.randn(64, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    orthogonal = other - (other * exact).sum() / (exact * exact).sum() * exact
    a = 0.3
    analog = exact + a * exact.norm() / orthogonal.norm() * orthogonal
    error, gain_free = relative_errors(analog, exact)
    assert error == pytest.approx(a, rel=1e-12)
    assert gain_free == pytest.approx(a / math.sqrt(1 + a * a), rel=1e-12)
    error, gain_free = relative_errors(0.7 * exact, exact)
    assert error == pytest.approx(0.3, rel=1e-12) and gain_free == pytest.approx(0.0, abs=1e-12)
    assert relative_errors(analog, torch.zeros_like(exact)) == (0.0, 0.0)


def test_uniform_drift_is_all_gain_error_in_the_model_distortion():
    """nu with no spread, ideal wires, no compensation: every weight decays by the same
    (t/t0)^-nu, so the output error is 1 - that and the gain-free error vanishes."""
    torch.manual_seed(0)
    layer = nn.Linear(40, 6)
    t, nu = 1e5, 0.05
    device = CrossbarDevice(tile_size=64, drift_nu=nu, drift_time=t, **IDEAL_WIRES)
    statistics = calibrate(layer, torch.rand(16, 40), device, 8, torch.Generator().manual_seed(0))
    measured = model_distortion(layer, statistics, device, "mdm")
    # The reads are solved in float32 (dpfl.cim.engine.SIMULATION_DTYPE): ~1e-7 relative.
    assert measured.output_error == pytest.approx(1 - (t / 20.0) ** -nu, rel=1e-6)
    assert measured.gain_free_error < 1e-6
    assert measured.layers[0].gain_free_error == measured.gain_free_error
