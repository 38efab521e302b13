"""Per-model recipes: applied when a key is not set, overridden by an explicit value, recorded."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from dpfl.settings import RunSettings, describe_recipe
from dpfl.task.recipes import RECIPES, UNSET, Recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE_FIELDS = [f.name for f in dataclasses.fields(Recipe)]


@pytest.mark.parametrize("model", sorted(RECIPES))
def test_recipe_fills_every_unset_key(model):
    settings = RunSettings(model=model)
    assert {name: getattr(settings, name) for name in RECIPE_FIELDS} == dataclasses.asdict(RECIPES[model])
    settings.validate()


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
    assert set(UNSET) == set(RECIPE_FIELDS)


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
