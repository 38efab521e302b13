"""Running a whole ``nn.Module`` on simulated crossbars.

Every ``Conv2d`` (as im2col: unfolded patches times the flattened kernel) and every
``Linear`` is replaced by a :class:`CrossbarLayer` that quantises its input to unsigned
``activation_bits`` integers (a signed input is two passes), multiplies on the tiles
and rescales. Grouped and depthwise convolutions become block-diagonal matrices whose
all-zero off-diagonal tiles are never programmed. Normalisation, activations, pooling
and residual additions stay in the digital periphery.

Modes: ``exact`` reads every input bit-plane through the circuit: each tile's transfer
matrix is solved once when the layer is built; without an ADC the decoded product is
then linear in the input, one matrix product per layer (:func:`transfer_weights`);
with an ADC every plane is read through the transfer matrices and converted; under
read noise every read is solved;
``fast`` uses the calibrated per-tile attenuation maps (:func:`effective_weights`);
``ideal`` is the quantised model on ideal crossbars (the digital reference).

The device's non-idealities apply in ``exact`` and ``fast`` mode: tiles are
programmed with the seed's programming stream (so a seed is one device instance),
and read noise is drawn anew on every forward pass from the seed's read stream.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.vision_transformer import Encoder, VisionTransformer

from dpfl.cim.device import CrossbarDevice
from dpfl.cim.engine import (
    attenuation_map, bit_serial_variance, effective_weights, read_noise_variance, simulate_matmul, transfer_matrix,
    transfer_weights,
)
from dpfl.cim.mapping import Tile, map_matrix, quantise_weights
from dpfl.cim.names import DEPLOY_MODES, MODES
from dpfl.cim.nonideal import PROGRAMMING_STREAM, READ_STREAM, stream_generator
from dpfl.errors import UsageError
from dpfl.task.layers import conv_padding, input_rows, watch_layers

# Normalisation layers own parameters but run in the digital periphery, as do the
# class token and position embedding torchvision's ViT owns (additions, not products).
DIGITAL_LAYERS = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, VisionTransformer, Encoder)
# Random read cycles per tile for the attenuation maps of the fast mode.
ATTENUATION_SAMPLES = 64


def mappable_layers(model: nn.Module) -> dict[str, nn.Conv2d | nn.Linear]:
    """The Conv2d and Linear layers of ``model`` by name; one-line error for anything
    else that holds weights the mapper cannot place."""
    layers: dict[str, nn.Conv2d | nn.Linear] = {}
    for name, module in model.named_modules():
        label = f"layer {name or '<model>'!r} ({type(module).__name__})"
        if isinstance(module, nn.Conv2d):
            try:
                conv_padding(module)
            except UsageError as error:
                raise UsageError(f"{label}: {error}") from None
            layers[name] = module
        elif isinstance(module, nn.Linear):
            layers[name] = module
        elif isinstance(module, nn.MultiheadAttention):
            raise UsageError(f"{label}: attention multiplies activations by activations, which a programmed crossbar cannot do")
        elif not isinstance(module, DIGITAL_LAYERS) and list(module.parameters(recurse=False)):
            owned = ", ".join(n for n, _ in module.named_parameters(recurse=False))
            raise UsageError(
                f"{label}: holds parameters ({owned}) that are not Conv2d or Linear weights; "
                "only Conv2d and Linear layers can be mapped onto crossbars"
            )
    if not layers:
        raise UsageError("the model has no Conv2d or Linear layer to map onto crossbars")
    return layers


def weight_matrix(layer: nn.Conv2d | nn.Linear) -> torch.Tensor:
    """The (outputs, inputs) matrix the crossbars hold; block-diagonal for grouped convs."""
    weight = layer.weight.detach().double()
    if isinstance(layer, nn.Linear):
        return weight
    outputs, per_group = weight.shape[0], weight[0].numel()
    groups = layer.groups
    matrix = torch.zeros(outputs, per_group * groups, dtype=torch.float64)
    outputs_per_group = outputs // groups
    for g in range(groups):
        rows = slice(g * outputs_per_group, (g + 1) * outputs_per_group)
        matrix[rows, g * per_group : (g + 1) * per_group] = weight[rows].reshape(outputs_per_group, per_group)
    return matrix


@dataclass
class LayerCalibration:
    """What calibration data says about a layer's input."""

    scale: float  # step of the integer activation grid
    row_density: torch.Tensor  # (K,) how often each input bit is 1 over all bit-planes
    sample: torch.Tensor  # (S, K) integer input vectors kept for distortion reports
    mean: torch.Tensor  # (K,) float64: the mean input, for weight bias correction


def quantise_activations(x: torch.Tensor, scale: float, bits: int) -> torch.Tensor:
    top = 2**bits - 1
    return torch.round(x.double() / scale).clamp(-top, top).to(torch.int64)


