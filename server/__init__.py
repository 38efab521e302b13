"""The server side: the ServerApp, the run's records and checkpoints, the deployment round."""
