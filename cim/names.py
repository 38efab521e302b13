"""The weight mappings and inference modes of a crossbar deployment, without torch.

Why this module exists: ``dpfl deploy --help`` and the check of a run's deployment
settings list these names, and importing them from :mod:`dpfl.cim.mapping` or
:mod:`dpfl.cim.model` (which import torch) made printing help take seconds. Those modules
read them from here. It imports nothing.
"""

from __future__ import annotations

MAPPINGS = ("naive", "mdm", "sw-mdm", "gf-mdm")
# Analog inference modes (see dpfl.cim.model); "ideal" is the digital reference.
MODES = ("fast", "exact", "ideal")
# What a deployment may ask for: a mode, or "auto" (dpfl.cim.model.resolve_mode).
DEPLOY_MODES = ("auto", *MODES)

__all__ = ["DEPLOY_MODES", "MAPPINGS", "MODES"]
