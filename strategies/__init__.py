"""Federated strategies, one per module, each a server part and a client part.

Strategies are found through the ``dpfl.strategies`` entry-point group (built-ins
are registered in dpfl's own pyproject.toml) or given as ``module:Class``; see
``docs/plugins.md`` for writing one.
"""

from dpfl.strategies.base import ClientLevelDPStrategy, LocalUpdateRule
from dpfl.strategies.registry import get_strategy_class, registered_strategies

__all__ = [
    "ClientLevelDPStrategy",
    "LocalUpdateRule",
    "get_strategy_class",
    "registered_strategies",
]
