"""The empirical privacy audit of a run configuration, through the real code path.

:func:`run_audit` runs the configured federation — the same ServerApp, strategy,
mechanism and ClientApp as ``dpfl simulate``, on the in-process engine — with m
canary clients added to the population. Each canary is in the federation with
probability ½ (drawn from the OS's CSPRNG; the excluded ones simply do not exist)
and is sampled by the mechanism like any client. The real clients keep their
partitions of the ``num-clients`` split; the mechanism's public expected count qN
stays that of the real clients. What a canary is and what the auditor sees follow
the threat model (:data:`THREATS`):

``white-box``: the auditor sees every released round model, and each canary is a
gradient canary: whenever it is sampled its client sends the private part C·d_i for
its own direction d_i, through the mechanism's client half (clip, noise share,
report). The directions are orthonormal by construction (random disjoint supports
with random signs, :class:`OrthogonalDirections`), so canaries do not interfere.
A canary's score is its aligned signal summed over rounds, Σ_t ⟨x_t − x_{t+1}, d_i⟩/s_t,
each round scaled by the spread s_t of all canaries' projections that round (a robust
scale that uses no inclusion bit, so every statistic stays valid).

``final-model``: the auditor sees only the first and the last released models, and
each canary is an input-space canary: a client whose only data is one random image
with a random label, trained by the real ClientApp through its ``data-file``. A
canary's score is how much the final model's loss on its example fell from the
first model's, against the other canaries of its label (:class:`InputCanaries`).

The scores become the statistic's lower bound (:mod:`dpfl.privacy.audit`), shown
beside the accountant's ε, the last-iterate heuristic ε and Andrew et al.'s
one-shot estimate, in ``audit.json`` and ``audit.png``.

The mechanism under audit is a parameter (:data:`CanaryReply`): the client half
a gradient canary goes through. The default is the client-level Gaussian
mechanism's (:func:`client_level_canary_reply`); another mechanism (secure
aggregation's encoded shares, a correlated-noise mechanism's client step) passes
its own, and nothing else here assumes how the server adds its noise.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from dpfl.client import app as client_module
from dpfl.client.app import update_reply
from dpfl.client.data import write_data_file
from dpfl.engines.simulation import follow_rounds, run_in_process_following
from dpfl.errors import UsageError
from dpfl.privacy.audit import STATISTICS, AuditBound, OneShotEstimate, audit_scores, one_shot_estimate
from dpfl.privacy.mechanism import ClientInstructions, noise_share, privatise_update
from dpfl.privacy.randomness import Randomness
from dpfl.progress import Progress, no_progress
from dpfl.server.recorder import METRICS_FILE, SUMMARY_FILE
from dpfl.settings import RunSettings
from dpfl.strategies import get_strategy_class
from dpfl.strategies.base import ARRAYS_KEY, CONFIG_KEY, SERVER_ROUND_KEY
from dpfl.task.checkpoint import ModelSpec, load_checkpoint
from dpfl.task.data import cached_dataset

AUDIT_FILE = "audit.json"
AUDIT_PLOT = "audit.png"
RUN_DIR = "run"
CANARY_DIR = "canaries"
FLOWER_LOG = "flower.log"
THREATS = ("white-box", "final-model")
# Canaries when none are asked for. White-box: 2000 (σ/2 at ε = 8 is then flagged in
# nearly every run of the small federation; 1000 missed one in 15), or one per model
# parameter if fewer. Final-model: each canary trains like a client, so fewer.
DEFAULT_CANARIES = {"white-box": 2000, "final-model": 500}
# A robust spread: the median absolute deviation times this is the standard deviation of a Gaussian.
MAD_TO_STD = 1.4826

Tensors = dict[str, torch.Tensor]
# The client half of the mechanism under audit, for a gradient canary: from the round's
# train message and the canary's unit direction (None when it is not sampled this
# round but still asked, e.g. for a noise share), the reply its client sends.
CanaryReply = Callable[[Message, Tensors | None], Message]


@dataclasses.dataclass(frozen=True)
class AuditOptions:
    """How to audit: the canaries, the threat model, the statistic and its confidence."""

    canaries: int | None = None  # None: DEFAULT_CANARIES for the threat model
    confidence: float = 0.95
    threat: str = "white-box"
    statistic: str = "gaussian"

    def validate(self) -> None:
        if self.canaries is not None and self.canaries < 4:
            raise UsageError(f"canaries must be >= 4 (the Gaussian statistic fits at least 2 included and 2 excluded), got {self.canaries}")
        if not 0 < self.confidence < 1:
            raise UsageError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.threat not in THREATS:
            raise UsageError(f"unknown threat model {self.threat!r}; known: {', '.join(THREATS)}")
        if self.statistic not in STATISTICS:
            raise UsageError(f"unknown statistic {self.statistic!r}; known: {', '.join(STATISTICS)}")

    def canaries_for(self, parameters: int) -> int:
        """The canaries to insert into a model with ``parameters`` floating-point entries."""
        if self.canaries is not None:
            return self.canaries
        default = DEFAULT_CANARIES[self.threat]
        return min(default, parameters) if self.threat == "white-box" else default


@dataclasses.dataclass(frozen=True)
class AuditReport:
    """The accountant's ε of the audited run beside the audit's bounds and estimate."""

    strategy: str
    threat: str
    statistic: str
    accountant_epsilon: float  # NaN where the run's ε is not a valid guarantee
    last_iterate_epsilon: float  # the heuristic; NaN where ε is not valid
    delta: float
    noise_multiplier: float
    rounds: int
    bound: AuditBound  # the chosen statistic's
    bounds: dict[str, AuditBound]  # every statistic's, for comparison
    estimate: OneShotEstimate
    scores: list[float]
    included: list[bool]

    @property
    def flagged(self) -> bool:
        """Whether the lower bound exceeds the accountant's ε: the code leaks more than it claims."""
        return math.isfinite(self.accountant_epsilon) and self.bound.epsilon_lower > self.accountant_epsilon

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "flagged": self.flagged}


