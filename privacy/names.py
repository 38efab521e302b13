"""The noise mechanisms and participation schemas a run may name, without torch.

Why this module exists: ``dpfl privacy --help`` and the check of a run's settings list
these names, and importing them from :mod:`dpfl.privacy.participation` (which imports
torch and the matrix factorisation) made printing help take seconds. That module reads
them from here. It imports nothing.
"""

from __future__ import annotations

# Who may take part when (dpfl.privacy.participation.ParticipationSchema).
PARTICIPATIONS = ("poisson", "cyclic", "min-sep")
# The noise mechanisms (dpfl.privacy.factorizations): independent, banded MF, tree aggregation, buffered linear Toeplitz.
NOISE_MECHANISMS = ("gaussian", "bandmf", "tree", "blt")
# How the server gets the sum of the updates: it sees each ("plain") or only their masked sum ("secagg").
AGGREGATIONS = ("plain", "secagg")

__all__ = ["AGGREGATIONS", "NOISE_MECHANISMS", "PARTICIPATIONS"]
