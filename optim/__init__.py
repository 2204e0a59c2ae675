"""Optimizers and learning-rate schedules, with parameter groups built from the model's structure."""
from optim.builder import build_optimizer
from optim.schedule import build_scheduler, lr_multiplier

__all__ = ["build_optimizer", "build_scheduler", "lr_multiplier"]
