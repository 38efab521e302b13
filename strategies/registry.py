"""Finding strategies: the ``dpfl.strategies`` entry points and ``module:Class`` plugins.

Every strategy, built-in or third-party, is resolved and checked here, so that a
bad plugin (it does not import, lacks a part, or returns the wrong thing) fails in
one line naming it before any federation starts; :mod:`dpfl.plugins` then runs each
hook once (it needs the client's training, a layer above the strategies).
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any


from dpfl.errors import UsageError
from dpfl.strategies.base import (
    PLATFORM_CONFIG_KEYS,
    ClientLevelDPStrategy,
    LocalUpdateRule,
)

ENTRY_POINT_GROUP = "dpfl.strategies"


@lru_cache(maxsize=1)
def registered_strategies() -> dict[str, Any]:
    """Name → entry point of every installed strategy."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def get_strategy_class(name: str) -> type[ClientLevelDPStrategy]:
    """A strategy class by registered name or ``module:Class``, checked for shape."""
    return _resolve(name)


@lru_cache(maxsize=32)
def _resolve(name: str) -> type[ClientLevelDPStrategy]:
    if ":" in name:
        module_name, _, class_name = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as err:  # noqa: BLE001 - any failure to import is the plugin's
            raise UsageError(f"strategy plugin {name!r}: cannot import {module_name!r} ({type(err).__name__}: {err})") from None
        if not hasattr(module, class_name):
            raise UsageError(f"strategy plugin {name!r}: module {module_name!r} has no {class_name!r}")
        cls = getattr(module, class_name)
    else:
        registered = registered_strategies()
        if name not in registered:
            raise UsageError(
                f"unknown strategy {name!r}; choose one of {', '.join(sorted(registered))} or give module:Class"
            )
        try:
            cls = registered[name].load()
        except Exception as err:  # noqa: BLE001
            raise UsageError(f"strategy {name!r} cannot be loaded ({type(err).__name__}: {err})") from None
    check_strategy_class(cls, name)
    return cls


def check_strategy_class(cls: Any, label: str) -> None:
    """Refuse what is not a complete dpfl strategy, naming the problem."""
    if not (isinstance(cls, type) and issubclass(cls, ClientLevelDPStrategy)):
        raise UsageError(f"strategy plugin {label!r} is not a subclass of dpfl.strategies.ClientLevelDPStrategy")
    if not (isinstance(cls.name, str) and cls.name):
        raise UsageError(f"strategy plugin {label!r} has no name (set the class attribute `name`)")
    if not isinstance(cls.description, str) or not cls.description:
        raise UsageError(f"strategy plugin {label!r} has no description (set the class attribute `description`)")
    taken = sorted(PLATFORM_CONFIG_KEYS & set(cls.options))
    if taken:
        raise UsageError(f"strategy plugin {label!r} declares option {', '.join(taken)}, which the platform owns; rename it")
    rule = cls.local_update_rule
    if not (isinstance(rule, type) and issubclass(rule, LocalUpdateRule)):
        raise UsageError(f"strategy plugin {label!r}: local_update_rule is not a subclass of LocalUpdateRule")
