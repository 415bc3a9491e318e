"""Training: the trainer (loop.py) and its parts: the step, parallelize, checkpoints, evaluation, metrics,
optimiser and schedule, and the process-group set-up."""

from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .loop import TrainingError, train

__all__ = ["train", "TrainingError", "CheckpointError", "save_checkpoint", "load_checkpoint", "latest_checkpoint"]
