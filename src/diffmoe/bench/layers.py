"""Layer benchmark: forward+backward time and memory of every MoE layer, as ratios to dense.

All layers are built at one shape (default: 4 sequences x 1024 tokens, d_model 512, d_ff 1408,
8 experts, top-2, Lory segment length T 256), or at each shape of one or more sweeps (``--sweep``),
and measured side by side in one process:

- dense FFN ``SwiGLU``; ``LoryMoE`` (training, ``segment`` routing); ``TopKMoE`` top-2 dropless with
  the ``loop`` and the ``grouped_mm`` dispatch; ``SparseMixerMoE`` (training, ``auto`` dispatch);
  ``ExpertChoiceMoE`` with capacity factor c = 2 (2 expert FFNs per token on average, the FLOPs of
  top-2); transformers' ``MixtralSparseMoeBlock`` and ``PhimoeSparseMoeBlock`` once per
  ``config._experts_implementation`` that runs on the device (``eager``, ``grouped_mm``,
  ``batched_mm``, ...). Implementations that fail, or whose known memory need exceeds the free memory,
  are listed as skipped with the reason.

Method.
- Input x [B, L, d] with requires_grad; loss = (y * g).sum() for a fixed random g (not y.sum(): the
  backward of grouped_mm rejects the zero-stride gradient that would produce). Gradients are reset
  to None before every step, so a step allocates them as training does.
- Time: wall time of forward+backward (synchronised on CUDA). After ``--warmup`` rounds, the median
  of ``--repeats`` rounds. Every round runs each layer once, round-robin, with the starting layer
  rotated each round, so slow drift (clock, other load) hits all layers alike.
- Activation memory (every device): bytes of the unique storages saved for backward during the
  forward (``torch.autograd.graph.saved_tensors_hooks``), parameters (and views of them) and the
  input excluded, plus the output. This is what a layer keeps alive between forward and backward.
- Peak activation memory: the peak of one forward+backward minus the parameter gradients it
  allocates. The peak is ``torch.cuda.max_memory_allocated`` minus the allocated memory before, on
  CUDA; on CPU (Linux) the process peak-RSS delta (VmHWM after resetting it through
  /proc/self/clear_refs), measured after all timing with glibc's mmap threshold fixed at 64 KiB so
  that freed tensors return to the OS. It includes transient buffers (merged weights, gathered tokens).
- Ratios to dense (and to the ideal) are medians over rounds of the per-round ratio, so load that
  drifts between rounds cancels. The 1-minute load average is recorded per round in the JSON.
- Ideal time: FLOPs / the measured matmul rate (a square ``--matmul-size`` matmul in the benchmark
  dtype, timed as one more entry of every round). A dense SwiGLU costs 3 matmuls of 2 N d d_ff in
  the forward and twice that in the backward: 18 N d d_ff. Top-k costs k x dense, expert choice
  c x dense, Lory (1 + E/T) x dense (the merge GEMM and its backward add E/T). Router FLOPs and all
  memory-bound work (elementwise ops, copies, the merge's weight traffic) are ignored: time / ideal
  shows how far a layer is from being matmul-bound. ``time / (FLOPs x dense)`` divides time / dense
  by the FLOPs column: 1.0 means the layer runs its extra FLOPs exactly as fast as the dense FFN.

Sweeps (``--sweep experts segment tokens fine`` or ``all``), around the shape given by the options:
experts E in {4, 8, 16, 32, 64}; Lory segment length T in {64, 128, 256, 512} (dense and Lory only);
tokens per batch in {1k, 2k, 4k, 8k, 16k}; and the fine-grained shape (64 experts, top-8, d_ff 176:
dense FFN of d_ff 176, TopKMoE, expert choice with c = 8 and transformers' Mixtral block; the ideal
is 8x that dense FFN). Sweeps time transformers' ``eager`` and ``grouped_mm`` implementations only.

Absolute times only mean something on a GPU; on CPU read the ratios.

Usage: diffmoe bench layers [--device cpu|cuda] [--dtype float32|bfloat16] [--sweep ...] (or
``python benchmarks/bench_layers.py``). Writes bench_layers_<device>_<dtype>.md and .json under --out
(default results/layers/), or sweep_<name>_<device>_<dtype>.md / .json per sweep. Without
transformers installed the reference rows are listed as skipped.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hub-kernel implementations must not download anything

import torch
from torch import nn

from ..moe import ExpertChoiceMoE, LoryMoE, SparseMixerMoE, SwiGLU, TopKMoE
from ..moe.dispatch import resolve_impl
from ..runtime import M_MMAP_MAX, M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
from .common import (DTYPES, dtype_name, fmt_ms, gpu_peak_flops, machine_info, machine_line, median_ratio, round_robin,
                     start, sync, write_results)

HF_INIT_STD = 0.02
MIB = 2**20


# ---------------------------------------------------------------------------------------------
# What is measured
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    tokens: int  # total tokens = batch * seq_len
    seq_len: int
    d_model: int
    d_ff: int
    experts: int
    segment_len: int
    top_k: int = 2
    ec_capacity: float = 2.0

    @property
    def batch(self) -> int:
        return self.tokens // self.seq_len

    def dense_flops(self) -> float:
        """Forward+backward FLOPs of the dense SwiGLU: 3 matmuls x 2 N d d_ff, x3 with backward."""
        return 3 * (3 * 2 * self.tokens * self.d_model * self.d_ff)


@dataclass
class LayerSpec:
    name: str
    family: str  # dense | lory | topk | sparsemixer | expert_choice | hf (sweeps pick families)
    build: Callable[[], nn.Module]
    flop_factor: float  # FLOPs as a multiple of the dense FFN's
    note: str = ""
    known_bytes: int = 0  # a large allocation known in advance (checked against free memory)
    column: str = ""  # the name without shape parameters (a sweep's column); default: name


@dataclass
class Row:
    name: str
    column: str
    flop_factor: float
    note: str
    times_s: list[float] = field(default_factory=list)
    act_bytes: int = 0
    peak_bytes: int | None = None  # peak of one step minus the parameter gradients


@dataclass(frozen=True)
class Sweep:
    name: str
    title: str
    shapes: Callable[[Shape], list[Shape]]
    families: tuple[str, ...]
    hf_impls: tuple[str, ...] = ("eager", "grouped_mm")


ALL_FAMILIES = ("dense", "lory", "topk", "sparsemixer", "expert_choice", "hf")
SWEEPS = {
    "experts": Sweep("experts", "experts E", lambda s: [replace(s, experts=e) for e in (4, 8, 16, 32, 64)],
                     ALL_FAMILIES),
    "segment": Sweep("segment", "Lory segment length T",
                     lambda s: [replace(s, segment_len=t) for t in (64, 128, 256, 512)], ("dense", "lory")),
    "tokens": Sweep("tokens", "tokens per batch",
                    lambda s: [replace(s, tokens=n, seq_len=min(s.seq_len, n)) for n in (1024, 2048, 4096, 8192, 16384)],
                    ALL_FAMILIES),
    "fine": Sweep("fine", "fine-grained: 64 experts, top-8, d_ff 176",
                  lambda s: [replace(s, experts=64, top_k=8, d_ff=176, ec_capacity=8.0)],
                  ("dense", "topk", "expert_choice", "hf")),
}


def hf_implementations() -> list[str]:
    """transformers' experts implementations: ``eager`` plus every registered one (none without
    transformers)."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return []

    return ["eager"] + sorted(ALL_EXPERTS_FUNCTIONS.keys())


