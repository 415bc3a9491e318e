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
- Without the allocator switch: the benchmark process keeps freed memory for reuse
  (:func:`diffmoe.runtime.reuse_freed_memory`), as ``diffmoe`` commands do; a user's own script does
  not. So the same shape is timed again in a fresh process with ``DIFFMOE_MALLOC=default`` (diffmoe's
  layers only, not transformers'), as a script that imports the layers runs them: the column
  ``time / dense, no switch`` (``--no-compare-malloc`` skips it; sweeps skip it).
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
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hub-kernel implementations must not download anything

import torch

from ..runtime import malloc_mode
from . import layer_specs as specs_module
from .common import DTYPES, dtype_name, gpu_peak_flops, machine_info, start, write_results
from .layer_report import markdown, shape_line, sweep_markdown
from .layer_specs import HF_INIT_STD, SWEEPS, Shape, Sweep, all_families
from .measure import RssPeak, prepare, run_memory, run_timing, summarize


def measure_shape(
    shape: Shape, device: torch.device, dtype: torch.dtype, args, families=None, hf_impls: tuple[str, ...] | None = None
) -> dict:
    """Build, time and measure every selected layer (``families``; None: all) at one shape. Returns the
    result dict."""
    families = all_families() if families is None else families
    load_start = os.getloadavg()[0]
    torch.manual_seed(args.seed)
    x = torch.randn(shape.batch, shape.seq_len, shape.d_model, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(shape.batch, shape.seq_len, shape.d_model, device=device, dtype=dtype)
    specs = [s for s in specs_module.layer_specs(shape, device, dtype, hf_impls) if s.family in families]
    layers, rows, skipped = prepare(specs, x, g, args.seed)
    if "hf" in families and not specs_module.hf_implementations():  # looked up at call time (tests patch it)
        skipped.append(
            {
                "name": "HF MixtralSparseMoeBlock, PhimoeSparseMoeBlock",
                "reason": "transformers is not installed (pip install 'diffmoe[hf]')",
            }
        )
    log = run_timing(layers, rows, x, g, args.warmup, args.repeats, args.matmul_size)
    run_memory(layers, rows, x, g, RssPeak() if device.type == "cpu" else None)  # after timing: malloc settings
    matmul_flops = 2.0 * args.matmul_size**3
    peak = gpu_peak_flops(device, args.peak_tflops)
    return {
        "machine": machine_info(device, dtype, load_start),
        "shape": {**asdict(shape), "batch": shape.batch},
        "settings": {
            "repeats": args.repeats,
            "warmup": args.warmup,
            "matmul_size": args.matmul_size,
            "seed": args.seed,
            "hf_init_std": HF_INIT_STD,
        },
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
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per batch (batch = tokens / seq-len)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=1408)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2, help="k of TopKMoE and transformers' Mixtral block")
    p.add_argument("--ec-capacity", type=float, default=2.0, help="expert choice capacity factor c")
    p.add_argument("--segment-len", type=int, default=256, help="Lory segment length T")
    p.add_argument(
        "--layers",
        nargs="+",
        choices=all_families(),
        default=list(all_families()),
        help="layer families to measure (dense always)",
    )
    p.add_argument(
        "--hf-impls",
        nargs="+",
        default=None,
        help="transformers experts implementations to time (default: every registered one)",
    )
    p.add_argument(
        "--sweep",
        nargs="+",
        choices=[*SWEEPS, "all"],
        default=None,
        help="measure every shape of these sweeps (one process per shape) instead of one shape",
    )
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2, help="discarded rounds (the probe step is extra)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--matmul-size", type=int, default=None, help="n of the n^3 rate matmul (2048 CPU, 8192 CUDA)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="GPU peak for model FLOP utilisation (default: known GPUs' dense bf16 peak)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compare-malloc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time diffmoe's layers in a fresh process without the allocator switch",
    )
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
    return [
        "--tokens",
        str(shape.tokens),
        "--seq-len",
        str(shape.seq_len),
        "--d-model",
        str(shape.d_model),
        "--d-ff",
        str(shape.d_ff),
        "--experts",
        str(shape.experts),
        "--top-k",
        str(shape.top_k),
        "--ec-capacity",
        str(shape.ec_capacity),
        "--segment-len",
        str(shape.segment_len),
    ]


def run_sweep(sweep: Sweep, base: Shape, args, argv: list[str], device: torch.device, dt: str) -> list[dict]:
    """Each shape in a fresh process (the CPU peak-RSS measurement changes malloc settings for the rest
    of a process, and shapes must not inherit each other's heap), with the caller's other options."""
    keep = _drop_options(
        argv,
        {
            "--sweep",
            "--out",
            "--layers",
            "--hf-impls",
            "--tokens",
            "--seq-len",
            "--d-model",
            "--d-ff",
            "--experts",
            "--top-k",
            "--ec-capacity",
            "--segment-len",
            "--compare-malloc",
            "--no-compare-malloc",
        },
    )
    results = []
    for shape in sweep.shapes(base):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                sys.executable,
                "-m",
                "diffmoe.bench.layers",
                *keep,
                *_shape_argv(shape),
                "--out",
                tmp,
                "--layers",
                *(sweep.families or all_families()),
                "--hf-impls",
                *sweep.hf_impls,
                "--no-compare-malloc",
            ]
            print(f"sweep {sweep.name}: {shape_line({**asdict(shape), 'batch': shape.batch})}", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"error: sweep {sweep.name} failed at {shape}:\n{proc.stderr[-2000:]}")
            results.append(json.loads((Path(tmp) / f"bench_layers_{device.type}_{dt}.json").read_text()))
    return results


