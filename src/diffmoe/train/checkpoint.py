"""Checkpoints: a directory per step, written atomically, independent of the world size; no pickle.

    RUN/checkpoints/step-00000100/
        model/                 the model's tensors by parameter name, as safetensors shards written by
                               every rank (torch.distributed.checkpoint; :mod:`diffmoe.parallel.dcp`)
        optimizer/             AdamW state per parameter name (exp_avg, exp_avg_sq, step), likewise
        trainer.json           step, phase (dense | moe), counters, the layout that wrote it, the run
                               config, and a format version

A checkpoint written by N ranks in any layout (ddp, fsdp, ep, etp) loads into M ranks in any layout,
or into one process without a process group (evaluation, generation). The directory is assembled
under a temporary name and renamed into place by rank 0 after every rank has written its shards, so
a crash never leaves a directory named ``step-*`` that is incomplete; older checkpoints beyond
``keep`` are then deleted. ``consolidate`` writes one ``model.safetensors`` on demand.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..parallel import dcp

FORMAT_VERSION = 2
ENTRIES = ("model", "optimizer", "trainer.json")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or damaged; the message names the file."""


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def save_checkpoint(run_dir, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict, keep: int, rank: int = 0) -> Path:
    """Write the checkpoint of ``step`` atomically and prune to the newest ``keep``; every rank of the
    run calls this (rank 0 arranges the directories). Returns its path."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".tmp-{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save_model_and_optimizer(model, optimizer, tmp)
    _barrier()  # every rank's shards are written
    if rank == 0:
        meta = dict(trainer_state, format_version=FORMAT_VERSION, step=step)
        with open(tmp / "trainer.json", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        old = final.parent / f".old-{final.name}"
        if final.exists():  # the same step again (a run stopping on bad steps): never without a copy
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        for stale in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir())


def latest_checkpoint(run_dir) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_trainer_state(path: str | os.PathLike) -> dict:
    """The trainer.json of a checkpoint directory, checked for completeness."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    for name in ENTRIES:
        if not (path / name).exists():
            raise CheckpointError(f"incomplete checkpoint {path}: {name} is missing")
    try:
        meta = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"damaged checkpoint file {path / 'trainer.json'}: {err}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path / 'trainer.json'}: format_version {meta.get('format_version')!r}, "
                              f"this diffmoe reads {FORMAT_VERSION}")
    return meta


def check_model_entry(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """The stored tensors of a checkpoint's ``model`` folder match ``model``'s names and full shapes."""
    folder = Path(path) / "model"
    try:
        stored = dcp.stored_shapes(folder)
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"damaged checkpoint file in {folder}: {err}") from None
    expected = {k: tuple(v.shape) for k, v in dcp.model_state(model).items()}
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{folder} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, shape in expected.items():
        if stored[name] != shape:
            raise CheckpointError(f"{folder}: {name} has shape {stored[name]}, the model expects {shape}")


def load_model_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load the weights of a checkpoint directory into ``model`` (any layout; strict names and shapes)."""
    check_model_entry(model, path)
    try:
        dcp.load_model(model, Path(path) / "model")
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"damaged checkpoint file in {Path(path) / 'model'}: {err}") from None


def load_checkpoint(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Restore weights and optimizer state from a checkpoint directory into a model of any layout;
    returns trainer.json. (The trainer reseeds every step from (seed, rank, step), so no generator
    state needs saving.)"""
    path = Path(path)
    meta = read_trainer_state(path)
    load_model_weights(model, path)
    if optimizer is not None:
        try:
            dcp.load_optimizer(model, optimizer, path / "optimizer")
        except (SafetensorError, OSError, RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(f"{path / 'optimizer'} does not match the model or is damaged: {err}") from None
    return meta


def consolidate(model: torch.nn.Module, out: str | os.PathLike) -> Path:
    """Write the weights of a plain (unsharded) model, e.g. from :func:`load_run`, as one safetensors
    file ``out``, atomically (tied duplicates stored once). Returns ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in dcp.model_state(model).items()}, str(tmp))
    os.replace(tmp, out)
    return out


class Checkpointer:
    """The checkpoints of one run: every rank writes its shards, keeping the newest ``keep``."""

    def __init__(self, run_dir: str | os.PathLike, keep: int, rank: int = 0):
        self.run_dir, self.keep, self.rank = Path(run_dir), keep, rank

    def latest(self) -> Path | None:
        return latest_checkpoint(self.run_dir)

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict) -> None:
        save_checkpoint(self.run_dir, step, model, optimizer, trainer_state, self.keep, self.rank)


def load_run(run_dir, checkpoint: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """The trained model of a run directory: (RunConfig, Decoder in eval mode, checkpoint path).

    Uses ``checkpoint`` or the run's newest checkpoint; a run stopped during the dense warm-up loads as
    its dense model.
    """
    import dataclasses

    from ..config import load_config
    from ..model import Decoder

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"not a run directory (no config.yaml): {run_dir}")
    cfg = load_config(str(run_dir / "config.yaml"))
    path = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"no checkpoint in {run_dir / 'checkpoints'}")
    meta = read_trainer_state(path)
    model_cfg = dataclasses.replace(cfg.model, ffn="dense") if meta.get("phase") == "dense" else cfg.model
    model = Decoder(model_cfg)
    load_model_weights(model, path)
    return cfg, model.to(device).eval(), path