def build_hf_block(family: str, impl: str, shape: Shape) -> nn.Module:
    """A transformers Mixtral / Phimoe sparse MoE block with weights ~ N(0, 0.02) (they are torch.empty)."""
    if family == "mixtral":
        from transformers import MixtralConfig as Config
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
    else:
        from transformers import PhimoeConfig as Config
        from transformers.models.phimoe.modeling_phimoe import PhimoeSparseMoeBlock as Block
    cfg = Config(hidden_size=shape.d_model, intermediate_size=shape.d_ff,
                 num_local_experts=shape.experts, num_experts_per_tok=shape.top_k)
    cfg._experts_implementation = impl
    block = Block(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, HF_INIT_STD)
    return block


def layer_specs(shape: Shape, device: torch.device, dtype: torch.dtype,
                hf_impls: tuple[str, ...] | None = None) -> list[LayerSpec]:
    """Every layer of the benchmark, dense first. SparseMixer-v2 and transformers' PhiMoE are top-2
    only; top-k != 2 leaves them out."""
    d, f, E, T, k = shape.d_model, shape.d_ff, shape.experts, shape.segment_len, shape.top_k
    probe = torch.empty(0, device=device, dtype=dtype)
    auto = resolve_impl("auto", probe)
    c = shape.ec_capacity
    specs = [
        LayerSpec("dense SwiGLU", "dense", lambda: SwiGLU(d, f), 1.0),
        LayerSpec(f"LoryMoE (T={T}, segment)", "lory", lambda: LoryMoE(d, f, E, segment_len=T, routing="segment"),
                  1.0 + E / T, "merge adds E/T", column="LoryMoE"),
        LayerSpec(f"TopKMoE top-{k} [loop]", "topk", lambda: TopKMoE(d, f, E, top_k=k, dispatch_impl="loop"),
                  float(k), column="TopKMoE [loop]"),
        LayerSpec(f"TopKMoE top-{k} [grouped_mm]", "topk",
                  lambda: TopKMoE(d, f, E, top_k=k, dispatch_impl="grouped_mm"), float(k),
                  column="TopKMoE [grouped_mm]"),
        LayerSpec(f"ExpertChoiceMoE c={c:g} [auto={auto}]", "expert_choice",
                  lambda: ExpertChoiceMoE(d, f, E, capacity_factor=c), c, f"c={c:g}: FLOPs of top-{c:g}",
                  column="ExpertChoiceMoE"),
    ]
    if k == 2:
        specs.insert(4, LayerSpec(f"SparseMixerMoE top-2 [auto={auto}]", "sparsemixer",
                                  lambda: SparseMixerMoE(d, f, E), 2.0, column="SparseMixerMoE"))
    elem = torch.finfo(dtype).bits // 8
    impls = [i for i in hf_implementations() if hf_impls is None or i in hf_impls]
    for family, label in (("mixtral", "Mixtral"), ("phimoe", "Phimoe")):
        if family == "phimoe" and k != 2:
            continue
        for impl in impls:
            # batched_mm gathers the expert weights of every (token, slot): forward copy + its gradient
            known = 2 * shape.tokens * k * 3 * d * f * elem if impl == "batched_mm" else 0
            specs.append(LayerSpec(f"HF {label}SparseMoeBlock [{impl}]", "hf",
                                   (lambda fam=family, im=impl: build_hf_block(fam, im, shape)), float(k),
                                   "transformers", known, f"HF {label} [{impl}]"))
    return specs


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
            reason = (f"needs ~{spec.known_bytes / 2**30:.0f} GiB (expert weights gathered per token-slot, and "
                      f"their gradient), over 80% of the {free / 2**30:.0f} GiB free")
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


