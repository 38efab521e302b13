"""One node's deployment: the final global model, compressed with the node's own data,
run on the node's own simulated CIM device, reported into the node's own storage.

Who decides what. The device, the mapping and the compression are the node's: its own
config (keys below) first; then what the run config proposes (its ``deploy-*`` defaults
and its ``deploy-node-configs`` entry for this node), but only device and compression
keys, and only those the node allows (``deploy-run-config-keys``, by default every
``device-*`` and ``compress-*`` key). What the node shares and where it writes
(``share-accuracy``, ``share-nf``, ``node-dir``) come from the node alone.

What the node returns is a summary. Its device and compression settings are the
node's own choices. Its non-ideality factors (NF) and its accuracies are statistics
of its own data (NF is measured on the layer inputs of its calibration slice), not
covered by the training's ε: each is returned only if the node opted in
(``share-nf``, ``share-accuracy``). A failure is returned as one of a few fixed
strings, never with numbers (a reason such as "72 local examples are too few" would
state the node's data size); the full reason goes to the node's private log. Neither
the input statistics (Σ) nor any data leave it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from dpfl.cim.device import CrossbarDevice
from dpfl.cim.names import MAPPINGS
from dpfl.cim.study import cim_study, save_report
from dpfl.compression.names import METHODS, NORMS
from dpfl.compression.pipeline import CompressionConfig, compress_on_data
from dpfl.compression.study import StudyOptions, plan_layer_ranks
from dpfl.errors import UsageError
from dpfl.settings import RUN_CONFIG_NODE_PREFIXES, RunSettings, coerce_config_value, parse_node_configs
from dpfl.task.attention import explicit_attention
from dpfl.task.checkpoint import Checkpoint, ModelSpec, save_checkpoint

# Node-config keys. Every CrossbarDevice field is ``device-<field>`` in kebab case
# (``device-tile-size``, ``device-r-on``, ...); ``device-r-wire`` sets both wire
# resistances; ``device-adc-bits = 0`` is an ideal ADC.
DEVICE_PREFIX = "device-"
DEVICE_NAME_KEY = "device-name"
DEVICE_MAPPING_KEY = "device-mapping"
DEVICE_WIRE_KEY = "device-r-wire"
METHOD_KEY, NORM_KEY, RATIO_KEY = "compress-method", "compress-norm", "compress-ratio"
# The node's own choices: never taken from the run config.
SHARE_ACCURACY_KEY = "share-accuracy"
SHARE_NF_KEY = "share-nf"
# The share of its data held out to evaluate: a run config that chose it could learn the
# node's data size from whether the split succeeds.
HOLDOUT_KEY, DEFAULT_HOLDOUT = "deploy-holdout", 0.25
# Which keys the node accepts from the run config (fnmatch patterns; "none" for none).
ACCEPTED_KEY = "deploy-run-config-keys"
ACCEPTED_BY_DEFAULT = tuple(prefix + "*" for prefix in RUN_CONFIG_NODE_PREFIXES)

# The one (config) record of a node's reply to the deployment query.
DEPLOYMENT_KEY = "deployment"
MODEL_FILE = "compressed_model.pt"
COMPRESSION_REPORT_FILE = "compression_report.json"
# Summary keys a node may return; the server refuses a reply with any other key.
STATUS_KEY, REASON_KEY = "status", "reason"
DEPLOYED, FAILED = "deployed", "failed"
# The only reasons a failed deployment states (the node's private log has the details).
CONFIG_FAILURE = "the node's deployment settings are invalid"
DEPLOY_FAILURE = "the deployment failed on this node"
NOT_LAST_WEIGHTS = "refused: these are not the weights of this node's last train message"
ALREADY_DEPLOYED = "refused: this node deploys once per run"
POLICY_REFUSAL = "refused by this node's privacy policy"
FAILURE_REASONS = (CONFIG_FAILURE, DEPLOY_FAILURE, NOT_LAST_WEIGHTS, ALREADY_DEPLOYED, POLICY_REFUSAL)
NF_KEYS = tuple(f"nf-{mapping}" for mapping in MAPPINGS)
# Mappings a node studies beside the one it deploys: the naive baseline, MDM and sw-MDM
# (each costs an analog model; gf-mdm only when it is the node's own).
STUDIED_MAPPINGS = ("naive", "mdm", "sw-mdm")
# Accuracy on the node's device at its own precision, without and with weight bias correction.
CORRECTED = "-corrected"


def shared_accuracy_keys(mappings: tuple[str, ...]) -> tuple[str, ...]:
    """The accuracy keys of a node that shares its accuracies and studied ``mappings``."""
    return ("accuracy-global", "accuracy-compressed", "accuracy-quantised", "accuracy-quantised" + CORRECTED,
            *(f"accuracy-analog-{mapping}{kind}" for mapping in mappings for kind in ("", CORRECTED)))  # fmt: skip


SHARED_ACCURACY_KEYS = shared_accuracy_keys(MAPPINGS)
DEVICE_KEYS = tuple(DEVICE_PREFIX + f.name.replace("_", "-") for f in dataclasses.fields(CrossbarDevice))
SUMMARY_KEYS = frozenset(
    {STATUS_KEY, REASON_KEY, DEVICE_NAME_KEY, DEVICE_MAPPING_KEY, METHOD_KEY, NORM_KEY, RATIO_KEY,
     *NF_KEYS, *DEVICE_KEYS, *SHARED_ACCURACY_KEYS}
)  # fmt: skip


@dataclass(frozen=True)
class NodeDeployment:
    """What one node deploys, and onto which device."""

    device_name: str
    device: CrossbarDevice
    mapping: str
    mode: str
    method: str
    norm: str
    ratio: float
    holdout: float
    share_accuracy: bool
    share_nf: bool
    storage: Path
    seed: int
    sweep_tile_sizes: tuple[int, ...]

    def public_summary(self) -> dict[str, Any]:
        """The device and compression settings: what the node shares in any case."""
        device = {DEVICE_PREFIX + k.replace("_", "-"): (0 if v is None else v) for k, v in self.device.as_dict().items()}
        return {DEVICE_NAME_KEY: self.device_name, DEVICE_MAPPING_KEY: self.mapping, METHOD_KEY: self.method,
                NORM_KEY: self.norm, RATIO_KEY: self.ratio, **device}  # fmt: skip


def run_config_proposal(settings: RunSettings, node_config: Mapping[str, Any]) -> dict[str, Any]:
    """What the run config proposes to this node: its ``deploy-*`` defaults as node keys, under
    its ``deploy-node-configs`` entry for the node's partition (round robin)."""
    proposal: dict[str, Any] = {METHOD_KEY: settings.deploy_method, NORM_KEY: settings.deploy_norm,
                                RATIO_KEY: settings.deploy_ratio, DEVICE_MAPPING_KEY: settings.deploy_mapping}  # fmt: skip
    simulated = parse_node_configs(settings.deploy_node_configs)
    if simulated and "partition-id" in node_config:
        proposal.update(simulated[int(node_config["partition-id"]) % len(simulated)])
    return proposal


