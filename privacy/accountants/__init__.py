"""Client-level accountants, one per file, and their registry.

``rdp`` (Opacus's RDP analysis with a refined order), ``prv`` (Opacus's PRV) and
``pld`` (dp-accounting's PLD) share the interface of :mod:`.base`; a run names
its accountant and :func:`create_accountant` builds it. ``skellam`` (:mod:`.skellam`,
the distributed Skellam mechanism of secure aggregation) shares the interface but takes
that mechanism's parameters, so it is not in the registry.
"""

from __future__ import annotations

from dpfl.errors import UsageError
from dpfl.privacy.accountants.base import Accountant, History, HistoryKey
from dpfl.privacy.accountants.pld import PLDClientAccountant
from dpfl.privacy.accountants.prv import PRVClientAccountant
from dpfl.privacy.accountants.rdp import RDPClientAccountant

ACCOUNTANTS: dict[str, type[Accountant]] = {
    "rdp": RDPClientAccountant,
    "prv": PRVClientAccountant,
    "pld": PLDClientAccountant,
}


def create_accountant(name: str, delta: float) -> Accountant:
    """A fresh client-level accountant of the kind ``name`` (a key of :data:`ACCOUNTANTS`)."""
    if name not in ACCOUNTANTS:
        raise UsageError(f"unknown accountant {name!r}; known accountants: {', '.join(ACCOUNTANTS)}")
    return ACCOUNTANTS[name](delta)


__all__ = [
    "ACCOUNTANTS", "Accountant", "History", "HistoryKey", "PLDClientAccountant", "PRVClientAccountant",
    "RDPClientAccountant", "create_accountant",
]
