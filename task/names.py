"""The data sets a run may name, without torch.

Why this module exists: ``dpfl compress --help``, ``dpfl deploy --help`` and the check of a
run's settings list these names, and importing them from :mod:`dpfl.task.data` (which
imports torch) made printing help take seconds. :mod:`dpfl.task.data` reads them from here.
It imports nothing.
"""

from __future__ import annotations

# (torchvision class name, channels, classes, native size, mean, std)
TORCHVISION_DATASETS = {
    "cifar10": ("CIFAR10", 3, 10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("CIFAR100", 3, 100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ("MNIST", 1, 10, 28, (0.1307,), (0.3081,)),
    "fashion-mnist": ("FashionMNIST", 1, 10, 28, (0.2860,), (0.3530,)),
}
BUNDLED_DATASETS = ("digits", "mnist5k", "fakedata")
DATASET_NAMES = (*BUNDLED_DATASETS, *TORCHVISION_DATASETS, "imagefolder")

__all__ = ["BUNDLED_DATASETS", "DATASET_NAMES", "TORCHVISION_DATASETS"]
