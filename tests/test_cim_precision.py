"""Per-device precision (weight bits, bits per cell, DAC and ADC bits), weight bias
correction, and the shortcuts that make a deployment cheap without changing its numbers."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from dpfl.cim.circuit import ideal_cell_currents, solve_fixed_point
from dpfl.cim.device import CrossbarDevice
from dpfl.cim.engine import _bit_planes, cell_current_loss, simulate_matmul
from dpfl.cim.mapping import map_matrix, quantise_weights
from dpfl.cim.metrics import model_distortion
from dpfl.cim.model import calibrate, crossbar_layers, set_bias_correction, to_crossbars, weight_matrix
from dpfl.cim.nonideal import adc_quantise, adc_step
from dpfl.cim.precision import multi_precision_gradient, quantised_weights
from dpfl.cim.study import precision_devices, run_study
from dpfl.cli.main import main
from dpfl.client.training import train_private_update
from dpfl.errors import UsageError
from dpfl.privacy.mechanism import ClientInstructions
from dpfl.privacy.randomness import Randomness
from dpfl.settings import RunSettings
from dpfl.strategies.base import LocalUpdateRule
from dpfl.task.data import load_dataset
from conftest import fit_on_digits

RRAM = dict(r_on=6e3, r_off=9e5, r_wordline=2.46, r_bitline=2.46)


# --- what a device holds ----------------------------------------------------------------


@pytest.mark.parametrize(
    "tile_size, bits_per_cell, r_on, r_off",
    [(2, 1, 100e3, 10e6), (3, 2, 6e3, 9e5), (16, 3, 1e3, 3e3), (16, 1, 1e3, 3e3), (64, 1, 6e3, 9e5), (64, 2, 100e3, 10e6)],
)
def test_the_adc_bits_a_device_needs_tell_every_column_sum_apart(tile_size, bits_per_cell, r_on, r_off):
    """With any number of rows driven (each adds the same G_off offset to every sum), the
    column sums 0 .. driven rows x levels cell levels land on codes of their own at
    adc_bits_needed; it is the fewest bits whose step is at most one cell level."""
    device = CrossbarDevice(tile_size=tile_size, weight_bits=bits_per_cell, bits_per_cell=bits_per_cell,
                            r_on=r_on, r_off=r_off)  # fmt: skip
    needed = device.adc_bits_needed
    level_current = (device.g_on - device.g_off) / device.cell_levels * device.read_voltage
    assert adc_step(dataclasses.replace(device, adc_bits=needed)) <= level_current
    if needed > 1:
        assert adc_step(dataclasses.replace(device, adc_bits=needed - 1)) > level_current
    for driven in range(tile_size + 1):
        levels = torch.arange(driven * device.cell_levels + 1, dtype=torch.float64)
        sums = driven * device.g_off * device.read_voltage + levels * level_current
        assert adc_quantise(sums, dataclasses.replace(device, adc_bits=needed)).unique().numel() == sums.numel()


def test_a_precision_the_device_cannot_hold_is_a_one_line_error_naming_what_it_holds():
    device = CrossbarDevice(tile_size=16, bits_per_cell=2, adc_bits=7)
    assert [d.weight_bits for d in precision_devices(dataclasses.replace(device, weight_bits=2), (4, 2))] == [2, 4]
    for call, message in [
        (lambda: precision_devices(device, (2, 20)), "tile size 16 does not fit one 20-bit signed weight .* holds at most 16 weight bits"),
        (lambda: precision_devices(dataclasses.replace(device, adc_bits=5), (2,)), "adc_bits 5 is too coarse .* needs adc_bits >= 6"),
        (lambda: precision_devices(device, (0,)), "weight bits must be positive integers, got 0"),
    ]:  # fmt: skip
        with pytest.raises(UsageError, match=message) as raised:
            call()
        assert "\n" not in str(raised.value)


def test_weights_whose_bits_the_cells_do_not_divide_take_a_partial_top_cell():
    device = CrossbarDevice(tile_size=32, weight_bits=6, bits_per_cell=4, r_wordline=0.0, r_bitline=0.0)
    assert (device.cells_per_weight, device.columns_per_weight, device.outputs_per_tile) == (2, 4, 8)
    q, _ = quantise_weights(torch.randn(5, 40, generator=torch.Generator().manual_seed(0)).double(), 6)
    tiles = map_matrix(q, device, "naive")
    top_cells = torch.cat([tile.conductance[tile.used_rows][:, : 2 * 5] for tile in tiles])  # the top slice's pairs
    assert float(top_cells.max()) <= device.level_conductance(3) * (1 + 1e-12)  # at most 2 bits: levels 0..3
    x = torch.randint(0, 256, (4, 40), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(simulate_matmul(tiles, x, 5, device, dtype=torch.float64)[0], (x @ q.T).double())


# --- weight bias correction -------------------------------------------------------------


@pytest.mark.parametrize(
    "layer, inputs",
    [
        (nn.Linear(30, 7), torch.rand(200, 30) + 0.5),
        (nn.Conv2d(4, 6, 3, padding=1, groups=2), torch.rand(40, 4, 6, 6) + 0.25),
    ],
)
@pytest.mark.parametrize("wires, mode", [(0.0, "ideal"), (3.0, "exact")])
def test_bias_correction_restores_each_output_channels_mean_at_two_weight_bits(layer, inputs, wires, mode):
    """Inputs with a mean far from zero make the weight quantisation (and resistive
    wires) shift every output channel's mean; the correction removes that shift up to
    the layer's gain g, which a GroupNorm divides out (and the fine activation grid's
    own error), whatever the layer."""
    torch.manual_seed(0)
    layer = layer.double()
    inputs = inputs.double()
    device = CrossbarDevice(tile_size=32, weight_bits=2, activation_bits=16, r_on=20e3, r_off=2e6,
                            r_wordline=wires, r_bitline=wires)  # fmt: skip
    statistics = calibrate(layer, inputs, device, 4, torch.Generator().manual_seed(0))
    analog = to_crossbars(layer, statistics, device, "mdm", mode)
    channel_mean = lambda y: y.transpose(0, 1).reshape(y.shape[1], -1).mean(1)  # noqa: E731
    with torch.no_grad():
        reference = channel_mean(layer(inputs))
        plain = channel_mean(analog(inputs))
        corrected = channel_mean(set_bias_correction(analog, True)(inputs))
    shift = (plain - reference).abs().max()
    assert shift > 0.01 * reference.abs().max()  # two bits do shift the means
    # The gain of the weights the device realises (exact mode: through the wires, tested
    # equal to solving every read in test_cim.py).
    crossbar = crossbar_layers(analog)[""]
    applied = crossbar.effective * crossbar.weight_step[:, None]
    gain = float((applied * weight_matrix(layer)).sum() / (applied * applied).sum())
    assert 0.8 < gain < 1.25
    assert (gain * corrected - reference).abs().max() < 1e-3 * shift
    # Built with it, or switched off again: the same two models.
    with torch.no_grad():
        torch.testing.assert_close(to_crossbars(layer, statistics, device, "mdm", mode, bias_correction=True)(inputs),
                                   analog(inputs))  # fmt: skip
        torch.testing.assert_close(set_bias_correction(analog, False)(inputs), to_crossbars(layer, statistics, device, "mdm", mode)(inputs))  # fmt: skip


# --- the deployment's shortcuts give the numbers of the long way ----------------------------


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 64, 10))
    return fit_on_digits(model, 3, 1e-2, 128), load_dataset("digits")


def test_distortion_read_through_the_analog_models_transfer_matrices_equals_solving_each_read(small_model):
    model, data = small_model
    device = CrossbarDevice(tile_size=32, **RRAM)
    statistics = calibrate(model, data.train.tensors[0][:32], device, 8, torch.Generator().manual_seed(0))
    for mapping in ("naive", "mdm"):
        solved = model_distortion(model, statistics, device, mapping, seed=1)
        analog = to_crossbars(model, statistics, device, mapping, "exact", seed=1)
        assert all(layer.transfers is not None for layer in crossbar_layers(analog).values())
        reused = model_distortion(model, statistics, device, mapping, seed=1, analog=analog)
        assert solved.nf > 0.01
        for a, b in zip([solved, *solved.layers], [reused, *reused.layers]):
            for key in ("nf", "output_error", "gain_free_error"):
                assert getattr(b, key) == pytest.approx(getattr(a, key), rel=1e-4), (a, key)


def test_cell_loss_of_the_summed_reads_equals_the_sum_of_each_reads_loss():
    """Superposition: the crossbar is linear, so one solve of the summed voltages gives
    the current each cell loses over all reads."""
    device = CrossbarDevice(tile_size=16, **RRAM)
    generator = torch.Generator().manual_seed(3)
    q, _ = quantise_weights(torch.randn(2, 20, generator=generator).double(), 4)
    device = dataclasses.replace(device, weight_bits=4)
    x = torch.randint(-15, 16, (6, 20), generator=generator)
    tile = map_matrix(q, device, "mdm")[0]
    loss = cell_current_loss(tile, x, device, dtype=torch.float64)
    expected, reads = torch.zeros_like(tile.conductance), 0
    for part in (x.clamp_min(0), (-x).clamp_min(0)):
        planes = _bit_planes(part[:, tile.row_input[tile.used_rows]], device.activation_bits).reshape(-1, 16).unique(dim=0)
        voltages = torch.zeros(planes.shape[0], 16, dtype=torch.float64)
        voltages[:, tile.used_rows] = planes.double() * device.read_voltage
        real = solve_fixed_point(tile.conductance, voltages, device.r_wordline, device.r_bitline)
        expected += (ideal_cell_currents(tile.conductance, voltages) - real).sum(0)
        reads += planes.shape[0]
    assert loss.cycles == reads
    torch.testing.assert_close(loss.total, expected, rtol=1e-8, atol=1e-12 * float(expected.abs().max()))


def test_the_study_reports_every_precision_with_and_without_bias_correction(small_model):
    model, data = small_model
    device = CrossbarDevice(tile_size=32, weight_bits=6, bits_per_cell=2, r_wordline=0.5, r_bitline=0.5)
    statistics = calibrate(model, data.train.tensors[0][:64], device, 4, torch.Generator().manual_seed(0))
    test = torch.utils.data.Subset(data.test, range(60))
    report, _ = run_study(model, statistics, test, device, "mdm", "auto", 0, sweep_tile_sizes=(), weight_bits=(2, 4),
                          mappings=("naive", "mdm"))  # fmt: skip
    assert [(p.weight_bits, p.cells_per_weight) for p in report.precisions] == [(2, 1), (4, 2), (6, 3)]
    own = report.precisions[-1]
    assert report.accuracy == {"digital": report.accuracy["digital"], **own.accuracy}
    assert [(entry.tile_size, entry.mapping) for entry in report.sweep] == [(32, "naive"), (32, "mdm")]  # its own tile
    for result in report.precisions:
        assert {"quantised", "quantised_corrected", "analog_mdm", "analog_mdm_corrected"} <= set(result.accuracy)
        assert set(result.trials) == {"naive", "mdm"}
        assert set(result.trials["naive"]) == {"accuracy", "accuracy_corrected", "nf", "output_error", "gain_free_error"}
    assert json.loads(json.dumps(report.to_json()))["precisions"][0]["weight_bits"] == 2


@pytest.mark.slow
def test_a_federation_deploys_at_each_nodes_own_precision(tmp_path, capsys):
    """Two data owners with devices of different precision (4-bit weights on 2-bit cells
    with a 6-bit DAC, 8-bit weights on binary cells): each deploys at its own."""
    out = tmp_path / "run"
    coarse = 'device-name="coarse" device-weight-bits=4 device-bits-per-cell=2 device-activation-bits=6 share-accuracy=true share-nf=true'
    fine = 'device-name="fine" device-weight-bits=8 device-adc-bits=7 share-accuracy=true'
    code = main([
        "simulate", "--engine", "in-process", "--model", "cnn", "--width", "4", "--clients", "2", "--sample-rate", "1.0",
        "--rounds", "1", "--noise-multiplier", "1.0", "--deploy", "--deploy-node-config", "device-tile-size=64",
        "--node-config", coarse, "--node-config", fine, "--out", str(out),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    rows = {row["device-name"]: row for row in json.loads((out / "deployment.json").read_text())["nodes"]}
    assert rows["coarse"]["status"] == rows["fine"]["status"] == "deployed", rows
    assert (rows["coarse"]["device-weight-bits"], rows["coarse"]["device-bits-per-cell"]) == (4, 2)
    assert (rows["fine"]["device-weight-bits"], rows["fine"]["device-adc-bits"]) == (8, 7)
    assert {"accuracy-analog-mdm", "accuracy-analog-mdm-corrected"} <= rows["coarse"].keys()
    assert "nf-mdm" in rows["coarse"] and "nf-mdm" not in rows["fine"]
    reports = [json.loads(path.read_text()) for path in out.glob("nodes/*/**/report.json")]
    assert sorted((r["device"]["weight_bits"], r["device"]["bits_per_cell"], r["device"]["activation_bits"],
                   r["precisions"][0]["cells_per_weight"]) for r in reports) == [(4, 2, 6, 2), (8, 1, 8, 8)]  # fmt: skip


# --- multi-precision training ----------------------------------------------------------------


def test_quantised_weights_hold_the_deployment_quantisation_inside_and_restore_the_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(16, 3))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with quantised_weights(model, 3):
        for module in (model[0], model[2]):
            q, step = quantise_weights(weight_matrix(module) if isinstance(module, nn.Linear)
                                       else module.weight.detach().reshape(4, -1).double(), 3)  # fmt: skip
            assert torch.allclose(module.weight.detach().reshape(q.shape[0], -1).double(), q * step[:, None], atol=1e-6)
        assert torch.equal(model[0].bias, before["0.bias"])  # biases stay as they are
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())


def test_multi_precision_gradient_is_the_mean_of_the_child_models_straight_through_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    inputs, targets = torch.randn(8, 6), torch.randint(0, 3, (8,))

    def compute() -> float:
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        return float(loss.detach())

    expected_grads, expected_loss = [], 0.0
    for bits in (None, 2, 4):  # each child model: its own copy, with quantised weights
        child = copy.deepcopy(model)
        if bits is not None:
            with torch.no_grad():
                for module in (child[0], child[2]):
                    q, step = quantise_weights(module.weight, bits)
                    module.weight.copy_(q * step[:, None])
        loss = nn.functional.cross_entropy(child(inputs), targets)
        loss.backward()
        expected_loss += float(loss.detach())
        expected_grads.append([p.grad for p in child.parameters()])
    model.zero_grad()
    loss = multi_precision_gradient(compute, model, (2, 4))
    assert loss == pytest.approx(expected_loss / 3, rel=1e-6)
    for index, param in enumerate(model.parameters()):
        torch.testing.assert_close(param.grad, sum(grads[index] for grads in expected_grads) / 3)
    assert multi_precision_gradient(lambda: 1.5, model, ()) == 1.5  # no bit widths: the plain gradient


def test_a_multi_precision_update_is_clipped_like_any_other_and_local_dp_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    data = TensorDataset(torch.randn(12, 6), torch.randint(0, 3, (12,)))
    result = train_private_update(
        model, data, LocalUpdateRule({}, {}), steps=3, lr=0.5, batch_size=4, weight_decay=0.0, grad_clip=10.0,
        instructions=ClientInstructions.flat(0.01), generator=torch.Generator().manual_seed(0),
        noise_stream=Randomness().stream("client-noise"), train_bit_widths=(2, 4),
    )  # fmt: skip
    norm = torch.sqrt(sum((value.double() ** 2).sum() for value in result.update.values()))
    assert result.norm_before_clip > 0.01 and float(norm) <= 0.01 * (1 + 1e-6)
    with pytest.raises(UsageError, match="train-bit-widths cannot be combined with local-dp"):
        RunSettings(train_bit_widths="4", local_dp=True).validate()
    with pytest.raises(UsageError, match="train-bit-widths must be comma-separated weight bits in 1..16, got '4,x'"):
        RunSettings(train_bit_widths="4,x").bit_widths()


def test_multi_precision_training_makes_the_model_hold_up_on_one_bit_weights():
    # The same local training (the client's loop, no clipping or noise) with and without
    # the 1-bit child model: on ternary weights (1 magnitude bit and a sign, per output
    # channel) the plainly trained model loses 9-14 points on this data, the
    # multi-precision one 1-2 (seeds 0-2, 300 steps), at a point or two of full precision.
    data = load_dataset("digits")
    test_images, test_labels = data.test.tensors

    def accuracy_at(model: nn.Module, bits: int) -> float:
        with torch.no_grad(), quantised_weights(model, bits):
            return float((model(test_images).argmax(1) == test_labels).double().mean())

    scores = {}
    for widths in ((), (1,)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))
        train_private_update(
            model, data.train, LocalUpdateRule({}, {}), steps=300, lr=0.1, batch_size=64, weight_decay=0.0,
            grad_clip=10.0, instructions=ClientInstructions.flat(0.0), generator=torch.Generator().manual_seed(0),
            noise_stream=Randomness().stream("client-noise"), train_bit_widths=widths,
        )  # fmt: skip
        scores[widths] = accuracy_at(model.eval(), 1), accuracy_at(model, 8)
    assert scores[(1,)][0] >= scores[()][0] + 0.04, scores
    assert scores[(1,)][1] >= 0.9, scores  # and the model still works at 8 bits
