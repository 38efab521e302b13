"""Client-level differential privacy: pure math, no Flower imports.

``mechanism`` (the one owner of the client-level Gaussian mechanism: what clients
are told, their clip-and-noise, screening, the noisy mean, write-ahead accounting),
``randomness`` (secure ChaCha20 streams for noise and sampling), ``sampling``
(Poisson client sampling), ``clipping`` (flat L2 clipping in float64),
``accountants`` (one file per accountant: RDP, PRV, PLD, and their registry),
``calibration`` (σ for a target ε) and ``validation``
(which models can be trained under DP).
"""