def calibrate(
    model: nn.Module, images: torch.Tensor, device: CrossbarDevice, sample_size: int, generator: torch.Generator
) -> dict[str, LayerCalibration]:
    """Input statistics of every mappable layer on calibration ``images`` (digital model)."""
    layers = mappable_layers(model)
    captured: dict[str, torch.Tensor] = {}
    with watch_layers(model, layers, lambda name, _layer, inputs, _output: captured.__setitem__(name, inputs.detach())):
        model(images)
    statistics = {}
    bits = device.activation_bits
    for name, layer in layers.items():
        patches = input_rows(layer, captured[name])
        scale = float(patches.abs().max()) / (2**bits - 1) or 1.0
        integers = quantise_activations(patches, scale, bits).abs()
        shifts = torch.arange(bits)
        density = ((integers[:, :, None] >> shifts) & 1).double().mean(dim=(0, 2))
        pick = torch.randperm(integers.shape[0], generator=generator)[:sample_size]
        statistics[name] = LayerCalibration(
            scale, density, quantise_activations(patches[pick], scale, bits), patches.double().mean(0)
        )
    return statistics


@dataclass
class DeviceGenerators:
    """Random streams of one simulated device instance (see :mod:`dpfl.cim.nonideal`)."""

    calibration: torch.Generator  # the fast mode's random calibration reads
    programming: torch.Generator  # programming noise, stuck cells, drift
    read: torch.Generator  # read noise

    @classmethod
    def from_seed(cls, seed: int) -> "DeviceGenerators":
        return cls(
            torch.Generator().manual_seed(seed),
            stream_generator(seed, PROGRAMMING_STREAM),
            stream_generator(seed, READ_STREAM),
        )


def resolve_mode(mode: str, device: CrossbarDevice) -> str:
    """The analog mode a deployment asking for ``mode`` runs: "auto" is "exact", except
    on a device with read noise, where exact mode solves the circuit for every read of
    every image (seconds per image for a ResNet-10, hours for a test set); there the
    fast mode draws the same output variance (:func:`dpfl.cim.engine.read_noise_variance`)."""
    if mode not in DEPLOY_MODES:
        raise UsageError(f"mode {mode!r} is not one of {', '.join(DEPLOY_MODES)}")
    if mode != "auto":
        return mode
    return "fast" if device.read_noise else "exact"


