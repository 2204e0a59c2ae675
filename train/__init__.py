"""Training: typed configs, the DeepSpeed trainer, checkpoints, metrics and callbacks."""
