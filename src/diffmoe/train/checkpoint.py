"""Checkpoints: a directory per step, written atomically, loaded without pickle.

    RUN/checkpoints/step-00000100/
        model.safetensors      the model's weights (state_dict names)
        optimizer.safetensors  AdamW state tensors, named "<param index>.<key>" (exp_avg, exp_avg_sq, step)
        trainer.json           step, phase (dense | moe), data position, counters, optimizer
                               param_groups, the run config, and a format version

The directory is assembled under a temporary name and renamed into place, so a crash never leaves a
directory named ``step-*`` that is incomplete; older checkpoints beyond ``keep`` are then deleted.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
FILES = ("model.safetensors", "optimizer.safetensors", "trainer.json")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or damaged; the message names the file."""


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def save_checkpoint(run_dir, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict, keep: int) -> Path:
    """Write the checkpoint of ``step`` atomically and prune to the newest ``keep``. Returns its path."""
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in _unique_state(model).items()},
              tmp / "model.safetensors")
    opt = optimizer.state_dict()
    tensors = {f"{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().contiguous().cpu()
               for i, state in opt["state"].items() for k, v in state.items()}
    save_file(tensors, tmp / "optimizer.safetensors")
    meta = dict(trainer_state, format_version=FORMAT_VERSION, step=step, param_groups=opt["param_groups"])
    with open(tmp / "trainer.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
    for name in FILES:
        if not (path / name).is_file():
            raise CheckpointError(f"incomplete checkpoint {path}: {name} is missing")
    try:
        meta = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"damaged checkpoint file {path / 'trainer.json'}: {err}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path / 'trainer.json'}: format_version {meta.get('format_version')!r}, "
                              f"this diffmoe reads {FORMAT_VERSION}")
    return meta


def load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"damaged checkpoint file {file}: {err}") from None


def load_model_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load model.safetensors of a checkpoint directory into ``model`` (strict: names and shapes)."""
    file = Path(path) / "model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"checkpoint weights not found: {file}")
    state = load_tensors(file)
    expected = _unique_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{file} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, value in state.items():
        if value.shape != expected[name].shape:
            raise CheckpointError(f"{file}: {name} has shape {tuple(value.shape)}, "
                                  f"the model expects {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=False)  # tied weights are stored once


def load_checkpoint(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Restore weights and optimizer state from a checkpoint directory; returns trainer.json. (The
    trainer reseeds every step from (seed, rank, step), so no generator state needs saving.)"""
    path = Path(path)
    meta = read_trainer_state(path)
    load_model_weights(model, path)
    if optimizer is not None:
        flat = load_tensors(path / "optimizer.safetensors")
        state: dict[int, dict] = {}
        for key, value in flat.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        try:
            optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{path / 'optimizer.safetensors'} does not match the model: {err}") from None
    return meta


def _unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without the second name of tied tensors (safetensors refuses shared storage)."""
    seen, out = set(), {}
    for name, value in model.state_dict().items():
        key = (value.data_ptr(), value.shape)
        if key in seen:
            continue
        seen.add(key)
        out[name] = value
    return out


class Checkpointer:
    """The checkpoints of one run: rank 0 writes them (every rank holds the same state), keeping the
    newest ``keep``; any rank reads them."""

    def __init__(self, run_dir: str | os.PathLike, keep: int, is_main: bool = True):
        self.run_dir, self.keep, self.is_main = Path(run_dir), keep, is_main

    def latest(self) -> Path | None:
        return latest_checkpoint(self.run_dir)

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict) -> None:
        if self.is_main:
            save_checkpoint(self.run_dir, step, model, optimizer, trainer_state, self.keep)


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
