"""The empirical privacy audit of a run configuration, through the real code path.

:func:`run_audit` runs the configured federation — the same ServerApp, strategy,
mechanism and ClientApp as ``dpfl simulate``, on the in-process engine — with m
canary clients added to the population. Each canary is in the federation with
probability ½ (drawn from the OS's CSPRNG; the excluded ones simply do not exist),
is sampled by the mechanism like any client, and when sampled sends the crafted
private part C·d_i for its own fixed random unit direction d_i, through the
client's own clip, noise and report functions. From the released models only,
the auditor scores every canary by ⟨x_first − x_final, d_i⟩ (the optimal test
statistic for a Gaussian mechanism: the released change of the model along the
canary's direction) and turns the scores into the one-run lower bound on ε of
:mod:`dpfl.privacy.audit`.

The real clients keep their partitions of the ``num-clients`` split; the
mechanism's public expected count qN stays that of the real clients.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from dpfl.client import app as client_module
from dpfl.client.app import update_reply
from dpfl.errors import UsageError
from dpfl.privacy.audit import AuditBound, audit_scores
from dpfl.privacy.clipping import global_l2_norm
from dpfl.privacy.mechanism import ClientInstructions, noise_share, privatise_update
from dpfl.privacy.randomness import Randomness
from dpfl.engines.simulation import follow_rounds, run_in_process_following
from dpfl.progress import Progress, no_progress
from dpfl.server.recorder import METRICS_FILE, SUMMARY_FILE
from dpfl.settings import RunSettings
from dpfl.strategies import get_strategy_class
from dpfl.strategies.base import ARRAYS_KEY, CONFIG_KEY, SERVER_ROUND_KEY
from dpfl.task.checkpoint import load_checkpoint

AUDIT_FILE = "audit.json"
AUDIT_PLOT = "audit.png"
RUN_DIR = "run"
FLOWER_LOG = "flower.log"

Tensors = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class AuditReport:
    """The accountant's ε of the audited run beside the audited lower bound."""

    strategy: str
    accountant_epsilon: float  # NaN where the run's ε is not a valid guarantee
    delta: float
    noise_multiplier: float
    rounds: int
    bound: AuditBound
    scores: list[float]
    included: list[bool]

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "bound": dataclasses.asdict(self.bound)}


def canary_direction(like: Tensors, seed: int, canary: int) -> Tensors:
    """Canary ``canary``'s fixed unit direction in parameter space (the auditor's public choice)."""
    generator = torch.Generator().manual_seed(hash((seed, canary)) % 2**63)  # ints only: the same in every process
    direction = {name: torch.randn(t.shape, generator=generator, dtype=torch.float64) for name, t in like.items()}
    norm = global_l2_norm(direction)
    return {name: t / norm for name, t in direction.items()}


class CanaryFederation:
    """The real ClientApp on nodes 0 .. n−1, the included canaries after them.

    It also keeps the first global model it relays: a released model, as any client sees it.
    """

    def __init__(self, num_clients: int, included: list[int], seed: int) -> None:
        self.num_clients = num_clients
        self.included = included
        self.seed = seed
        self.first_model: tuple[int, Tensors] | None = None
        self.app = ClientApp()
        self.app.train()(self._train)

    def _train(self, msg: Message, context: Context) -> Message:
        server_round = int(msg.content[CONFIG_KEY][SERVER_ROUND_KEY])
        if self.first_model is None or server_round < self.first_model[0]:
            self.first_model = (server_round, msg.content[ARRAYS_KEY].to_torch_state_dict())
        partition = int(context.node_config["partition-id"])
        if partition < self.num_clients:  # a real client, on its partition of the num-clients split
            node_config = {**context.node_config, "num-partitions": self.num_clients}
            real = Context(context.run_id, context.node_id, node_config, context.state, context.run_config)
            return client_module.train(msg, real)
        return self._canary_reply(msg, self.included[partition - self.num_clients])

    def _canary_reply(self, msg: Message, canary: int) -> Message:
        instructions = ClientInstructions.from_config(msg.content[CONFIG_KEY])
        like = msg.content[ARRAYS_KEY].to_torch_state_dict()
        stream = Randomness().stream("canary-noise")
        if not instructions.contribute_update:  # client placement, not sampled: its noise share only
            return update_reply(msg, noise_share(like, instructions, stream))
        direction = canary_direction(like, self.seed, canary)
        private = {name: (instructions.clip_norm * d).to(like[name].dtype) for name, d in direction.items()}
        update, norm = privatise_update(private, instructions, stream)
        return update_reply(msg, update, instructions.unclipped_report(norm))


