"""The server side: the ServerApp, central evaluation and the run's records."""
