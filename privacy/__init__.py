"""Client-level differential privacy: pure math, no Flower imports.

``sampling`` (Poisson client sampling), ``clipping`` (flat L2 clipping of the
private part of an update), ``noise`` (Gaussian noise on the sum and its split
across clients), ``accounting`` (Rényi-DP of the Poisson-subsampled Gaussian,
calibration) and ``validation`` (which models can be trained under DP).
"""