def client_level_canary_reply(msg: Message, direction: Tensors | None) -> Message:
    """The client-level Gaussian mechanism's client half for a gradient canary, as the ClientApp runs it.

    The private part is the unit direction at the clip norm the client is told, so
    clipping keeps it whole: a contribution at the sensitivity bound.
    """
    instructions = ClientInstructions.from_config(msg.content[CONFIG_KEY])
    like = msg.content[ARRAYS_KEY].to_torch_state_dict()
    stream = Randomness().stream("canary-noise")
    if direction is None or not instructions.contribute_update:  # its noise share only
        return update_reply(msg, noise_share(like, instructions, stream))
    private = {name: (instructions.clip_norm * direction[name]).to(t.dtype) if name in direction else torch.zeros_like(t)
               for name, t in like.items()}  # fmt: skip
    update, norm = privatise_update(private, instructions, stream)
    return update_reply(msg, update, instructions.unclipped_report(norm))


class OrthogonalDirections:
    """``count`` orthonormal random directions over a model's floating-point entries.

    Each direction has its own random support of ⌊d/count⌋ coordinates (the supports
    are disjoint) carrying random signs, so any two are exactly orthogonal, and all of
    them together are one permutation and one sign vector: projecting a model change
    on every direction is one gather and one sum.
    """

    def __init__(self, like: Tensors, count: int, seed: int) -> None:
        self.shapes = {name: t.shape for name, t in like.items() if t.is_floating_point()}
        self.dimension = dimension = sum(math.prod(shape) for shape in self.shapes.values())
        if count > dimension:
            raise UsageError(f"{count} gradient canaries need as many model parameters, the model has {dimension}; "
                             "use fewer canaries or a wider model")  # fmt: skip
        generator = torch.Generator().manual_seed(seed)
        self.width = dimension // count
        self.support = torch.randperm(dimension, generator=generator)[: count * self.width].reshape(count, self.width)
        signs = torch.randint(0, 2, (count, self.width), generator=generator, dtype=torch.float64) * 2 - 1
        self.signs = signs / math.sqrt(self.width)

    def direction(self, canary: int) -> Tensors:
        flat = torch.zeros(self.dimension, dtype=torch.float64)
        flat[self.support[canary]] = self.signs[canary]
        parts = flat.split([math.prod(shape) for shape in self.shapes.values()])
        return {name: part.reshape(shape) for (name, shape), part in zip(self.shapes.items(), parts)}

    def project(self, change: Tensors) -> np.ndarray:
        """⟨change, d_i⟩ for every direction."""
        flat = torch.cat([change[name].double().reshape(-1) for name in self.shapes])
        return (flat[self.support] * self.signs).sum(dim=1).numpy()


class WhiteBoxObserver:
    """Sums each canary's aligned signal over the released round models, round by round."""

    def __init__(self, directions: OrthogonalDirections) -> None:
        self.directions = directions
        self.last: tuple[int, Tensors] | None = None
        self.signals: list[np.ndarray] = []  # one row per observed change, each scaled to unit spread

    def see(self, server_round: int, model: Callable[[], Tensors]) -> None:
        """The model released before ``server_round`` (``model()`` reads it: only once per round)."""
        if self.last is not None and server_round <= self.last[0]:
            return
        self.finish(current := model())
        self.last = (server_round, current)

    def finish(self, model: Tensors) -> None:
        """Add the change from the last model seen to ``model``."""
        if self.last is None:
            return
        projections = self.directions.project({name: self.last[1][name].double() - model[name].double()
                                               for name in self.directions.shapes})  # fmt: skip
        spread = MAD_TO_STD * float(np.median(np.abs(projections - np.median(projections))))
        self.signals.append(projections / (spread if spread > 0 else 1.0))

    def scores(self, final: Tensors) -> np.ndarray:
        self.finish(final)
        self.last = None
        return np.sum(self.signals, axis=0)


