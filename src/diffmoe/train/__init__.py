"""Training: the loop, optimiser and schedule, checkpoints, distributed set-up, metrics."""

from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .loop import TrainingError, train

__all__ = ["train", "TrainingError", "CheckpointError", "save_checkpoint", "load_checkpoint", "latest_checkpoint"]
