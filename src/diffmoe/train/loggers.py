"""Where the trainer's records go (``train.loggers``): ``metrics.jsonl`` (always: resume, the reproduction
suite and ``diffmoe`` tools read it), TensorBoard and Weights & Biases (the ``wandb`` extra; offline
with ``WANDB_MODE=offline``).

A record is a flat dict with ``kind`` (``train``, ``routing``, ``eval`` or an event) and ``step``; the
numeric scalars of a record go to TensorBoard and W&B as ``<kind>/<key>``.
"""

from __future__ import annotations

import abc
import json
import math
import os
import uuid
from pathlib import Path


class Logger(abc.ABC):
    """Writes records somewhere; ``close`` at the end of the run."""

    @abc.abstractmethod
    def log(self, record: dict) -> None:
        """Write one record."""

    def close(self, ok: bool = True) -> None:
        """At the end of the run (``ok`` False: it failed); nothing to do by default."""


class JsonlLogger(Logger):
    """Appends each record to ``run_dir/metrics.jsonl``."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class TensorBoardLogger(Logger):
    """Scalars under ``run_dir/tensorboard``. ``purge_step``: the first step a resumed run logs again;
    TensorBoard drops the earlier events from there on (as ``metrics.jsonl`` is truncated), so a plot shows
    one history."""

    def __init__(self, run_dir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)

    def log(self, record: dict) -> None:
        for key, value in scalars(record).items():
            self._tb.add_scalar(key, value, record.get("step", 0))

    def close(self, ok: bool = True) -> None:
        self._tb.close()


class WandbLogger(Logger):
    """A Weights & Biases run in ``run_dir/wandb``, one per run directory: its id is kept in
    ``run_dir/wandb_id`` so that a resumed run continues the same W&B run. Project: ``$WANDB_PROJECT``,
    else ``diffmoe``; name: the run directory's name; config: the run config. W&B keeps the first value of
    a step: after a resume from an earlier checkpoint, the steps logged again (up to where the run had got)
    keep the first attempt's values there, while ``metrics.jsonl`` and TensorBoard hold the new ones."""

    def __init__(self, run_dir: Path, config: dict):
        try:
            import wandb
        except ImportError:
            from ..schema import ConfigError

            raise ConfigError(
                "invalid config: train.loggers names wandb, which is not installed: pip install 'diffmoe[wandb]'"
            ) from None
        id_file = run_dir / "wandb_id"
        if id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n", encoding="utf-8")
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "diffmoe"),
            name=run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
        )

    def log(self, record: dict) -> None:
        values = scalars(record)
        if values:  # an event without numbers (a config change) would still make a history row
            self._run.log(values, step=record.get("step", 0))

    def close(self, ok: bool = True) -> None:
        self._run.finish(exit_code=0 if ok else 1)


def scalars(record: dict) -> dict[str, float]:
    """The finite numbers of a record, keyed ``<kind>/<key>``."""
    kind = record.get("kind", "train")
    return {
        f"{kind}/{key}": value
        for key, value in record.items()
        if key not in ("step", "kind")
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


def build_loggers(names: list[str], run_dir: Path, config: dict, purge_step: int | None) -> list[Logger]:
    """The loggers ``names`` (see :data:`LOGGERS`) of a run; rank 0 builds them, the others log nothing."""
    built: dict[str, Logger] = {}
    for name in names:
        if name == "jsonl":
            built[name] = JsonlLogger(run_dir)
        elif name == "tensorboard":
            built[name] = TensorBoardLogger(run_dir, purge_step)
        elif name == "wandb":
            built[name] = WandbLogger(run_dir, config)
    return list(built.values())
