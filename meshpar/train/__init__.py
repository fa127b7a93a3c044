"""Training: config, plan, losses, the trainer, checkpoints, data."""