class CanaryFederation:
    """The real ClientApp on nodes 0 .. n−1, the included canaries after them.

    It keeps what the auditor may see: the released model of every round (for the
    white-box observer) and the first one.
    """

    def __init__(
        self,
        num_clients: int,
        included: list[int],
        canary_train: Callable[[Message, Context, int], Message],
        observer: WhiteBoxObserver | None = None,
    ) -> None:
        self.num_clients = num_clients
        self.included = included
        self.canary_train = canary_train
        self.observer = observer
        self.first_model: tuple[int, Tensors] | None = None
        self.app = ClientApp()
        self.app.train()(self._train)

    def _train(self, msg: Message, context: Context) -> Message:
        server_round = int(msg.content[CONFIG_KEY][SERVER_ROUND_KEY])
        if self.first_model is None or server_round < self.first_model[0]:
            self.first_model = (server_round, msg.content[ARRAYS_KEY].to_torch_state_dict())
        if self.observer is not None:
            self.observer.see(server_round, msg.content[ARRAYS_KEY].to_torch_state_dict)
        partition = int(context.node_config["partition-id"])
        if partition < self.num_clients:  # a real client, on its partition of the num-clients split
            return client_module.train(msg, with_node_config(context, {**context.node_config, "num-partitions": self.num_clients}))
        return self.canary_train(msg, context, self.included[partition - self.num_clients])


def with_node_config(context: Context, node_config: dict[str, Any]) -> Context:
    return Context(context.run_id, context.node_id, node_config, context.state, context.run_config)


class InputCanaries:
    """One data file per canary: a random image (standard normal, the inputs' normalised scale) with a random label.

    A canary's score is how much its example's loss fell from the first released model
    to the last, minus the mean fall over the canaries with the same label (which uses
    no inclusion bit): the canaries' images all look alike to a model, so each label's
    common drift, pushed by every included canary of that label, would otherwise add to
    every canary's score of that label.
    """

    def __init__(self, settings: RunSettings, canaries: int, folder: Path) -> None:
        data = cached_dataset(settings.dataset, settings.data_dir, settings.image_size, with_train=False)
        self.spec = ModelSpec.for_data(settings.model, settings.model_width, data, settings.model_depth)
        generator = torch.Generator().manual_seed(settings.seed)
        self.images = torch.randn((canaries, data.in_channels, data.image_size, data.image_size), generator=generator)
        self.labels = torch.randint(0, data.num_classes, (canaries,), generator=generator)
        folder.mkdir(parents=True, exist_ok=True)
        self.files = [folder / f"canary-{canary}.pt" for canary in range(canaries)]
        for canary, file in enumerate(self.files):
            write_data_file(file, self.images[canary : canary + 1], self.labels[canary : canary + 1], data.num_classes,
                            settings.dataset)  # fmt: skip

    def losses(self, weights: Tensors) -> np.ndarray:
        """Each canary's loss under the model ``weights``."""
        model = self.spec.build()
        model.load_state_dict(weights)
        model.eval()
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(self.images), self.labels, reduction="none").double().numpy()

    def scores(self, first: Tensors, final: Tensors) -> np.ndarray:
        fall = self.losses(first) - self.losses(final)
        labels = self.labels.numpy()
        label_means = {label: fall[labels == label].mean() for label in np.unique(labels)}
        return fall - np.array([label_means[label] for label in labels])


