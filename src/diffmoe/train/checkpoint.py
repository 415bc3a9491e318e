"""Checkpoints: a directory per step, written atomically, independent of the world size; no pickle.

    RUN/checkpoints/step-00000100/
        model/                 the model's tensors by parameter name, as safetensors shards written by
                               every rank (torch.distributed.checkpoint; :mod:`diffmoe.parallel.dcp`)
        optimizer/             AdamW state per parameter name (exp_avg, exp_avg_sq, step), likewise
        trainer.json           step, phase (dense | moe), counters, the layout that wrote it, the run
                               config, the size and SHA-256 of every file, and a format version

A checkpoint written by N ranks in any layout (ddp, fsdp, ep, etp) loads into M ranks in any layout,
or into one process without a process group (evaluation, generation).

Durability: the directory is assembled under a temporary name; every rank flushes (fsync) and hashes its
share of the files; rank 0 writes ``trainer.json`` (flushed) with their sizes and hashes, flushes the
directories, renames the directory into place and flushes its parent. So after a crash or a power loss
a ``step-*`` directory is complete, and a damaged one (a disk error, a copy cut short) is recognised:
loading checks every file's size, and a resume checks the hashes and falls back to the newest
checkpoint that verifies, with a warning naming the damaged one. Leftover temporary directories of a
crashed run are removed when the next run starts (:meth:`Checkpointer.recover`). Older checkpoints
beyond ``keep`` are deleted after the rename. ``consolidate`` writes one ``model.safetensors`` on demand.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..atomic import commit, fsync_dir, sha256_file, tmp_path, write_text_atomic
from ..parallel import dcp

FORMAT_VERSION = 3
READS = (2, 3)
"""Format 2 (no file list, no config) still loads, unverified."""
ENTRIES = ("model", "optimizer", "trainer.json")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or damaged; the message names the file."""


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def save_checkpoint(
    run_dir,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    keep: int,
    rank: int = 0,
    world: int = 1,
) -> Path:
    """Write the checkpoint of ``step`` durably and prune to the newest ``keep``; every rank of the
    run calls this (rank 0 arranges the directories). Returns its path."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".tmp-{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save_model_and_optimizer(model, optimizer, tmp)
    _barrier()  # every rank's shards are written
    names = _from_rank0(_tensor_files(tmp) if rank == 0 else None)  # one listing for every rank
    files = {}
    for part in _all_gather(_flush_and_describe(names[rank::world], tmp)):
        files.update(part)
    if rank == 0:
        for sub in ("model", "optimizer"):
            fsync_dir(tmp / sub)
        meta = dict(trainer_state, format_version=FORMAT_VERSION, step=step, files=dict(sorted(files.items())))
        write_text_atomic(tmp / "trainer.json", json.dumps(meta, indent=1))  # flushes the file and tmp/
        old = final.parent / f".old-{final.name}"
        if final.exists():  # the same step again (a run stopping on bad steps): never without a copy
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        fsync_dir(final.parent.parent)  # the run directory, which may have just got checkpoints/
        shutil.rmtree(old, ignore_errors=True)
        others = [p for p in list_checkpoints(run_dir) if p != final]  # never the one just written
        for stale in others[: max(0, len(others) - (keep - 1))]:
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def _tensor_files(directory: Path) -> list[str]:
    """The tensor files of a checkpoint directory, relative to it, in name order (the ranks flush and
    hash every ``world``-th one, whatever the writer named them)."""
    return sorted(
        p.relative_to(directory).as_posix()
        for sub in ("model", "optimizer")
        if (directory / sub).is_dir()
        for p in (directory / sub).iterdir()
        if p.is_file()
    )


def _flush_and_describe(names: list[str], root: Path) -> dict[str, dict]:
    """{name: {bytes, sha256}} of the files ``root/name``, each flushed to disk."""
    return {
        name: {"bytes": (root / name).stat().st_size, "sha256": sha256_file(root / name, flush=True)} for name in names
    }


def _all_gather(obj) -> list:
    """``obj`` of every rank (small JSON-like values), or ``[obj]`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _from_rank0(obj):
    """Rank 0's ``obj`` on every rank (what rank 0 saw of the file system, so all ranks agree)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
    """The newest checkpoint whose files are all there at their recorded sizes; a damaged newer one is
    skipped with a warning naming it."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            read_trainer_state(path)
            return path
        except CheckpointError as err:
            warnings.warn(f"skipping a damaged checkpoint: {err}", stacklevel=2)
    return None


def read_trainer_state(path: str | os.PathLike) -> dict:
    """The trainer.json of a checkpoint directory, checked for completeness: the fields the trainer
    reads are there and well typed, and every recorded file is present with its recorded size (a
    CheckpointError names the first thing that is not)."""
    path = Path(path)
    try:
        return _read_trainer_state(path)
    except OSError as err:  # a disk error, or a directory where a file should be
        raise CheckpointError(f"unreadable checkpoint {path}: {err}") from None


_COUNTERS = ("step", "skipped_steps", "bad_in_a_row", "tokens")


def _read_trainer_state(path: Path) -> dict:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    for name in ENTRIES:
        if not (path / name).exists():
            raise CheckpointError(f"incomplete checkpoint {path}: {name} is missing")
    where = path / "trainer.json"
    try:
        meta = json.loads(where.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"damaged checkpoint file {where}: {err}") from None
    if meta.get("format_version") not in READS:
        raise CheckpointError(
            f"{where}: format_version {meta.get('format_version')!r}, this diffmoe reads {', '.join(map(str, READS))}"
        )
    for key in _COUNTERS:  # step always; the trainer's counters where written (0 otherwise)
        value = meta.get(key, None if key == "step" else 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"damaged checkpoint file {where}: {key}={value!r}, expected a count")
    if meta.get("phase", "moe") not in ("dense", "moe"):
        raise CheckpointError(f"damaged checkpoint file {where}: phase={meta.get('phase')!r}, expected dense or moe")
    if not isinstance(meta.get("config", {}), (dict, type(None))):
        raise CheckpointError(f"damaged checkpoint file {where}: config is not a mapping")
    if path.name.startswith("step-") and path.name != checkpoint_dir(path.parent, meta["step"]).name:
        raise CheckpointError(f"damaged checkpoint file {where}: step={meta['step']} in {path.name}")
    for name, info in _recorded_files(path, meta).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"incomplete checkpoint {path}: {name} is missing")
        if f.stat().st_size != info["bytes"]:
            raise CheckpointError(
                f"damaged checkpoint file in {path}: {name} has {f.stat().st_size} bytes, {info['bytes']} were written"
            )
    return meta


def _recorded_files(path: Path, meta: dict) -> dict[str, dict]:
    files = meta.get("files", {})
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
        for v in files.values()
    ):
        raise CheckpointError(f"damaged checkpoint file {path / 'trainer.json'}: invalid 'files' record")
    return files


def verify_checkpoint(path: str | os.PathLike, rank: int = 0, world: int = 1) -> dict:
    """:func:`read_trainer_state` plus the SHA-256 of this rank's share of the recorded files (every
    rank calls this; together they hash each file once). Returns trainer.json; raises a CheckpointError
    naming the first file that does not verify, on this rank."""
    path = Path(path)
    meta = read_trainer_state(path)
    files = _recorded_files(path, meta)
    for name in sorted(files)[rank::world]:
        try:
            same = sha256_file(path / name) == files[name]["sha256"]
        except OSError as err:
            raise CheckpointError(f"unreadable checkpoint file in {path}: {name}: {err}") from None
        if not same:
            raise CheckpointError(
                f"damaged checkpoint file in {path}: {name} has another SHA-256 than when it was written"
            )
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
    """Write the weights of a plain (unsharded) model, e.g. from :func:`diffmoe.runs.load_run`, as one safetensors
    file ``out``, atomically (tied duplicates stored once). Returns ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(out)
    save_file({k: v.detach().contiguous().cpu() for k, v in dcp.model_state(model).items()}, str(tmp))
    commit(tmp, out)
    return out


class Checkpointer:
    """The checkpoints of one run: every rank writes its shards, keeping the newest ``keep``; each
    records ``config`` (the run config as a dict)."""

    def __init__(
        self, run_dir: str | os.PathLike, keep: int, rank: int = 0, world: int = 1, config: dict | None = None
    ):
        self.run_dir, self.keep, self.rank, self.world, self.config = Path(run_dir), keep, rank, world, config

    def latest(self) -> Path | None:
        return latest_checkpoint(self.run_dir)

    def recover(self) -> list[str]:
        """Tidy what a crash during a save left behind (rank 0; every rank calls this): a temporary
        directory is removed; the copy of a checkpoint that was being replaced is renamed back when the
        replacement never landed. Returns what was done."""
        done = []
        root = self.run_dir / "checkpoints"
        if self.rank == 0 and root.is_dir():
            for tmp in sorted(root.glob(".tmp-step-*")):
                shutil.rmtree(tmp, ignore_errors=True)
                done.append(f"removed the unfinished {tmp.name}")
            for old in sorted(root.glob(".old-step-*")):
                final = root / old.name.removeprefix(".old-")
                if final.exists():
                    shutil.rmtree(old, ignore_errors=True)
                    done.append(f"removed {old.name} ({final.name} exists)")
                else:
                    os.replace(old, final)
                    done.append(f"restored {final.name} from {old.name}")
            if done:
                fsync_dir(root)
        _barrier()
        return done

    def resumable(self) -> tuple[Path | None, list[str]]:
        """The newest checkpoint that verifies on every rank (sizes and SHA-256), and a message per
        newer checkpoint that did not. Those are renamed ``damaged-step-*`` (kept, but never loaded or
        pruned as checkpoints again), so that the resumed run's own checkpoints take their place."""
        found, damaged, usable = (
            _from_rank0([p.name for p in list_checkpoints(self.run_dir)] if self.rank == 0 else None),
            [],
            None,
        )
        for name in reversed(found):
            path = self.run_dir / "checkpoints" / name
            try:
                verify_checkpoint(path, self.rank, self.world)
                error = None
            except CheckpointError as err:
                error = str(err)
            errors = [e for e in _all_gather(error) if e is not None]
            if not errors:
                usable = path
                break
            aside = path.with_name(f"damaged-{name}")
            damaged.append(f"{errors[0]} (kept as {aside.name})")
            if self.rank == 0:
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(path, aside)
                fsync_dir(path.parent)
        _barrier()
        return usable, damaged

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict) -> None:
        state = dict(trainer_state, config=self.config) if self.config is not None else trainer_state
        save_checkpoint(self.run_dir, step, model, optimizer, state, self.keep, self.rank, self.world)
