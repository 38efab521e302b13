"""DP-FedPGN-LS: DP-FedPGN whose released mean update is Laplacian-smoothed.

c is then the smoothed global step per local step, so c = (x_old − x_new)/(Kη)
still holds (the reference code built c from the unsmoothed deltas).
"""

from dpfl.strategies.base import Tensors
from dpfl.strategies.dp_fedpgn import DPFedPGN
from dpfl.strategies.smoothing import laplacian_smooth


class DPFedPGNLS(DPFedPGN):
    name = "dp-fedpgn-ls"
    description = "DP-FedPGN with implicit Laplacian smoothing (I + sigma L)^-1 of the noisy mean update"
    options = {**DPFedPGN.options, "ls-sigma": 1.0}

    def transform_update(self, server_round: int, mean_delta: Tensors) -> Tensors:
        sigma = float(self.option_values["ls-sigma"])
        return {name: laplacian_smooth(t, sigma) for name, t in mean_delta.items()}
