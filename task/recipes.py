"""Per-model training recipes: the defaults each built-in model needs to learn.

A run-config key a recipe governs is "not set" when it holds its sentinel
(:data:`UNSET`: 0 for a number, ``"auto"`` for a string): the default of
``RunSettings`` and of ``[tool.flwr.app.config]`` in pyproject.toml. Such a key
takes the model's recipe value; any other value is the user's and wins. Every
recipe keeps plain SGD with momentum 0 (the platform's local optimizer), so a
recipe is sound for every strategy, DP-FedPGN's exact public part included.

How each recipe was found is recorded in docs/vit.md (the ViT) and the README
(the ResNet-10, whose values the CNN and ResNet-18 share).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from dpfl.errors import UsageError


@dataclass(frozen=True)
class Recipe:
    num_server_rounds: int
    sample_rate: float
    model_width: int
    lr: float
    lr_decay: float
    local_epochs: int
    batch_size: int
    clip_norm: float
    # The server's optimiser on the released mean update (dpfl.task.server_optimizer)
    server_optimizer: str
    server_lr: float
    # Initial weights: "none" (the model's random init) or "fractal" (dpfl.task.pretraining)
    pretraining: str

    def as_run_config(self) -> dict[str, Any]:
        return {key.replace("_", "-"): value for key, value in asdict(self).items()}


# The value that means "take the recipe's" for each governed key.
UNSET: dict[str, Any] = {f.name: ("auto" if f.type == "str" else 0) for f in fields(Recipe)}

# Tuned on the ResNet-10 (README, "What `make run` does"); the CNN and ResNet-18
# share them until tuned on their own.
_CONVOLUTIONAL = Recipe(
    num_server_rounds=40,
    sample_rate=0.25,
    model_width=8,
    lr=0.3,
    lr_decay=0.98,
    local_epochs=1,
    batch_size=16,
    clip_norm=0.2,
    server_optimizer="sgd",
    server_lr=1.0,
    pretraining="none",
)

RECIPES: dict[str, Recipe] = {
    "resnet10": _CONVOLUTIONAL,
    "resnet18": _CONVOLUTIONAL,
    "cnn": _CONVOLUTIONAL,
    # docs/vit.md: public fractal pretraining, then private fine-tuning.
    "vit": Recipe(
        num_server_rounds=40,
        sample_rate=0.25,
        model_width=8,
        lr=0.1,
        lr_decay=1.0,
        local_epochs=5,
        batch_size=16,
        clip_norm=0.3,
        server_optimizer="adam",
        server_lr=0.03,
        pretraining="fractal",
    ),
}


def recipe_for(model: str) -> Recipe:
    if model not in RECIPES:
        raise UsageError(f"unknown model {model!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[model]