def run_timing(layers: list[nn.Module], rows: list[Row], x, g, warmup: int, repeats: int,
               matmul_size: int) -> dict:
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


def summarize(rows: list[Row], shape: Shape, matmul_flops: float, matmul_s: list[float],
              peak_flops: float | None) -> list[dict]:
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
        out.append({
            "name": row.name, "column": row.column, "note": row.note, "flop_factor": row.flop_factor,
            "time_ms": 1e3 * statistics.median(row.times_s), "time_min_ms": 1e3 * min(row.times_s),
            "time_max_ms": 1e3 * max(row.times_s), "times_ms": [1e3 * t for t in row.times_s],
            "time_ratio": ratio, "time_per_flop_ratio": ratio / row.flop_factor,
            "ideal_ms": 1e3 * flops / rate, "time_over_ideal": statistics.median(per_round_ideal),
            "achieved_tflops": flops / statistics.median(row.times_s) / 1e12,
            "act_mib": row.act_bytes / MIB, "peak_act_mib": None if row.peak_bytes is None else row.peak_bytes / MIB,
        })
    dense = out[0]
    for r in out:
        r["mfu"] = 1e12 * r["achieved_tflops"] / peak_flops if peak_flops else None
        r["act_ratio"] = r["act_mib"] / dense["act_mib"]
        ok = r["peak_act_mib"] is not None and dense["peak_act_mib"]
        r["peak_act_ratio"] = r["peak_act_mib"] / dense["peak_act_mib"] if ok else None
    return out


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def shape_line(s: dict) -> str:
    return (f"{s['batch']} x {s['seq_len']} tokens, d_model {s['d_model']}, d_ff {s['d_ff']}, "
            f"{s['experts']} experts, top-{s['top_k']}, Lory T {s['segment_len']}")


