"""Training: the trainer (loop.py) and its parts: the step, the callbacks (logging, evaluation,
checkpoints, the dense warm-up, MoE per-step updates), the loggers, checkpoints, evaluation, metrics,
optimiser and schedule. Parallelism and process groups live in :mod:`diffmoe.parallel`."""

from .callbacks import TrainingError
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .loop import train

__all__ = ["train", "TrainingError", "CheckpointError", "save_checkpoint", "load_checkpoint", "latest_checkpoint"]