def run_audit(
    settings: RunSettings, canaries: int, confidence: float, out: Path, progress: Progress = no_progress
) -> AuditReport:
    """Run ``settings``' federation with ``canaries`` canaries; write audit.json and audit.png under ``out``.
    ``progress`` sees each round."""
    if not get_strategy_class(settings.strategy).private:
        raise UsageError(f"strategy {settings.strategy} adds no noise (epsilon is infinite): there is nothing to audit")
    if canaries < 2:
        raise UsageError(f"canaries must be >= 2, got {canaries}")
    if not 0 < confidence < 1:
        raise UsageError(f"confidence must be in (0, 1), got {confidence}")
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / RUN_DIR
    settings = dataclasses.replace(settings, out_dir=str(run_dir), deploy=False)
    inclusion = Randomness().stream("audit-inclusion").bernoulli(canaries, 0.5)
    included = [canary for canary in range(canaries) if inclusion[canary]]
    federation = CanaryFederation(settings.num_clients, included, settings.seed)
    stage = f"audited run with {len(included)} canaries (rounds)"
    failure = run_in_process_following(
        settings, follow_rounds(run_dir / METRICS_FILE, lambda row: progress(stage, row["round"], settings.num_server_rounds)),
        client=federation.app, num_nodes=settings.num_clients + len(included), log=out / FLOWER_LOG,
    )  # fmt: skip
    if failure:
        raise RuntimeError(f"the audited run failed: {failure}; see {out / FLOWER_LOG}")
    if federation.first_model is None:
        raise RuntimeError(f"the audited run released no model; see {out / FLOWER_LOG}")
    first = federation.first_model[1]
    final = load_checkpoint(run_dir / "final_model.pt").state_dict
    change = {name: (first[name].double() - final[name].double()) for name in first}
    scores = [
        sum(float((change[name] * d).sum()) for name, d in canary_direction(first, settings.seed, canary).items())
        for canary in range(canaries)
    ]
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    bound = audit_scores(scores, [bool(flag) for flag in inclusion], settings.delta, confidence)
    report = AuditReport(
        strategy=settings.strategy,
        accountant_epsilon=math.nan if summary["epsilon"] is None else float(summary["epsilon"]),
        delta=settings.delta,
        noise_multiplier=float(summary["noise-multiplier"]),
        rounds=int(summary["rounds-completed"]),
        bound=bound,
        scores=scores,
        included=[bool(flag) for flag in inclusion],
    )
    (out / AUDIT_FILE).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    plot_audit(report, out / AUDIT_PLOT)
    return report


def plot_audit(report: AuditReport, path: Path) -> None:
    """The canaries' scores (included against excluded) and ε of the accountant against the audit."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (scores, epsilons) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    included = [s for s, flag in zip(report.scores, report.included) if flag]
    excluded = [s for s, flag in zip(report.scores, report.included) if not flag]
    bins = 30
    scores.hist([included, excluded], bins=bins, label=["included canaries", "excluded canaries"], alpha=0.8)
    scores.set(xlabel="score: released model change along the canary's direction", ylabel="canaries",
               title=f"{report.bound.canaries} canaries, {report.rounds} rounds")  # fmt: skip
    scores.legend()
    accountant = report.accountant_epsilon if math.isfinite(report.accountant_epsilon) else 0.0
    bars = epsilons.bar(["accountant\n(upper bound)", f"audit ({report.bound.confidence:.0%})\n(lower bound)"],
                        [accountant, report.bound.epsilon_lower], color=["tab:blue", "tab:orange"])  # fmt: skip
    epsilons.bar_label(bars, fmt="%.3f")
    epsilons.set(ylabel=f"epsilon (delta {report.delta:g})", title=report.strategy)
    for axes in (scores, epsilons):
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