def markdown(result: dict) -> str:
    m, st = result["machine"], result["settings"]
    peak_how = ("CUDA max_memory_allocated minus allocated before" if m["device"].startswith("cuda")
                else "process peak-RSS delta (VmHWM after clear_refs; glibc mmap threshold 64 KiB)")
    lines = [
        f"# Layer benchmark: forward+backward, ratios to dense ({m['device']}, {m['dtype']})",
        "",
        machine_line(m),
        f"Shape: {shape_line(result['shape'])}.",
        f"Time: median of {st['repeats']} forward+backward runs (loss = sum(y * g), fixed random g; all runs in "
        f"the JSON), layers interleaved round-robin after {st['warmup']} warm-up rounds; the ratios are medians "
        "of the per-round ratios.",
        f"Ideal: FLOPs (dense = 18 N d d_ff = {result['dense_gflop']:.2f} GFLOP, times the FLOPs column) / "
        f"measured {m['dtype']} matmul rate, median {result['matmul_gflops']:.1f} GFLOP/s "
        f"({st['matmul_size']}^3, timed in every round; time / ideal uses that round's rate).",
        "act: unique storages saved for backward during forward (autograd saved_tensors_hooks; parameters "
        "and the input excluded) plus the output.",
        f"peak act: {peak_how}, one forward+backward, minus the parameter gradients.",
        "TFLOP/s: model FLOPs / median time; MFU: that / the GPU's dense bf16 peak "
        + (f"({result['peak_tflops']:g} TFLOP/s)." if result.get("peak_tflops") else "(n/a: no GPU peak known)."),
        "",
        "| layer | FLOPs / dense | time ms | time / dense | time / (FLOPs x dense) | ideal ms | time / ideal "
        "| TFLOP/s | MFU | act MiB | act / dense | peak act MiB | peak act / dense | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['name']} | {r['flop_factor']:.3g} | {fmt_ms(r['time_ms'])} | {r['time_ratio']:.2f} | "
            f"{r['time_per_flop_ratio']:.2f} | {fmt_ms(r['ideal_ms'])} | {r['time_over_ideal']:.2f} | "
            f"{r['achieved_tflops']:.3g} | {_fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'' if r['mfu'] is None else ' %'} | "
            f"{r['act_mib']:.1f} | {r['act_ratio']:.2f} | {_fmt(r['peak_act_mib'], '.1f')} | "
            f"{_fmt(r['peak_act_ratio'], '.2f')} | {r['note']} |")
    if result["skipped"]:
        lines += ["", "Skipped (does not run or does not fit here):"]
        lines += [f"- {s['name']}: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


def sweep_markdown(sweep: Sweep, results: list[dict]) -> str:
    """One table per sweep: a line per shape, time / dense and peak act / dense per layer."""
    m, st = results[0]["machine"], results[0]["settings"]
    names: list[str] = []
    for res in results:
        names += [r["column"] for r in res["rows"] if r["column"] not in names]
    key = {"experts": "experts", "segment": "segment_len", "tokens": "tokens", "fine": "experts"}[sweep.name]
    lines = [f"# Layer sweep over {sweep.title} ({m['device']}, {m['dtype']})", "", machine_line(m),
             f"First line's shape: {shape_line(results[0]['shape'])}; each cell: time / dense (peak activation "
             f"memory / dense) of the same run, medians of {st['repeats']} rounds after {st['warmup']} "
             "warm-up rounds. Full tables in the JSON.", "",
             f"| {sweep.title} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for res in results:
        by = {r["column"]: r for r in res["rows"]}
        cells = []
        for n in names:
            r = by.get(n)
            cells.append("-" if r is None else f"{r['time_ratio']:.2f} ({_fmt(r['peak_act_ratio'], '.2f')})")
        lines.append(f"| {res['shape'][key]} | " + " | ".join(cells) + " |")
    lines += ["", "## Every shape's full table", ""]
    for res in results:
        lines += [markdown(res).replace("# Layer benchmark", "### Layer benchmark", 1), ""]
    return "\n".join(lines)


def measure_shape(shape: Shape, device: torch.device, dtype: torch.dtype, args, families=ALL_FAMILIES,
                  hf_impls: tuple[str, ...] | None = None) -> dict:
    """Build, time and measure every selected layer at one shape. Returns the result dict."""
    load_start = os.getloadavg()[0]
    torch.manual_seed(args.seed)
    x = torch.randn(shape.batch, shape.seq_len, shape.d_model, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(shape.batch, shape.seq_len, shape.d_model, device=device, dtype=dtype)
    specs = [s for s in layer_specs(shape, device, dtype, hf_impls) if s.family in families]
    layers, rows, skipped = prepare(specs, x, g, args.seed)
    if "hf" in families and not hf_implementations():
        skipped.append({"name": "HF MixtralSparseMoeBlock, PhimoeSparseMoeBlock",
                        "reason": "transformers is not installed (pip install 'diffmoe[hf]')"})
    log = run_timing(layers, rows, x, g, args.warmup, args.repeats, args.matmul_size)
    run_memory(layers, rows, x, g, RssPeak() if device.type == "cpu" else None)  # after timing: malloc settings
    matmul_flops = 2.0 * args.matmul_size**3
    peak = gpu_peak_flops(device, args.peak_tflops)
    return {
        "machine": machine_info(device, dtype, load_start),
        "shape": {**asdict(shape), "batch": shape.batch},
        "settings": {"repeats": args.repeats, "warmup": args.warmup, "matmul_size": args.matmul_size,
                     "seed": args.seed, "hf_init_std": HF_INIT_STD},
        "matmul_gflops": matmul_flops / statistics.median(log["matmul_s"]) / 1e9,
        "matmul_gflops_per_round": [matmul_flops / t / 1e9 for t in log["matmul_s"]],
        "loadavg_per_round": log["loadavg"],
        "dense_gflop": shape.dense_flops() / 1e9,
        "peak_tflops": peak / 1e12 if peak else None,
        "rows": summarize(rows, shape, matmul_flops, log["matmul_s"], peak),
        "skipped": skipped,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="diffmoe bench layers", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per batch (batch = tokens / seq-len)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=1408)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2, help="k of TopKMoE and transformers' Mixtral block")
    p.add_argument("--ec-capacity", type=float, default=2.0, help="expert choice capacity factor c")
    p.add_argument("--segment-len", type=int, default=256, help="Lory segment length T")
    p.add_argument("--layers", nargs="+", choices=ALL_FAMILIES, default=list(ALL_FAMILIES),
                   help="layer families to measure (dense always)")
    p.add_argument("--hf-impls", nargs="+", default=None,
                   help="transformers experts implementations to time (default: every registered one)")
    p.add_argument("--sweep", nargs="+", choices=[*SWEEPS, "all"], default=None,
                   help="measure every shape of these sweeps (one process per shape) instead of one shape")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2, help="discarded rounds (the probe step is extra)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--matmul-size", type=int, default=None, help="n of the n^3 rate matmul (2048 CPU, 8192 CUDA)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="GPU peak for model FLOP utilisation (default: known GPUs' dense bf16 peak)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/layers"))
    a = p.parse_args(argv)
    if a.tokens % a.seq_len:
        p.error(f"--tokens {a.tokens} must be a multiple of --seq-len {a.seq_len}")
    if a.repeats < 1 or a.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if not 1 <= a.top_k <= a.experts:
        p.error(f"--top-k {a.top_k} must be between 1 and --experts {a.experts}")
    return a


def _shape_argv(shape: Shape) -> list[str]:
    return ["--tokens", str(shape.tokens), "--seq-len", str(shape.seq_len), "--d-model", str(shape.d_model),
            "--d-ff", str(shape.d_ff), "--experts", str(shape.experts), "--top-k", str(shape.top_k),
            "--ec-capacity", str(shape.ec_capacity), "--segment-len", str(shape.segment_len)]


def run_sweep(sweep: Sweep, base: Shape, args, argv: list[str], device: torch.device, dt: str) -> list[dict]:
    """Each shape in a fresh process (the CPU peak-RSS measurement changes malloc settings for the rest
    of a process, and shapes must not inherit each other's heap), with the caller's other options."""
    keep = _drop_options(argv, {"--sweep", "--out", "--layers", "--hf-impls", "--tokens", "--seq-len",
                                "--d-model", "--d-ff", "--experts", "--top-k", "--ec-capacity", "--segment-len"})
    results = []
    for shape in sweep.shapes(base):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "diffmoe.bench.layers", *keep, *_shape_argv(shape), "--out", tmp,
                   "--layers", *sweep.families, "--hf-impls", *sweep.hf_impls]
            print(f"sweep {sweep.name}: {shape_line({**asdict(shape), 'batch': shape.batch})}", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"error: sweep {sweep.name} failed at {shape}:\n{proc.stderr[-2000:]}")
            results.append(json.loads((Path(tmp) / f"bench_layers_{device.type}_{dt}.json").read_text()))
    return results


def _drop_options(argv: list[str], names: set[str]) -> list[str]:
    """argv without the named options and their values."""
    out, skip = [], False
    for tok in argv:
        if tok.startswith("--"):
            skip = tok.split("=")[0] in names
        if not skip:
            out.append(tok)
    return out


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device, dtype = start(args)
    dt = dtype_name(dtype)
    args.matmul_size = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    base = Shape(args.tokens, args.seq_len, args.d_model, args.d_ff, args.experts, args.segment_len, args.top_k,
                 args.ec_capacity)
    if not args.sweep:
        families = ("dense", *args.layers)
        result = measure_shape(base, device, dtype, args, families,
                               tuple(args.hf_impls) if args.hf_impls else None)
        write_results(args.out, f"bench_layers_{device.type}_{dt}", markdown(result), result)
        return result
    names = list(SWEEPS) if "all" in args.sweep else list(dict.fromkeys(args.sweep))
    out = {}
    for name in names:
        results = run_sweep(SWEEPS[name], base, args, argv, device, dt)
        out[name] = results
        write_results(args.out, f"sweep_{name}_{device.type}_{dt}", sweep_markdown(SWEEPS[name], results),
                      {"sweep": name, "results": results})
    return out


if __name__ == "__main__":
    main()
