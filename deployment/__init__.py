"""A federation's deployment onto its nodes' simulated CIM devices: each node compresses
the final model with its own data and runs it on its own device (``node``); the server
screens and tabulates what the nodes share (``federation``)."""
