"""What the trainer logs besides losses: the MoE layers' routing statistics (:func:`routing_metrics`), the
FLOPs of a token, the accelerator's peak and the peak memory; and ``metrics.jsonl`` read back
(:func:`read_metrics`) or truncated for a resume. The loggers are in :mod:`.loggers`, the records are made
by the logging callbacks (:mod:`.callbacks`)."""

from __future__ import annotations

import json
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


GPU_PEAK_BF16 = {
    "H100": 989e12,
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
    "B200": 2250e12,
}
"""Dense bf16 tensor-core peak FLOP/s (no sparsity) of the GPUs model FLOPs utilisation is reported for."""


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs of one token (forward and backward): 6 x the active parameters that multiply
    (the embedding lookup excluded, the output head included) + 12 x layers x d_model x seq_len for
    attention (PaLM's formula, with MoE layers counting their active experts)."""
    cfg = model.cfg
    matmul = model.parameter_counts()["active"] - model.embed.weight.numel()
    if cfg.tie_embeddings:
        matmul += model.lm_head.weight.numel()
    return 6.0 * matmul + 12.0 * cfg.n_layers * cfg.d_model * seq_len


def gpu_peak_flops(device, override_tflops: float | None = None) -> float | None:
    """Peak bf16 FLOP/s of the device: the override, else :data:`GPU_PEAK_BF16` by GPU name, else None."""
    import torch

    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    hits = [v for k, v in GPU_PEAK_BF16.items() if k in name]
    return max(hits) if hits else None


def peak_memory_gb(device) -> dict[str, float]:
    """``peak_mem_gb``: CUDA memory allocated at most since the last call (then reset); on CPU
    ``peak_rss_gb``, the process's peak resident memory so far."""
    import resource

    import torch

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 1e9
        torch.cuda.reset_peak_memory_stats(device)
        return {"peak_mem_gb": round(peak, 3)}
    return {"peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)}


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
