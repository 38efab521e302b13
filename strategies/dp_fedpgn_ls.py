"""DP-FedPGN-LS: DP-FedPGN whose released mean update is Laplacian-smoothed.

c is then the smoothed global step per local step, so c = (x_old − x_new)/(Kη)
still holds (the DP-FedPGN authors' code, github.com/junkangLiu0/DP-FedPGN at
6203180, built c from the unsmoothed deltas).
"""

from dpfl.strategies.dp_fedpgn import DPFedPGN
from dpfl.strategies.smoothing import SMOOTHING_OPTIONS, LaplacianSmoothedRelease


class DPFedPGNLS(LaplacianSmoothedRelease, DPFedPGN):
    name = "dp-fedpgn-ls"
    description = "DP-FedPGN with implicit Laplacian smoothing (I + sigma L)^-1 of the noisy mean update"
    options = {**DPFedPGN.options, **SMOOTHING_OPTIONS}