def add_no_switch_times(result: dict, args, argv: list[str], device: torch.device, dt: str) -> None:
    """Time diffmoe's layers again in a fresh process with ``DIFFMOE_MALLOC=default`` (glibc's own
    allocation behaviour, as in a user's script) and add each row's ``time_ratio_no_switch`` and
    ``times_ms_no_switch`` (None for rows not measured there)."""
    keep = _drop_options(argv, {"--out", "--layers", "--compare-malloc", "--no-compare-malloc"})
    families = [f for f in args.layers if f != "hf"]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "diffmoe.bench.layers",
            *keep,
            "--out",
            tmp,
            "--layers",
            *families,
            "--no-compare-malloc",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DIFFMOE_MALLOC": "default"})
        if proc.returncode != 0:
            raise SystemExit(f"error: the run without the allocator switch failed:\n{proc.stderr[-2000:]}")
        other = json.loads((Path(tmp) / f"bench_layers_{device.type}_{dt}.json").read_text())
    by_name = {r["name"]: r for r in other["rows"]}
    for row in result["rows"]:
        r = by_name.get(row["name"])
        row["time_ratio_no_switch"] = r and r["time_ratio"]
        row["times_ms_no_switch"] = r and r["times_ms"]
    result["no_switch_machine"] = other["machine"]


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
    base = Shape(
        args.tokens, args.seq_len, args.d_model, args.d_ff, args.experts, args.segment_len, args.top_k, args.ec_capacity
    )
    if not args.sweep:
        families = ("dense", *args.layers)
        result = measure_shape(base, device, dtype, args, families, tuple(args.hf_impls) if args.hf_impls else None)
        if args.compare_malloc and malloc_mode() == "reuse" and device.type == "cpu":  # glibc's switch: CPU only
            add_no_switch_times(result, args, argv, device, dt)
        write_results(args.out, f"bench_layers_{device.type}_{dt}", markdown(result), result)
        return result
    names = list(SWEEPS) if "all" in args.sweep else list(dict.fromkeys(args.sweep))
    out = {}
    for name in names:
        results = run_sweep(SWEEPS[name], base, args, argv, device, dt)
        out[name] = results
        write_results(
            args.out,
            f"sweep_{name}_{device.type}_{dt}",
            sweep_markdown(SWEEPS[name], results),
            {"sweep": name, "results": results},
        )
    return out


if __name__ == "__main__":
    main()