def effective_node_config(node_config: Mapping[str, Any], proposal: Mapping[str, Any]) -> dict[str, Any]:
    """The node's own config over the device and compression keys of ``proposal`` that it accepts."""
    raw = str(node_config.get(ACCEPTED_KEY, " ".join(ACCEPTED_BY_DEFAULT)))
    patterns = [] if raw.strip() == "none" else raw.replace(",", " ").split()
    accepted = {key: value for key, value in proposal.items()
                if key.startswith(RUN_CONFIG_NODE_PREFIXES) and any(fnmatch(key, p) for p in patterns)}  # fmt: skip
    return {**accepted, **node_config}


def _coerce(key: str, value: Any, kind: type) -> Any:
    # The run config's parsing (bool words, integral ints), named as a node-config key.
    return coerce_config_value(f"node config {key}", value, kind)


def device_from_config(config: Mapping[str, Any]) -> CrossbarDevice:
    """A ``CrossbarDevice`` from the ``device-*`` keys of a node config (defaults for the rest)."""
    fields = {DEVICE_PREFIX + f.name.replace("_", "-"): f for f in dataclasses.fields(CrossbarDevice)}
    known = {*fields, DEVICE_NAME_KEY, DEVICE_MAPPING_KEY, DEVICE_WIRE_KEY}
    unknown = sorted(key for key in config if key.startswith(DEVICE_PREFIX) and key not in known)
    if unknown:
        raise UsageError(f"unknown node config key(s) {', '.join(unknown)}; device keys: {', '.join(sorted(known))}")
    values: dict[str, Any] = {}
    if DEVICE_WIRE_KEY in config:
        wire = _coerce(DEVICE_WIRE_KEY, config[DEVICE_WIRE_KEY], float)
        values.update(r_wordline=wire, r_bitline=wire)
    for key, field in fields.items():
        if key not in config:
            continue
        # The annotation (a string under postponed evaluation) names the type; an optional
        # field (adc_bits, drift_time) is None when the node config gives 0.
        annotation = str(field.type)
        kind = next((t for t in (bool, float, int, str) if t.__name__ in annotation), str)
        value = _coerce(key, config[key], kind)
        values[field.name] = None if "None" in annotation and value == 0 else value
    return CrossbarDevice(**values)


