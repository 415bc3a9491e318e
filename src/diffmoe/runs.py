"""A run directory (``diffmoe train``'s output) read back for inference: its config and trained model."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from .config import load_config
from .model import Decoder
from .train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_model_weights,
    read_trainer_state,
)


def load_run(run_dir, checkpoint: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """The trained model of a run directory: (RunConfig, Decoder in eval mode, checkpoint path).

    Uses ``checkpoint`` or the run's newest checkpoint; a run stopped during the dense warm-up loads as
    its dense model.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"not a run directory (no config.yaml): {run_dir}")
    cfg = load_config(str(run_dir / "config.yaml"))
    path = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    if path is None:
        found = list_checkpoints(run_dir)
        if found:  # all damaged: say what is wrong with the newest
            read_trainer_state(found[-1])
        raise CheckpointError(f"no checkpoint in {run_dir / 'checkpoints'}")
    meta = read_trainer_state(path)
    model_cfg = dataclasses.replace(cfg.model, ffn="dense") if meta.get("phase") == "dense" else cfg.model
    model = Decoder(model_cfg)
    load_model_weights(model, path)
    return cfg, model.to(device).eval(), path
