"""Run logs: one JSON object per line in ``metrics.jsonl`` (and TensorBoard scalars when available),
and the per-layer routing metrics read from the MoE layers' ``stats``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..atomic import write_text_atomic
from ..moe import LoryMoE


def routing_metrics(model) -> dict[str, float | list[float]]:
    """Per-layer routing statistics of the last forward pass, flattened to ``layer{i}.{name}``.

    load: share of assignments (token choice) or of routing mass (Lory) per expert (a list);
    entropy: mean routing entropy; experts_in_use: experts above the usage threshold (token choice:
    load > 1/(2E); Lory: weight > 2/E in at least one segment, the paper's criterion);
    band_multi_slot1/2 (SparseMixer): share of tokens whose band holds more than one expert.
    """
    out: dict[str, float | list[float]] = {}
    for i, layer in model.moe_layers():
        st, E = layer.stats, layer.num_experts
        if "load" not in st:
            continue
        load = st["load"].float().cpu()
        out[f"layer{i}.load"] = [round(v, 5) for v in load.tolist()]
        if "entropy" in st:
            out[f"layer{i}.entropy"] = float(st["entropy"])
        if isinstance(layer, LoryMoE):
            out[f"layer{i}.experts_in_use"] = int((st["usage"] > 0).sum())
        else:
            out[f"layer{i}.experts_in_use"] = int((load > 1 / (2 * E)).sum())
        if "band_multi" in st:
            slot1, slot2 = st["band_multi"].tolist()
            out[f"layer{i}.band_multi_slot1"] = slot1
            out[f"layer{i}.band_multi_slot2"] = slot2
    return out


class RunLogger:
    """Appends records to ``run_dir/metrics.jsonl``; mirrors numeric scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

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


def is_finite(value: torch.Tensor | float) -> bool:
    return bool(torch.isfinite(torch.as_tensor(value)).all())
