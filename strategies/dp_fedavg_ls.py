"""DP-FedAvg-LS: DP-FedAvg whose released mean update is Laplacian-smoothed."""

from dpfl.strategies.base import Tensors
from dpfl.strategies.dp_fedavg import DPFedAvg
from dpfl.strategies.smoothing import laplacian_smooth


class DPFedAvgLS(DPFedAvg):
    name = "dp-fedavg-ls"
    description = "DP-FedAvg with implicit Laplacian smoothing (I + sigma L)^-1 of the noisy mean update"
    options = {"ls-sigma": 1.0}

    def transform_update(self, server_round: int, mean_delta: Tensors) -> Tensors:
        sigma = float(self.option_values["ls-sigma"])
        return {name: laplacian_smooth(t, sigma) for name, t in mean_delta.items()}
