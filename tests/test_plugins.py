"""The plugin API: the documented example runs as a plugin; bad plugins fail in one line."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model", "cnn", "--width", "4", "--clients", "10", "--sample-rate", "0.5", "--rounds", "2"]


def documented_example() -> str:
    text = (ROOT / "docs" / "plugins.md").read_text()
    block = re.search(r"<!-- plugin-example:start -->\n```python\n(.*?)```\n<!-- plugin-example:end -->", text, re.S)
    return block.group(1)


@pytest.mark.parametrize("engine", ["in-process", pytest.param("flower", marks=pytest.mark.slow)])
def test_documented_example_runs_as_a_plugin_from_a_temporary_directory(dpfl, tmp_path, engine):
    (tmp_path / "fedprox_plugin.py").write_text(documented_example())
    out = tmp_path / "run"
    result = dpfl(
        "simulate", *SMALL, "--strategy", "fedprox_plugin:DPFedProx", "--strategy-option", "mu=0.1",
        "--engine", engine, "--out", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outcome"] == "completed" and summary["strategy"] == "fedprox_plugin:DPFedProx"
    assert json.loads((out / "config.json").read_text())["strategy-options"] == "mu=0.1"


BAD_PLUGINS = {
    "raises_on_import": ("raise RuntimeError('broken at import')\n", "Strategy", "cannot import 'raises_on_import' (RuntimeError: broken at import)"),
    "no_class": ("x = 1\n", "Strategy", "module 'no_class' has no 'Strategy'"),
    "not_a_strategy": ("class Strategy:\n    pass\n", "Strategy", "is not a subclass of dpfl.strategies.ClientLevelDPStrategy"),
    "skips_dp": (
        """
        from dpfl.strategies import ClientLevelDPStrategy
        class Strategy(ClientLevelDPStrategy):
            name = "skips-dp"
            description = "averages without noise"
            def aggregate_updates(self, server_round, x, updates):
                return x
        """,
        "Strategy",
        "overrides aggregate_updates, which the platform owns",
    ),
    "wrong_return": (
        """
        from dpfl.strategies import ClientLevelDPStrategy, LocalUpdateRule
        class Rule(LocalUpdateRule):
            def public_part(self, steps, lr):
                return [0.0]
        class Strategy(ClientLevelDPStrategy):
            name = "wrong-return"
            description = "returns a list as its public part"
            local_update_rule = Rule
        """,
        "Strategy",
        "local_update_rule.public_part must return None or a dict of tensors shaped like the model's",
    ),
    "option_named_clip_norm": (
        """
        from dpfl.strategies import ClientLevelDPStrategy
        class Strategy(ClientLevelDPStrategy):
            name = "loose-clip"
            description = "declares an option that would shadow the platform's clip norm"
            options = {"clip-norm": 100.0}
        """,
        "Strategy",
        "declares option clip-norm, which the platform owns",
    ),
    "round_config_sets_noise": (
        """
        from dpfl.strategies import ClientLevelDPStrategy
        class Strategy(ClientLevelDPStrategy):
            name = "no-noise"
            description = "sends its own client noise level"
            def round_config(self, server_round):
                return {"noise-multiplier": 0.0}
        """,
        "Strategy",
        "round_config sets noise-multiplier, which the platform owns",
    ),
    "rebinds_randomness": (  # the audit's old broken plugin: noise at σ/100 while ε counts σ
        """
        from dpfl.privacy.randomness import Randomness
        from dpfl.strategies.dp_fedavg import DPFedAvg
        class Strategy(DPFedAvg):
            name = "quiet-noise"
            description = "replaces the mechanism's randomness"
            def apply_settings(self, settings):
                self.mechanism.randomness = Randomness(0)
        """,
        "Strategy",
        "Strategy uses self.mechanism, the platform's privacy state",
    ),
    "releases_the_sample_size": (
        """
        from dpfl.strategies.dp_fedavg import DPFedAvg
        class Strategy(DPFedAvg):
            name = "leaky"
            description = "writes the realised sample size into the released model"
            def transform_update(self, server_round, mean_delta):
                name = next(iter(mean_delta))
                mean_delta[name].view(-1)[0] = self.private_diagnostics["sampled"]
                return mean_delta
        """,
        "Strategy",
        "Strategy uses self.private_diagnostics, the platform's privacy state",
    ),
    "leaks_through_a_mixin": (  # the check reads every class the strategy inherits from
        """
        from dpfl.strategies.dp_fedavg import DPFedAvg
        class Bookkeeping:
            def extra_state(self):
                return {"n": self.private_diagnostics.get("sampled")}
        class Strategy(Bookkeeping, DPFedAvg):
            name = "mixin-leak"
            description = "keeps the sample size in its public state"
        """,
        "Strategy",
        "Strategy uses self.private_diagnostics, the platform's privacy state",
    ),
    "lowers_the_accountants_delta": (
        """
        from dpfl.strategies.dp_fedavg import DPFedAvg
        class Strategy(DPFedAvg):
            name = "large-delta"
            description = "makes epsilon look small"
            def apply_settings(self, settings):
                self.accountant.delta = 0.5
        """,
        "Strategy",
        "Strategy uses self.accountant, the platform's privacy state",
    ),
    "lifts_the_budget": (
        """
        from dpfl.strategies.dp_fedavg import DPFedAvg
        class Strategy(DPFedAvg):
            name = "no-budget"
            description = "raises its own epsilon budget"
            def apply_settings(self, settings):
                self.max_epsilon = float("inf")
        """,
        "Strategy",
        "failed its check (AttributeError: property 'max_epsilon' of 'Strategy' object has no setter)",
    ),
    "record_replaces_model": (
        """
        from dpfl.strategies import ClientLevelDPStrategy
        class Strategy(ClientLevelDPStrategy):
            name = "swap-model"
            description = "sends another model in place of the global one"
            def extra_records(self, server_round):
                from flwr.app import ArrayRecord
                import torch
                return {"arrays": ArrayRecord({"w": torch.zeros(1)})}
        """,
        "Strategy",
        "extra_records uses arrays, which the platform owns",
    ),
    "overrides_sampling": (
        """
        from dpfl.strategies import ClientLevelDPStrategy
        class Strategy(ClientLevelDPStrategy):
            name = "everyone"
            description = "its own learning-rate schedule"
            def round_lr(self, server_round):
                return 1.0
        """,
        "Strategy",
        "overrides round_lr, which the platform owns",
    ),
    "no_name": (
        """
        from dpfl.strategies import ClientLevelDPStrategy
        class Strategy(ClientLevelDPStrategy):
            description = "no name"
        """,
        "Strategy",
        "has no name",
    ),
}


@pytest.mark.parametrize("module", sorted(BAD_PLUGINS))
def test_bad_plugins_are_refused_in_one_line(dpfl_quick, tmp_path, module):
    source, cls, message = BAD_PLUGINS[module]
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    result = dpfl_quick("simulate", *SMALL, "--strategy", f"{module}:{cls}", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{module}:{cls}" in result.stderr and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_unknown_strategy_option_is_named(dpfl_quick, tmp_path):
    result = dpfl_quick("simulate", *SMALL, "--strategy", "dp-fedsam", "--strategy-option", "mu=1", "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and "strategy dp-fedsam has no option 'mu=1'; its options: rho" in result.stderr


def test_strategies_lists_builtins_with_descriptions(dpfl_quick):
    result = dpfl_quick("strategies")
    assert result.returncode == 0
    for name in ("dp-fedpgn", "dp-fedavg", "dp-fedsam", "dp-fedavg-ls", "dp-fedpgn-ls", "fedavg", "fedcm"):
        assert name in result.stdout
