"""DP-FedAvg (McMahan et al. 2018): local SGD, the whole update is private."""

from dpfl.strategies.base import ClientLevelDPStrategy, LocalUpdateRule


class DPFedAvg(ClientLevelDPStrategy):
    """Client-level DP-FedAvg: DP-FedPGN's harness with γ = 1 (no global direction)."""

    name = "dp-fedavg"
    description = "DP-FedAvg: local SGD; the whole update is clipped and noised"
    local_update_rule = LocalUpdateRule
