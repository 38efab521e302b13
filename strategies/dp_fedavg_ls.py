"""DP-FedAvg-LS: DP-FedAvg whose released mean update is Laplacian-smoothed."""

from dpfl.strategies.dp_fedavg import DPFedAvg
from dpfl.strategies.smoothing import SMOOTHING_OPTIONS, LaplacianSmoothedRelease


class DPFedAvgLS(LaplacianSmoothedRelease, DPFedAvg):
    name = "dp-fedavg-ls"
    description = "DP-FedAvg with implicit Laplacian smoothing (I + sigma L)^-1 of the noisy mean update"
    options = {**DPFedAvg.options, **SMOOTHING_OPTIONS}
