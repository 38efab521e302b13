"""The learning task: models, data sets, partitions and checkpoints."""
