"""FedCM (Xu et al. 2021) without differential privacy: client-level momentum.

Its local step is DP-FedPGN's, d = γ·g + (1−γ)·c (FedCM writes α for γ and uses
about 0.1); without DP nothing is clipped or noised.
"""

from dpfl.strategies.dp_fedpgn import DPFedPGN


class FedCM(DPFedPGN):
    name = "fedcm"
    description = "FedCM without DP (reference curve): local steps mix the gradient with the last global step"
    private = False
