"""Measuring the layers of the layer benchmark: build and probe them, time forward+backward, measure
activation and peak memory, and summarise as ratios to dense (method: :mod:`diffmoe.bench.layers`)."""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..runtime import M_MMAP_MAX, M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
from .common import median_ratio, round_robin, sync
from .layer_specs import LayerSpec, Shape

MIB = 2**20


@dataclass
class Row:
    name: str
    column: str
    flop_factor: float
    note: str
    times_s: list[float] = field(default_factory=list)
    act_bytes: int = 0
    peak_bytes: int | None = None  # peak of one step minus the parameter gradients


# ---------------------------------------------------------------------------------------------
# Measuring one step
# ---------------------------------------------------------------------------------------------
def fwd_bwd(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """One training step of the layer without an optimizer; gradients start from None."""
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    y = layer(x)
    (y * g).sum().backward()
    return y


def timed_step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> float:
    """Wall time (s) of one forward+backward."""
    sync(x.device)
    t0 = time.perf_counter()
    fwd_bwd(layer, x, g)
    sync(x.device)
    return time.perf_counter() - t0


def activation_bytes(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> int:
    """Bytes of unique storages saved for backward (parameters and x excluded) plus the output."""
    exclude = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            saved[s.data_ptr()] = max(saved.get(s.data_ptr(), 0), s.nbytes())
        return t

    for p in layer.parameters():
        p.grad = None
    x.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    out = y.untyped_storage()
    total = sum(saved.values()) + (0 if out.data_ptr() in saved else out.nbytes())
    (y * g).sum().backward()
    return total


class RssPeak:
    """Process peak-RSS delta on Linux/glibc (None elsewhere); see the module docstring."""

    def __init__(self) -> None:
        """Sets glibc's mmap and trim thresholds to 64 KiB (mmap re-enabled) for the rest of the process."""
        self.ok = False
        try:
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallopt(M_MMAP_MAX, 65536)
            self.libc.mallopt(M_MMAP_THRESHOLD, 1 << 16)
            self.libc.mallopt(M_TRIM_THRESHOLD, 1 << 16)
            self._status("VmHWM")
            self._reset()
            self.ok = True
        except (OSError, AttributeError, TypeError, ValueError):
            pass

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise ValueError(key)

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def measure(self, fn: Callable[[], object]) -> int | None:
        if not self.ok:
            fn()
            return None
        gc.collect()
        self.libc.malloc_trim(0)
        before = self._status("VmRSS")
        self._reset()
        fn()
        return self._status("VmHWM") - before


def peak_bytes(fn: Callable[[], object], device: torch.device, rss: RssPeak | None) -> int | None:
    """Peak memory of fn: CUDA allocator peak minus the allocation before, or the RSS delta on CPU."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    return rss.measure(fn) if rss is not None else None


def free_bytes(device: torch.device) -> int:
    """Memory a new allocation can use: CUDA free memory, or MemAvailable on the host."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def timed_matmul(a: torch.Tensor, b: torch.Tensor) -> float:
    """Wall time (s) of one a @ b."""
    sync(a.device)
    t0 = time.perf_counter()
    a @ b
    sync(a.device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def prepare(specs: list[LayerSpec], x: torch.Tensor, g: torch.Tensor, seed: int):
    """Build every layer on the device; run one step as a probe. Returns (layers, rows, skipped)."""
    layers, rows, skipped = [], [], []
    for spec in specs:
        free = free_bytes(x.device)
        if spec.known_bytes and spec.known_bytes > 0.8 * free:
            reason = (
                f"needs ~{spec.known_bytes / 2**30:.0f} GiB (expert weights gathered per token-slot, and "
                f"their gradient), over 80% of the {free / 2**30:.0f} GiB free"
            )
            skipped.append({"name": spec.name, "reason": reason})
            continue
        torch.manual_seed(seed)
        try:
            layer = spec.build().to(device=x.device, dtype=x.dtype).train()
            fwd_bwd(layer, x, g)
        except Exception as e:  # an implementation that does not run here (hub kernel, CUDA only, ...)
            skipped.append({"name": spec.name, "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
            continue
        layers.append(layer)
        rows.append(Row(spec.name, spec.column or spec.name, spec.flop_factor, spec.note))
    return layers, rows, skipped


def run_timing(layers: list[nn.Module], rows: list[Row], x, g, warmup: int, repeats: int, matmul_size: int) -> dict:
    """Round-robin rounds over all layers and the rate matmul (see :func:`common.round_robin`).

    The n^3 matmul that sets the ideal rate is one more entry of every round, so it sees the same
    conditions as the layers. Returns {"matmul_s": [...], "loadavg": [...]} per kept round.
    """
    a, b = (torch.randn(matmul_size, matmul_size, device=x.device, dtype=x.dtype) for _ in range(2))
    entries = [lambda layer=layer: timed_step(layer, x, g) for layer in layers] + [lambda: timed_matmul(a, b)]
    times, load = round_robin(entries, warmup, repeats)
    for row, t in zip(rows, times):
        row.times_s = t
    return {"matmul_s": times[-1], "loadavg": load}


def run_memory(layers: list[nn.Module], rows: list[Row], x, g, rss: RssPeak | None) -> None:
    """Activation bytes and peak activation memory of one step per layer. Run after timing: on CPU,
    ``RssPeak()`` changes malloc settings for the rest of the process."""
    for layer, row in zip(layers, rows):
        row.act_bytes = activation_bytes(layer, x, g)
        for p in layer.parameters():  # the baseline must not hold last step's gradients
            p.grad = None
        x.grad = None
        peak = peak_bytes(lambda: fwd_bwd(layer, x, g), x.device, rss)
        grads = sum(p.numel() * p.element_size() for p in layer.parameters() if p.requires_grad)
        row.peak_bytes = None if peak is None else peak - grads


def summarize(
    rows: list[Row], shape: Shape, matmul_flops: float, matmul_s: list[float], peak_flops: float | None
) -> list[dict]:
    """Medians, ideal times and ratios to the dense row (rows[0]).

    Time ratios are medians over rounds of the per-round ratio (layer vs dense, layer vs its ideal at
    that round's matmul rate): a round runs every entry close in time, so load that drifts between
    rounds cancels.
    """
    dense_flops = shape.dense_flops()
    rate = matmul_flops / statistics.median(matmul_s)
    dense_times = rows[0].times_s
    out = []
    for row in rows:
        flops = row.flop_factor * dense_flops
        per_round_ideal = [t * matmul_flops / (m * flops) for t, m in zip(row.times_s, matmul_s)]
        ratio = median_ratio(row.times_s, dense_times)
        out.append(
            {
                "name": row.name,
                "column": row.column,
                "note": row.note,
                "flop_factor": row.flop_factor,
                "time_ms": 1e3 * statistics.median(row.times_s),
                "time_min_ms": 1e3 * min(row.times_s),
                "time_max_ms": 1e3 * max(row.times_s),
                "times_ms": [1e3 * t for t in row.times_s],
                "time_ratio": ratio,
                "time_per_flop_ratio": ratio / row.flop_factor,
                "ideal_ms": 1e3 * flops / rate,
                "time_over_ideal": statistics.median(per_round_ideal),
                "achieved_tflops": flops / statistics.median(row.times_s) / 1e12,
                "act_mib": row.act_bytes / MIB,
                "peak_act_mib": None if row.peak_bytes is None else row.peak_bytes / MIB,
            }
        )
    dense = out[0]
    for r in out:
        r["mfu"] = 1e12 * r["achieved_tflops"] / peak_flops if peak_flops else None
        r["act_ratio"] = r["act_mib"] / dense["act_mib"]
        ok = r["peak_act_mib"] is not None and dense["peak_act_mib"]
        r["peak_act_ratio"] = r["peak_act_mib"] / dense["peak_act_mib"] if ok else None
    return out
