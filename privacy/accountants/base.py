"""The client-level accountant interface.

Every accountant counts one Poisson-subsampled Gaussian release per round and
keeps Opacus's history format, ``[(noise multiplier, sample rate, rounds), ...]``,
with consecutive equal rounds merged. Its ε is a pure, memoised function of that
history: a run asks for ε after the next round (the budget check), then for the
same ε once the round is released, so each round costs one computation.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from dpfl.errors import UsageError

# (noise multiplier, sample rate, number of rounds), as in Opacus's accountant history.
History = Sequence[tuple[float, float, int]]
HistoryKey = tuple[tuple[float, float, int], ...]


class Accountant(ABC):
    """ε of client-level DP after the rounds recorded so far, at a fixed δ.

    ``state_dict`` round-trips through JSON, so a resumed run keeps its full ledger.
    """

    mechanism: ClassVar[str]

    def __init__(self, delta: float) -> None:
        self.delta = delta
        self._history: list[tuple[float, float, int]] = []

    @abstractmethod
    def _privacy_spent(self, history: HistoryKey) -> tuple[float, float]:
        """(ε, best RDP order or NaN) after a non-empty ``history``."""

    def spent(self, history: History) -> tuple[float, float]:
        """(ε, best RDP order, NaN for accountants without one) after ``history``, not recorded.

        A round with infinite noise releases nothing about anyone and costs nothing: it
        is left out (the libraries would divide by it, or never converge).
        """
        if any(math.isnan(sigma) or math.isnan(q) for sigma, q, _ in history):
            raise UsageError(f"a noise multiplier or sample rate is not a number: {list(history)}")
        history = [(sigma, q, steps) for sigma, q, steps in history if steps and not math.isinf(sigma)]
        if not history:
            return 0.0, math.nan
        epsilon, order = self._privacy_spent(tuple(map(tuple, history)))
        if not epsilon >= 0:  # NaN included
            raise ArithmeticError(f"the {self.mechanism} accountant computed epsilon {epsilon} for {history}: a bug")
        return epsilon, order

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return list(self._history)

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        self._history = _with_round(self._history, noise_multiplier, sample_rate)

    def privacy_spent(self) -> tuple[float, float]:
        return self.spent(self._history)

    def epsilon(self) -> float:
        return self.privacy_spent()[0]

    def epsilon_after_step(self, noise_multiplier: float, sample_rate: float) -> float:
        """ε if one more round were released, without recording it."""
        return self.spent(_with_round(self._history, noise_multiplier, sample_rate))[0]

    def state_dict(self) -> dict:
        return {"accountant": self.mechanism, "delta": self.delta, "history": [list(h) for h in self._history]}

    def continue_from(self, history: History) -> None:
        """Count the rounds of ``history`` (another run's ledger over the same clients) as already spent.

        Only the (σ, q, rounds) history carries over: composition does not depend on
        δ or on which accountant recorded it, so this accountant's ε covers both runs.
        """
        merged: list[tuple[float, float, int]] = []
        for sigma, q, steps in [*history, *self._history]:
            for _ in range(int(steps)):
                merged = _with_round(merged, float(sigma), float(q))
        self._history = merged

    def load_state_dict(self, state: dict) -> None:
        # States saved before the accountant was selectable are RDP's.
        saved = state.get("accountant", "rdp")
        if saved != self.mechanism:
            raise UsageError(
                f"this run was accounted with {saved!r}; it cannot be resumed with the {self.mechanism!r} accountant"
            )
        self.delta = float(state["delta"])
        self._history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]


def _with_round(history: History, noise_multiplier: float, sample_rate: float) -> list[tuple[float, float, int]]:
    """``history`` plus one round, merged into the last entry when σ and q are unchanged (as Opacus does)."""
    if history and history[-1][:2] == (noise_multiplier, sample_rate):
        return [*history[:-1], (noise_multiplier, sample_rate, history[-1][2] + 1)]
    return [*history, (noise_multiplier, sample_rate, 1)]
