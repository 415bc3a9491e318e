"""Run logs: one JSON object per line in ``metrics.jsonl`` (and TensorBoard scalars when available).

:class:`MetricsLogger` is what the trainer logs (train, routing and eval records); :class:`RunLogger`
writes records; :func:`routing_metrics` reads the MoE layers' ``stats``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..atomic import write_text_atomic


def routing_metrics(model) -> dict[str, float | list[float]]:
    """Per-layer routing statistics of the last forward pass, flattened to ``layer{i}.{name}``.

    load: share of assignments (discrete routing) or of routing mass (merged experts) per expert (a
    list); entropy: mean routing entropy; experts_in_use: experts in use by the layer's own criterion
    (see :func:`diffmoe.moe.routing.routing_stats`); then the statistics the layer's family declares in
    ``logged_stats`` (a scalar as ``{name}``, a vector's entries as ``{name}_{label}``).
    """
    out: dict[str, float | list[float]] = {}
    for i, layer in model.moe_layers():
        st = layer.stats
        if "load" not in st:
            continue
        out[f"layer{i}.load"] = [round(v, 5) for v in st["load"].float().cpu().tolist()]
        if "entropy" in st:
            out[f"layer{i}.entropy"] = float(st["entropy"])
        out[f"layer{i}.experts_in_use"] = int(st["experts_in_use"])
        for name, labels in layer.logged_stats.items():
            if name not in st:
                continue
            if labels is None:
                out[f"layer{i}.{name}"] = float(st[name])
            else:
                out.update({f"layer{i}.{name}_{label}": v for label, v in zip(labels, st[name].tolist())})
    return out


class RunLogger:
    """Appends records to ``run_dir/metrics.jsonl``; mirrors numeric scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, purge_step: int | None = None):
        """``purge_step``: the first step a resumed run logs again; TensorBoard then drops the earlier
        events of steps from there on (as ``metrics.jsonl`` is truncated), so a plot shows one history."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge_step)

    def log(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class MetricsLogger:
    """The trainer's records, written by rank 0 only (``enabled``); throughput is measured between
    train records."""

    def __init__(self, run_dir: str | Path, tensorboard: bool, enabled: bool, purge_step: int | None = None):
        self._out = RunLogger(run_dir, tensorboard, purge_step) if enabled else None
        self._t, self._tokens = time.perf_counter(), 0

    def count(self, tokens: int) -> None:
        """Tokens trained since the last train record."""
        self._tokens += tokens

    def train(self, step: int, result, lr: float, state: dict, model) -> dict:
        """Write and return the train record of ``step`` (a :class:`~diffmoe.train.step.StepResult`):
        loss, scaled and unscaled auxiliary losses, lr, gradient norm, tokens and tokens/s."""
        now = time.perf_counter()
        record = {"kind": "train", "step": step, "loss": result.loss, "aux_loss": result.aux_loss, "lr": lr,
                  "grad_norm": result.grad_norm, "tokens": state["tokens"],
                  "tokens_per_s": self._tokens / (now - self._t), "skipped_steps": state["skipped_steps"]}
        for _, layer in model.moe_layers():
            for name, value in layer.aux_losses.items():
                record[f"aux_{name}_unscaled"] = record.get(f"aux_{name}_unscaled", 0.0) + float(value.detach())
        self._t, self._tokens = now, 0
        self._write(record)
        return record

    def routing(self, step: int, model) -> None:
        """The routing statistics of the last forward pass."""
        if self._out is not None:
            metrics = routing_metrics(model)
            if metrics:
                self._write({"kind": "routing", "step": step, **metrics})

    def eval(self, step: int, result: dict[str, dict]) -> None:
        self._write({"kind": "eval", "step": step, **{f"{d}.loss": v["loss"] for d, v in result.items()},
                     **{f"{d}.ppl": v["ppl"] for d, v in result.items()}})

    def event(self, record: dict) -> None:
        """A record of something that happened to the run (e.g. ``config_change``)."""
        self._write(record)

    def _write(self, record: dict) -> None:
        if self._out is not None:
            self._out.log(record)

    def close(self) -> None:
        if self._out is not None:
            self._out.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Drop records after ``step`` (a resumed run rewrites them)."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))
