"""Per-model recipes: applied when a key is not set, overridden by an explicit value, recorded."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from dpfl.errors import UsageError
from dpfl.settings import RunSettings, describe_recipe
from dpfl.strategies import get_strategy_class
from dpfl.task.checkpoint import CHECKPOINT_FORMAT, ModelSpec, load_checkpoint
from dpfl.task.files import save_tagged
from dpfl.task.models import VIT_DEPTH
from dpfl.task.recipes import RECIPES, SERVER_STEP_KEYS, UNSET, Recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE_FIELDS = [f.name for f in dataclasses.fields(Recipe)]


@pytest.mark.parametrize("model", sorted(RECIPES))
@pytest.mark.parametrize("strategy", ["dp-fedavg", "dp-fedpgn"])
def test_recipe_fills_every_unset_key(model, strategy):
    cls = get_strategy_class(strategy)
    settings = cls.resolved_settings(RunSettings(model=model, strategy=strategy))
    assert {name: getattr(settings, name) for name in UNSET} == RECIPES[model].values(cls.has_public_part())
    settings.validate()


@pytest.mark.parametrize("strategy, public_part", [("fedavg", False), ("dp-fedavg", False), ("dp-fedsam", False),
                                                   ("dp-fedpgn", True), ("dp-fedpgn-ls", True), ("fedcm", True)])
def test_the_vit_server_step_depends_on_whether_the_strategy_has_a_public_part(strategy, public_part):
    # docs/vit.md: Adam at 0.01 is the best step without a public part, plain sgd at 1 with one.
    cls = get_strategy_class(strategy)
    assert cls.has_public_part() is public_part
    settings = RunSettings(model="vit", strategy=strategy)
    assert (settings.server_optimizer, settings.server_lr) == (UNSET["server_optimizer"], UNSET["server_lr"])
    # The header of a comparison of several strategies shows both steps.
    header = describe_recipe(settings)
    assert "server-optimizer adam (sgd with a public part), server-lr 0.01 (1.0 with a public part)" in header
    assert "overridden" not in header
    resolved = cls.resolved_settings(settings)
    assert (resolved.server_optimizer, resolved.server_lr) == (("sgd", 1.0) if public_part else ("adam", 0.01))
    assert cls.resolved_settings(resolved) == resolved
    # What a resumed run reads back from its checkpoint's run config resolves to the same step.
    assert cls.resolved_settings(RunSettings.from_run_config(resolved.to_run_config())) == resolved
    built = cls.from_settings(settings, noise_multiplier=1.0, local_steps=1).server_optimizer
    assert (built.name, built.lr) == (resolved.server_optimizer, resolved.server_lr)


@pytest.mark.parametrize("strategy", ["dp-fedavg", "dp-fedpgn"])
@pytest.mark.parametrize("given, expected", [
    ({"server_optimizer": "adam", "server_lr": 0.03}, ("adam", 0.03)),
    ({"server_optimizer": "sgd", "server_lr": 1.0}, ("sgd", 1.0)),
    ({"server_optimizer": "momentum", "server_lr": 0.5}, ("momentum", 0.5)),
    ({"server_lr": 0.05}, None),  # the strategy's recipe optimiser at the given lr
    ({"server_optimizer": "adam"}, ("adam", 0.01)),  # a recipe optimiser keeps its recipe lr
    ({"server_optimizer": "sgd"}, ("sgd", 1.0)),
])  # fmt: skip
def test_an_explicit_server_step_wins_for_every_strategy(strategy, given, expected):
    cls = get_strategy_class(strategy)
    resolved = cls.resolved_settings(RunSettings(model="vit", strategy=strategy, **given))
    if expected is None:
        expected = ("sgd" if cls.has_public_part() else "adam", given["server_lr"])
    assert (resolved.server_optimizer, resolved.server_lr) == expected
    header = describe_recipe(resolved, cls.has_public_part())
    assert ("overridden" in header) == (expected != RECIPES["vit"].server_step(cls.has_public_part()))


@pytest.mark.parametrize("model, strategy, given, expected", [
    ("vit", "dp-fedpgn", "", "gamma=0.5"),
    ("vit", "dp-fedpgn-ls", "ls-sigma=2", "ls-sigma=2 gamma=0.5"),  # the user's other options kept
    ("vit", "dp-fedpgn", "gamma=0.3", "gamma=0.3"),  # the user's value wins
    ("vit", "dp-fedavg", "", ""),  # no gamma option: nothing added
    ("resnet10", "dp-fedpgn", "", ""),  # no recipe default: the class's (the paper's 0.2)
])  # fmt: skip
def test_recipe_option_defaults_apply_where_the_strategy_declares_them_and_the_user_did_not_set_them(
    model, strategy, given, expected
):
    cls = get_strategy_class(strategy)
    resolved = cls.resolved_settings(RunSettings(model=model, strategy=strategy, strategy_options=given))
    assert resolved.strategy_options == expected
    assert cls.resolved_settings(resolved) == resolved
    # What a resumed run reads back from its checkpoint's run config resolves to the same options.
    assert cls.resolved_settings(RunSettings.from_run_config(resolved.to_run_config())) == resolved
    built = cls.from_settings(RunSettings(model=model, strategy=strategy, strategy_options=given), noise_multiplier=1.0,
                              local_steps=1)  # fmt: skip
    assert built.option_values == {**cls.options, **cls.parse_options(expected)}
    if RECIPES[model].strategy_option_defaults:
        assert "strategy options gamma=0.5" in describe_recipe(resolved, cls.has_public_part())


@pytest.mark.parametrize("model", sorted(RECIPES))
def test_explicit_value_overrides_the_recipe(model):
    recipe = RECIPES[model]
    settings = RunSettings(model=model, lr=recipe.lr / 3, local_epochs=recipe.local_epochs + 2)
    assert settings.lr == recipe.lr / 3 and settings.local_epochs == recipe.local_epochs + 2
    assert settings.batch_size == recipe.batch_size  # the keys left unset still come from the recipe
    assert f"lr={recipe.lr / 3}" in describe_recipe(settings)


@pytest.mark.parametrize("model", sorted(RECIPES))
def test_flwr_run_config_applies_the_recipe_of_its_model(model):
    # `flwr run` always sends every key: the pyproject sentinels mean "not set".
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    config = {**pyproject, "model": model, "batch-size": 7}
    settings = RunSettings.from_run_config(config)
    assert settings.batch_size == 7
    assert settings.lr == RECIPES[model].lr and settings.pretraining == RECIPES[model].pretraining
    assert set(UNSET) | {f"public_part_{key}" for key in SERVER_STEP_KEYS} | {"strategy_option_defaults"} == set(RECIPE_FIELDS)


def test_the_vit_depth_is_a_recipe_key_and_a_convolutional_models_depth_is_fixed():
    assert RunSettings(model="vit").model_depth == RECIPES["vit"].model_depth
    settings = RunSettings(model="vit", model_depth=3)
    assert settings.model_depth == 3 and "overridden: model-depth=3" in describe_recipe(settings)
    model = ModelSpec("vit", 10, 1, 8, 4, depth=settings.model_depth).build()
    assert len(model.encoder.layers) == 3
    with pytest.raises(UsageError, match="model depth 2 applies to the vit only; resnet10's depth is fixed by its name"):
        RunSettings(model="resnet10", model_depth=2).validate()
    assert RunSettings(model="resnet10").model_depth == VIT_DEPTH  # the recipe's, which the ResNet ignores


def test_a_vit_checkpoint_saved_before_the_depth_setting_loads_with_its_depth(tmp_path):
    # Checkpoints written before ModelSpec had a depth name no depth: they hold the 4-block ViT.
    trained = ModelSpec("vit", 10, 1, 8, 4).build()
    old_spec = {"name": "vit", "num_classes": 10, "in_channels": 1, "image_size": 8, "width": 4}
    save_tagged(tmp_path / "old.pt", CHECKPOINT_FORMAT, {"model": old_spec, "dataset": "digits",
                "state_dict": trained.state_dict(), "compression": {}, "extra": {}})  # fmt: skip
    checkpoint = load_checkpoint(tmp_path / "old.pt")
    assert checkpoint.spec.depth == VIT_DEPTH == 4
    rebuilt = checkpoint.build_model()
    assert len(rebuilt.encoder.layers) == 4
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in trained.state_dict().items())


def test_a_recipe_never_asks_for_a_momentum_optimizer():
    # DP-FedPGN's public part is exact only for plain SGD; recipes may not change the optimizer.
    assert not {"momentum", "optimizer"} & set(RECIPE_FIELDS)


@pytest.mark.slow
def test_config_json_records_the_recipe_and_the_override(dpfl, tmp_path):
    common = ["--model", "cnn", "--width", "4", "--clients", "10", "--rounds", "1", "--engine", "in-process",
              "--strategy", "fedavg"]  # fmt: skip
    recipe = RECIPES["cnn"]
    by_recipe = dpfl("simulate", *common, "--out", str(tmp_path / "a"))
    assert by_recipe.returncode == 0, by_recipe.stderr
    header = " ".join(by_recipe.stdout.split())  # rich wraps long lines
    assert "recipe cnn: num-server-rounds 40," in header and "overridden: num-server-rounds=1, model-width=4" in header
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["lr"] == recipe.lr and config["local-epochs"] == recipe.local_epochs
    assert config["recipe"] == recipe.as_run_config()
    overridden = dpfl("simulate", *common, "--lr", "0.05", "--out", str(tmp_path / "b"))
    assert overridden.returncode == 0, overridden.stderr
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["lr"] == 0.05 and config["recipe"]["lr"] == recipe.lr


def test_a_run_records_and_resumes_with_its_strategys_server_step_and_options(dpfl_quick, tmp_path):
    # The default strategy, DP-FedPGN, has a public part: the ViT recipe's sgd at 1, not its Adam.
    out = tmp_path / "vit"
    tiny = ["--engine", "in-process", "--workers", "1"]
    first = dpfl_quick("simulate", "--model", "vit", "--pretraining", "none", "--width", "4", "--clients", "4",
                       "--local-epochs", "1", "--rounds", "1", "--noise-multiplier", "1.0", "--max-epsilon", "0",
                       *tiny, "--out", str(out))  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert "server-optimizer sgd, server-lr 1.0," in " ".join(first.stdout.split())  # the run header
    config = json.loads((out / "config.json").read_text())
    assert (config["strategy"], config["server-optimizer"], config["server-lr"]) == ("dp-fedpgn", "sgd", 1.0)
    assert config["strategy-options"] == "gamma=0.5"  # the recipe's default of DP-FedPGN's option
    assert config["recipe"] == RECIPES["vit"].as_run_config()
    assert (config["recipe"]["server-optimizer"], config["recipe"]["public-part-server-optimizer"]) == ("adam", "sgd")
    # The checkpoint's run config holds the resolved step, so a resume passes its config check.
    resumed = dpfl_quick("simulate", "--resume", str(out), "--rounds", "2", *tiny)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "summary.json").read_text())["rounds-completed"] == 2


def test_validation_split_is_a_stratified_share_of_the_servers_data():
    from dpfl.task.data import hold_out_validation, load_dataset

    data = load_dataset("digits", with_train=False)
    split = hold_out_validation(data, 0.5)
    assert len(split.validation) + len(split.test) == len(data.test)
    assert set(split.validation.indices).isdisjoint(split.test.indices)
    counts = np.bincount([int(y) for _, y in split.validation], minlength=10)
    assert counts.min() >= 17 and counts.max() <= 19  # 36 of each digit in the test set, halved
    assert hold_out_validation(data, 0.0) is data


@pytest.mark.slow
def test_a_short_vit_run_with_its_recipe_learns(dpfl, tmp_path):
    # The recipe's optimiser settings (lr, local epochs, batch size) from random weights:
    # `--pretraining none` keeps the test off the one-off pretraining (timed in docs/vit.md).
    # 360 balanced test images: a model that has not learnt stays near 10% (±5 points).
    out = tmp_path / "vit"
    result = dpfl("simulate", "--model", "vit", "--pretraining", "none", "--strategy", "fedavg", "--clients", "10",
                  "--sample-rate", "1.0", "--rounds", "3", "--noise-multiplier", "1.0", "--engine", "in-process",
                  "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    initial, final = rounds[0]["accuracy"], rounds[-1]["accuracy"]
    assert initial < 0.2
    assert final >= initial + 0.2, [r["accuracy"] for r in rounds]  # > 10 standard errors of a guess