def node_deployment(settings: RunSettings, config: Mapping[str, Any], storage: Path) -> NodeDeployment:
    """Validate and resolve a node's deployment from its effective node config; any bad
    value is a one-line UsageError. Keys the node left unset take the platform's defaults."""
    defaults = RunSettings()
    device = device_from_config(config)
    device.check_precision()
    mapping = str(config.get(DEVICE_MAPPING_KEY, defaults.deploy_mapping))
    method = str(config.get(METHOD_KEY, defaults.deploy_method))
    norm = str(config.get(NORM_KEY, defaults.deploy_norm))
    ratio = _coerce(RATIO_KEY, config.get(RATIO_KEY, defaults.deploy_ratio), float)
    for key, value, allowed in ((DEVICE_MAPPING_KEY, mapping, MAPPINGS), (METHOD_KEY, method, METHODS), (NORM_KEY, norm, NORMS)):
        if value not in allowed:
            raise UsageError(f"node config {key} {value!r} is not one of {', '.join(allowed)}")
    if not 0 < ratio < 1:
        raise UsageError(f"node config {RATIO_KEY} must be in (0, 1), got {ratio}")
    holdout = _coerce(HOLDOUT_KEY, config.get(HOLDOUT_KEY, DEFAULT_HOLDOUT), float)
    if not 0 < holdout < 1:
        raise UsageError(f"node config {HOLDOUT_KEY} must be in (0, 1), got {holdout}")
    return NodeDeployment(
        device_name=str(config.get(DEVICE_NAME_KEY, f"tile{device.tile_size}")), device=device, mapping=mapping,
        mode=settings.deploy_mode, method=method, norm=norm, ratio=ratio, holdout=holdout,
        share_accuracy=_coerce(SHARE_ACCURACY_KEY, config.get(SHARE_ACCURACY_KEY, False), bool),
        share_nf=_coerce(SHARE_NF_KEY, config.get(SHARE_NF_KEY, False), bool),
        storage=storage, seed=settings.seed, sweep_tile_sizes=settings.sweep_tile_sizes(),
    )  # fmt: skip


