"""FedAvg without differential privacy: the reference curve."""

from dpfl.strategies.base import ClientLevelDPStrategy


class FedAvg(ClientLevelDPStrategy):
    name = "fedavg"
    description = "FedAvg without DP (reference curve): local SGD, plain mean of the reported updates"
    private = False
