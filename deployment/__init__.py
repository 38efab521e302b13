"""Deployment of a trained model onto simulated CIM edge devices: the study behind
``dpfl deploy`` and the per-node deployment round of a federation."""