def split_holdout(data: Dataset, fraction: float, seed: int) -> tuple[Subset, Subset]:
    """The node's data as (calibration, held-out) slices, a seeded random split."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    held = max(1, round(fraction * len(data)))
    if held >= len(data):
        raise UsageError(f"{len(data)} local examples are too few to hold out {fraction:.0%} for evaluation")
    return Subset(data, order[held:]), Subset(data, order[:held])


def deploy_on_node(
    plan: NodeDeployment, spec: ModelSpec, dataset: str, global_weights: dict[str, torch.Tensor], data: Dataset
) -> dict[str, Any]:
    """Compress the global model with the node's data, run it on the node's device,
    write the full report to ``plan.storage`` and return the shareable summary."""
    started = time.perf_counter()
    calibration, held_out = split_holdout(data, plan.holdout, plan.seed)
    model = spec.build()
    model.load_state_dict(global_weights)
    model.eval()
    explicit_attention(model)
    ranks = plan_layer_ranks(model, StudyOptions(ratio=plan.ratio, method=plan.method))
    compression = compress_on_data(
        model, calibration, held_out, (spec.in_channels, spec.image_size, spec.image_size), plan.method, plan.norm,
        ranks, config=CompressionConfig(seed=plan.seed),
    )  # fmt: skip
    studied = tuple(dict.fromkeys((*STUDIED_MAPPINGS, plan.mapping)))
    report, losses = cim_study(model, calibration, held_out, plan.device, plan.mapping, plan.mode, plan.seed,
                               sweep_tile_sizes=plan.sweep_tile_sizes, mappings=studied)  # fmt: skip
    report.context.update(model=spec.name, dataset=dataset, compressed=True, device_name=plan.device_name,
                          held_out_images=len(held_out), local_images=len(data),
                          seconds=time.perf_counter() - started)  # fmt: skip
    # Everything is computed before anything is written.
    plan.storage.mkdir(parents=True, exist_ok=True)
    save_checkpoint(plan.storage / MODEL_FILE, Checkpoint(spec, dataset, model.state_dict(), compression.record))
    (plan.storage / COMPRESSION_REPORT_FILE).write_text(
        json.dumps({**compression.report(), "ratio": plan.ratio, "scope": "model"}, indent=2) + "\n"
    )
    save_report(report, losses, plan.storage)
    summary = {**plan.public_summary(), STATUS_KEY: DEPLOYED}
    if plan.share_nf:
        summary.update({f"nf-{mapping}": report.distortion[mapping].nf for mapping in studied})
    if plan.share_accuracy:
        summary.update({
            "accuracy-global": compression.accuracy_before, "accuracy-compressed": compression.accuracy_after,
            "accuracy-quantised": report.accuracy["quantised"],
            "accuracy-quantised" + CORRECTED: report.accuracy["quantised_corrected"],
            **{f"accuracy-analog-{mapping}": report.accuracy[f"analog_{mapping}"] for mapping in studied},
            **{f"accuracy-analog-{mapping}{CORRECTED}": report.accuracy[f"analog_{mapping}_corrected"] for mapping in studied},
        })  # fmt: skip
    return summary


def failure_summary(reason: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """A failed deployment: one of the fixed :data:`FAILURE_REASONS`, and the device's name if the node gave one."""
    assert reason in FAILURE_REASONS, reason
    summary = {STATUS_KEY: FAILED, REASON_KEY: reason}
    if DEVICE_NAME_KEY in config:
        summary[DEVICE_NAME_KEY] = str(config[DEVICE_NAME_KEY])
    return summary


def run_node_deployment(
    settings: RunSettings, node_config: Mapping[str, Any], storage: Path,
    load_data: Callable[[], tuple[ModelSpec, str, Dataset]], global_weights: dict[str, torch.Tensor],
) -> tuple[dict[str, Any], str | None]:
    """A node's whole deployment: (the summary it returns, the full reason of a failure for its
    private log). A bad node config, ratio or layer fails only this node."""
    config: Mapping[str, Any] = node_config
    try:
        config = effective_node_config(node_config, run_config_proposal(settings, node_config))
        plan = node_deployment(settings, config, storage)
    except UsageError as err:
        return failure_summary(CONFIG_FAILURE, config), str(err)
    try:
        spec, dataset, data = load_data()
        return deploy_on_node(plan, spec, dataset, global_weights, data), None
    except Exception as err:  # noqa: BLE001 - whatever fails, the server learns only the fixed reason
        return failure_summary(DEPLOY_FAILURE, config), f"{type(err).__name__}: {err}"
