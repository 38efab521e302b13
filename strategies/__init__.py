"""Federated strategies, one per module, each a server part and a client part.

``get_strategy_class(name)`` resolves a name from :data:`BUILTIN_STRATEGIES`.
"""

from __future__ import annotations

from dpfl.errors import UsageError
from dpfl.strategies.base import ClientLevelDPStrategy, LocalUpdateRule
from dpfl.strategies.dp_fedavg import DPFedAvg
from dpfl.strategies.dp_fedpgn import DPFedPGN

BUILTIN_STRATEGIES: dict[str, type[ClientLevelDPStrategy]] = {
    cls.name: cls for cls in (DPFedPGN, DPFedAvg)
}


def get_strategy_class(name: str) -> type[ClientLevelDPStrategy]:
    if name not in BUILTIN_STRATEGIES:
        raise UsageError(f"unknown strategy {name!r}; choose one of {', '.join(BUILTIN_STRATEGIES)}")
    return BUILTIN_STRATEGIES[name]


__all__ = ["BUILTIN_STRATEGIES", "ClientLevelDPStrategy", "DPFedAvg", "DPFedPGN", "LocalUpdateRule", "get_strategy_class"]
