"""Engines that run a federation: the same ServerApp and ClientApp in this process
(``inprocess``), or in Flower's local simulation with its own SuperLink and
processes (``local_federation``); ``simulation`` runs a configured run on either."""

# The engines a run may name (``dpfl simulate --engine``).
ENGINES = ("flower", "in-process")