class CrossbarLayer(nn.Module):
    """A Conv2d or Linear whose matrix product runs on simulated crossbar tiles."""

    def __init__(
        self, layer: nn.Conv2d | nn.Linear, statistics: LayerCalibration, device: CrossbarDevice,
        mapping: str, mode: str, generators: DeviceGenerators,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise UsageError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        self.layer, self.device, self.mode = layer, device, mode
        self.read_generator = generators.read
        self.input_scale = statistics.scale
        weights = weight_matrix(layer)
        q, self.weight_step = quantise_weights(weights, device.weight_bits)
        self.q = q
        self.read_variance = self.transfers = self.effective = None
        self.tiles: list[Tile] = map_matrix(q, device, mapping, statistics.row_density, generators.programming)
        if mode == "exact" and not device.read_noise:
            self.transfers = [transfer_matrix(tile, device) for tile in self.tiles]
            if device.adc_bits is None:
                self.effective = transfer_weights(self.tiles, self.transfers, q.shape[0], q.shape[1])
        elif mode == "ideal":
            self.effective = q.double()
        elif mode == "fast":
            attenuation = [
                attenuation_map(tile, statistics.row_density, device, ATTENUATION_SAMPLES, generators.calibration)
                for tile in self.tiles
            ]
            self.effective = effective_weights(self.tiles, attenuation, q.shape[0], q.shape[1], device)
            if device.read_noise:
                self.read_variance = read_noise_variance(self.tiles, attenuation, q.shape[0], q.shape[1], device)
        self.bias_correction = self._bias_correction(weights, statistics.mean)
        self.correct_bias = False

    def _bias_correction(self, weights: torch.Tensor, mean_input: torch.Tensor) -> torch.Tensor:
        """Weight bias correction (:func:`set_bias_correction`): per output channel, the
        expected error of the weights the device realises, A = step · (its effective
        integer weights: Q on ideal crossbars, the transfer-matrix weights of the wires
        and the programmed cells in exact mode, the attenuated ones in fast mode),
        against W scaled by the layer's best gain g = <A, W> / <A, A> (A x is about
        W x / g), which a following GroupNorm divides out: with the layer's bias b,
        c = (W E[x] + b) / g - A E[x] - b, so that E[A x + c + b] = E[W x + b] / g and the
        mean output scales as the signal does. On ideal crossbars g is about 1 and c the
        quantisation error (W - step·Q) E[x]."""
        if self.effective is not None:
            realised = self.effective
        elif self.transfers is not None:  # with an ADC: its linear part, the reads before conversion
            realised = transfer_weights(self.tiles, self.transfers, *self.q.shape)
        else:  # read noise in exact mode: every read differs; the quantisation error alone
            realised = self.q.double()
        applied = realised * self.weight_step[:, None]
        power = float((applied * applied).sum())
        gain = float((applied * weights).sum()) / power if power > 0 else 1.0
        bias = 0.0 if self.layer.bias is None else self.layer.bias.detach().double()
        return (weights @ mean_input + bias) / gain - applied @ mean_input - bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        integers = quantise_activations(input_rows(layer, x), self.input_scale, self.device.activation_bits)
        if self.mode == "exact" and self.effective is None:
            products, _ = simulate_matmul(
                self.tiles, integers, self.q.shape[0], self.device, generator=self.read_generator,
                transfers=self.transfers, measure_nf=False,
            )
        else:
            products = integers.double() @ self.effective.T
            if self.read_variance is not None:
                variance = bit_serial_variance(integers, self.read_variance, self.device.activation_bits)
                noise = torch.randn(products.shape, generator=self.read_generator, dtype=torch.float64)
                products = products + noise * variance.sqrt()
        y = products * self.weight_step * self.input_scale
        if self.correct_bias:
            y = y + self.bias_correction
        y = y.to(x.dtype)
        if layer.bias is not None:
            y = y + layer.bias
        if isinstance(layer, nn.Linear):
            return y.reshape(*x.shape[:-1], layer.out_features)
        batch = x.shape[0]
        height, width = _conv_output_size(layer, x.shape[-2:])
        return y.reshape(batch, height * width, -1).transpose(1, 2).reshape(batch, -1, height, width)


def _conv_output_size(conv: nn.Conv2d, size: torch.Size) -> tuple[int, int]:
    padding = conv_padding(conv)
    return tuple(
        (size[d] + 2 * padding[d] - conv.dilation[d] * (conv.kernel_size[d] - 1) - 1) // conv.stride[d] + 1
        for d in range(2)
    )


def to_crossbars(
    model: nn.Module, statistics: dict[str, LayerCalibration], device: CrossbarDevice,
    mapping: str, mode: str, seed: int = 0, bias_correction: bool = False,
) -> nn.Module:
    """A copy of ``model`` whose Conv2d/Linear layers run on crossbars (``mode``:
    ``fast``, ``exact``, or ``ideal`` for the quantised digital reference); ``seed``
    fixes the device instance (:class:`DeviceGenerators`); ``bias_correction`` folds
    each layer's expected weight-quantisation error into its bias (:func:`set_bias_correction`)."""
    analog = copy.deepcopy(model).eval()
    generators = DeviceGenerators.from_seed(seed)
    for name, layer in mappable_layers(analog).items():
        replacement = CrossbarLayer(layer, statistics[name], device, mapping, mode, generators)
        if not name:  # the model is a single layer
            analog = replacement
            break
        parent_name, _, attribute = name.rpartition(".")
        setattr(analog.get_submodule(parent_name), attribute, replacement)
    return set_bias_correction(analog, bias_correction)


def crossbar_layers(analog: nn.Module) -> dict[str, CrossbarLayer]:
    """The :class:`CrossbarLayer` modules of a :func:`to_crossbars` model, by the name of
    the layer each replaced."""
    return {name: module for name, module in analog.named_modules() if isinstance(module, CrossbarLayer)}


def set_bias_correction(analog: nn.Module, enabled: bool) -> nn.Module:
    """Switch weight bias correction on or off in every crossbar layer of ``analog``
    (in place; returned for chaining): each output channel's bias gains the expected
    error of the weights the device realises (the quantisation error, and on a
    simulated device that of its wires and programmed cells), up to the gain a
    GroupNorm divides out (:meth:`CrossbarLayer._bias_correction`), with E[x] the
    layer's mean input on the calibration images (:class:`LayerCalibration`).
    Data-free in the sense of EMQ's weight bias correction (Kim et al., arXiv
    2510.20673): no labels, no training or fine-tuning per bit-width; the statistics
    are those the deployment already measures for the activation scale, on the
    deploying party's own images. A real periphery would measure the realised
    weights by one-hot reads of each tile, as drift compensation does."""
    for layer in crossbar_layers(analog).values():
        layer.correct_bias = enabled
    return analog


__all__ = ["CrossbarLayer", "DeviceGenerators", "LayerCalibration", "calibrate", "crossbar_layers",
           "mappable_layers", "resolve_mode", "set_bias_correction", "to_crossbars", "weight_matrix"]