def run_audit(
    settings: RunSettings, options: AuditOptions, out: Path, canary_reply: CanaryReply = client_level_canary_reply,
    progress: Progress = no_progress,
) -> AuditReport:
    """Run ``settings``' federation with canaries as ``options`` say; write audit.json and audit.png under ``out``.

    ``canary_reply`` is the client half of the mechanism under audit, for gradient canaries;
    ``progress`` sees each round.
    """
    options.validate()
    if not get_strategy_class(settings.strategy).private:
        raise UsageError(f"strategy {settings.strategy} adds no noise (epsilon is infinite): there is nothing to audit")
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / RUN_DIR
    settings = dataclasses.replace(settings, out_dir=str(run_dir), deploy=False)
    like = initial_model(settings)
    canaries = options.canaries_for(sum(t.numel() for t in like.values() if t.is_floating_point()))
    inclusion = Randomness().stream("audit-inclusion").bernoulli(canaries, 0.5)
    included = [canary for canary in range(canaries) if inclusion[canary]]
    observer = inputs = None
    if options.threat == "white-box":
        directions = OrthogonalDirections(like, canaries, settings.seed)
        observer = WhiteBoxObserver(directions)

        def canary_train(msg: Message, context: Context, canary: int) -> Message:
            return canary_reply(msg, directions.direction(canary))
    else:
        inputs = InputCanaries(settings, canaries, out / CANARY_DIR)

        def canary_train(msg: Message, context: Context, canary: int) -> Message:
            # The real ClientApp on a node whose only data is the canary's example.
            return client_module.train(msg, with_node_config(context, {"data-file": str(inputs.files[canary]),
                                                                       "partition-id": context.node_config["partition-id"]}))  # fmt: skip

    federation = CanaryFederation(settings.num_clients, included, canary_train, observer)
    stage = f"audited run with {len(included)} canaries (rounds)"
    failure = run_in_process_following(
        settings, follow_rounds(run_dir / METRICS_FILE, lambda row: progress(stage, row["round"], settings.num_server_rounds)),
        client=federation.app, num_nodes=settings.num_clients + len(included), log=out / FLOWER_LOG,
    )  # fmt: skip
    if failure:
        raise RuntimeError(f"the audited run failed: {failure}; see {out / FLOWER_LOG}")
    if federation.first_model is None:
        raise RuntimeError(f"the audited run released no model; see {out / FLOWER_LOG}")
    final = load_checkpoint(run_dir / "final_model.pt").state_dict
    scores = observer.scores(final) if observer is not None else inputs.scores(federation.first_model[1], final)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    flags = [bool(flag) for flag in inclusion]
    bounds = {statistic: audit_scores(scores, flags, settings.delta, options.confidence, statistic)
              for statistic in STATISTICS}  # fmt: skip
    report = AuditReport(
        strategy=settings.strategy,
        threat=options.threat,
        statistic=options.statistic,
        accountant_epsilon=_epsilon(summary["epsilon"]),
        last_iterate_epsilon=_epsilon(summary.get("last-iterate-epsilon")),
        delta=settings.delta,
        noise_multiplier=float(summary["noise-multiplier"]),
        rounds=int(summary["rounds-completed"]),
        bound=bounds[options.statistic],
        bounds=bounds,
        estimate=one_shot_estimate(scores, flags, settings.delta),
        scores=[float(score) for score in scores],
        included=flags,
    )
    (out / AUDIT_FILE).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    plot_audit(report, out / AUDIT_PLOT)
    return report


def initial_model(settings: RunSettings) -> Tensors:
    """A model of the run's architecture (only its names and shapes are used)."""
    data = cached_dataset(settings.dataset, settings.data_dir, settings.image_size, with_train=False)
    return ModelSpec.for_data(settings.model, settings.model_width, data, settings.model_depth).build().state_dict()


def _epsilon(value: float | None) -> float:
    return math.nan if value is None else float(value)


def plot_audit(report: AuditReport, path: Path) -> None:
    """The canaries' scores (included against excluded) and the four ε of the run side by side."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (scores, epsilons) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    included = [s for s, flag in zip(report.scores, report.included) if flag]
    excluded = [s for s, flag in zip(report.scores, report.included) if not flag]
    scores.hist([included, excluded], bins=40, label=["included canaries", "excluded canaries"], alpha=0.8)
    what = "aligned signal summed over rounds" if report.threat == "white-box" else "fall of the canary's loss"
    scores.set(xlabel=f"score: {what}", ylabel="canaries",
               title=f"{report.threat}: {report.bound.canaries} canaries, {report.rounds} rounds")  # fmt: skip
    scores.legend()
    names = ["accountant\n(upper bound)", "last iterate\n(heuristic)",
             f"audit, {report.statistic}\n(lower bound, {report.bound.confidence:.0%})", "one-shot\nestimate"]  # fmt: skip
    values = [report.accountant_epsilon, report.last_iterate_epsilon, report.bound.epsilon_lower, report.estimate.epsilon]
    bars = epsilons.bar(names, [v if math.isfinite(v) else 0.0 for v in values],
                        color=["tab:blue", "tab:cyan", "tab:orange", "tab:gray"])  # fmt: skip
    epsilons.bar_label(bars, labels=[f"{v:.2f}" if math.isfinite(v) else "not valid" for v in values])
    epsilons.set(ylabel=f"epsilon (delta {report.delta:g})", title=report.strategy)
    epsilons.tick_params(axis="x", labelsize=8)
    for axes in (scores, epsilons):
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
