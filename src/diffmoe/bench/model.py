"""Model benchmark: training tokens/s of configs, eager and under ``torch.compile``, with FLOP utilisation.

Each config is built and stepped as ``diffmoe train`` does it (the same ``Decoder``, ``parallelize``,
AdamW from ``build_optimizer`` and the trainer's ``Stepper``: forward, cross-entropy + auxiliary
losses, backward, gradient clipping, AdamW step, zero_grad), on random token ids of one micro-batch
(``data.micro_batch_size``, else ``data.batch_size``) x ``model.max_seq_len`` (overridable). Random
ids do the same work as text, except that a token-choice router sees a different balance.
``--layout fsdp`` runs the model under FSDP2 on a one-process group (bf16 compute through FSDP2's
mixed precision, as ``train.parallel.mode=fsdp``); ``--ac`` with per-block activation checkpointing.
``--loss full`` computes the LM loss as before chunking (full float32 logits [B, L, V], then
cross-entropy) instead of the trainer's chunked loss (:mod:`diffmoe.model.loss`); ``--loss both``
runs each config both ways side by side, to show the memory the chunks save. Each entry reports
its peak memory: on CUDA the peak allocated during its steps; on CPU (Linux) the peak-RSS growth of
one more step after all timing (see :class:`diffmoe.bench.measure.RssPeak`).

Every (config, mode) is one entry; entries run round-robin, one step each per round (see
:mod:`diffmoe.bench.common`); the first ``--warmup`` rounds (which include compilation) are discarded.

FLOPs per token: 6 N + 12 n_layers d_model L (training, PaLM's convention), N = the active matmul
parameters (embedding lookup excluded, LM head included; a MoE layer counts the experts a token
uses: Lory 1, top-k k, expert choice c). Lory's merge, routers and elementwise work are overhead, not
model FLOPs. Utilisation = achieved FLOP/s / peak: on CUDA the GPU's dense bf16 peak (``--peak-tflops``
or a table of known GPUs): model FLOP utilisation (MFU); on every device also the share of the
measured matmul rate (an n^3 matmul in the same dtype).

Usage: diffmoe bench model [CONFIG.yaml ...] [--compile both|off|on] [--layout ddp|fsdp] [--ac off|on|both]
[--set section.field=value ...].
Default configs: configs/0*-tiny-*.yaml on CPU, configs/1*-paper-*.yaml on CUDA (from the working
directory). Writes bench_model_<device>_<dtype>.md and .json under --out (default results/model/).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, RunConfig, load_config
from ..model import Decoder
from ..parallel import distributed
from ..parallel.parallelize import ParallelPlan, parallelize
from ..train.metrics import flops_per_token
from ..train.optim import build_optimizer
from ..train.step import Stepper
from .common import (
    config_bench_parser,
    config_files,
    device_options,
    dtype_name,
    fmt_ms,
    gpu_peak_flops,
    machine_info,
    machine_line,
    markdown_table,
    matmul_rate,
    median_ratio,
    parse_checked,
    round_robin,
    start,
    sync,
    write_results,
)
from .measure import RssPeak


@dataclass
class Entry:
    config: str
    cfg: RunConfig
    mode: str  # eager | compile
    ac: bool
    loss: str  # chunked | full
    model: Decoder
    step_fn: object
    times_s: list[float] = field(default_factory=list)
    first_step_s: float = 0.0
    peak_bytes: int = 0


def make_step(entry: Entry, ids: torch.Tensor, dtype: torch.dtype, layout: str):
    """A callable running one training step of ``entry.model`` (as the trainer does, in ``layout``)
    and returning its wall time (s); on CUDA it records the entry's peak allocated memory."""
    cfg, device = entry.cfg, ids.device
    pc = dataclasses.replace(
        cfg.train.parallel,
        mode=layout,
        activation_checkpointing="block" if entry.ac else "none",
        dp_replicate=1,
        dp_shard=-1,
        ep=1,
        etp=1,
    )
    bf16 = dtype == torch.bfloat16
    plan = ParallelPlan.build(pc, 1, device.type, compile=entry.mode == "compile", bf16=bf16)
    wrapped = parallelize(entry.model, plan, device)
    optimizer = build_optimizer(entry.model, cfg.train)
    if entry.loss == "full":
        wrapped = FullLogitsLoss(wrapped)
    batches = itertools.repeat((ids, ids.roll(-1, 1)))
    env = distributed.DistEnv(0, 1, device)
    stepper = Stepper(wrapped, optimizer, plan, env, cfg.train.grad_clip, bf16)

    def step() -> float:
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        stepper.step(batches, 1)
        sync(device)
        elapsed = time.perf_counter() - t0
        if device.type == "cuda":
            entry.peak_bytes = max(entry.peak_bytes, torch.cuda.max_memory_allocated(device))
        return elapsed

    return step


class FullLogitsLoss(nn.Module):
    """The LM loss computed the unchunked way, for comparison: ``forward(ids, labels, aux)`` -> per-token
    loss [B, L] from the full float32 logits [B, L, V] of the wrapped model (``aux`` collects its
    auxiliary losses, as in training)."""

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, ids: torch.Tensor, labels: torch.Tensor, aux=None) -> torch.Tensor:
        logits = self.wrapped(ids, aux=aux)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none").view_as(labels)


def build_entries(args, device: torch.device, dtype: torch.dtype) -> list[Entry]:
    modes = {"both": ["eager", "compile"], "off": ["eager"], "on": ["compile"]}[args.compile]
    checkpointing = {"both": [False, True], "off": [False], "on": [True]}[args.ac]
    losses = {"both": ["chunked", "full"], "chunked": ["chunked"], "full": ["full"]}[args.loss]
    entries = []
    for path in args.configs:
        cfg = load_config(str(path), args.set)
        cfg.data.batch_size = args.batch_size or cfg.data.micro_batch_size or cfg.data.batch_size  # one micro-batch
        cfg.data.micro_batch_size = None
        seq = args.seq_len or cfg.model.max_seq_len
        if seq > cfg.model.max_seq_len:
            raise ConfigError(f"--seq-len {seq} exceeds model.max_seq_len={cfg.model.max_seq_len} of {path}")
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, cfg.model.vocab_size, (cfg.data.batch_size, seq), generator=g).to(device)
        for mode, ac, loss in itertools.product(modes, checkpointing, losses):
            torch.manual_seed(args.seed)
            model = Decoder(cfg.model).train()  # float32 master weights, as in training
            entry = Entry(Path(path).stem, cfg, mode, ac, loss, model, None)
            entry.step_fn = make_step(entry, ids, dtype, args.layout)
            entries.append(entry)
    return entries


def summarize(entries: list[Entry], args, matmul: float, peak: float | None) -> list[dict]:
    dense = {(e.mode, e.ac, e.loss): e for e in entries if e.cfg.model.ffn == "dense"}
    rows = []
    for e in entries:
        tokens = e.cfg.data.batch_size * (args.seq_len or e.cfg.model.max_seq_len)
        step = statistics.median(e.times_s)
        tps = tokens / step
        flops_tok = flops_per_token(e.model, args.seq_len or e.cfg.model.max_seq_len)
        achieved = flops_tok * tps
        counts = e.model.parameter_counts()
        ref = dense.get((e.mode, e.ac, e.loss))
        rows.append(
            {
                "config": e.config,
                "mode": e.mode,
                "layout": args.layout,
                "activation_checkpointing": e.ac,
                "loss": e.loss,
                "ffn": e.cfg.model.ffn,
                "peak_mem_gb": e.peak_bytes / 2**30 if e.peak_bytes else None,
                "params": counts["total"],
                "active_params": counts["active"],
                "batch": e.cfg.data.batch_size,
                "seq_len": args.seq_len or e.cfg.model.max_seq_len,
                "step_ms": 1e3 * step,
                "steps_ms": [1e3 * t for t in e.times_s],
                "tokens_per_s": tps,
                "time_vs_dense": median_ratio(e.times_s, ref.times_s) if ref else None,
                "first_step_s": e.first_step_s,
                "gflop_per_token": flops_tok / 1e9,
                "achieved_tflops": achieved / 1e12,
                "matmul_share": achieved / matmul,
                "mfu": achieved / peak if peak else None,
            }
        )
    return rows


def markdown(result: dict) -> str:
    m, st = result["machine"], result["settings"]
    peak = result["peak_tflops"]
    lines = [
        f"# Model benchmark: training steps ({m['device']}, {m['dtype']})",
        "",
        machine_line(m),
        f"One step: forward, loss + aux losses, backward, clipping, AdamW, on random ids; median of {st['repeats']} "
        f"steps per entry after {st['warmup']} warm-up rounds (entries round-robin; all steps in the JSON). "
        "time / dense: per-round ratio to the dense config in the same mode. loss: chunked (the trainer's) or "
        "full (float32 logits [B, L, V], then cross-entropy). peak GB: "
        + (
            "peak allocated during the entry's steps. "
            if m["device"].startswith("cuda")
            else "peak-RSS growth of one step after the timing (n/a where unmeasurable). "
        )
        + "FLOPs: 6 N_active + 12 n_layers d L "
        f"per token. Measured {m['dtype']} matmul rate: {result['matmul_tflops']:.3g} TFLOP/s"
        + (f"; peak used for MFU: {peak:g} TFLOP/s." if peak else "; no GPU peak known: MFU n/a."),
        "",
    ]
    rows = []
    for r in result["rows"]:
        vs = "n/a" if r["time_vs_dense"] is None else f"{r['time_vs_dense']:.2f}"
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
        peak_gb = "n/a" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.3g}"
        rows.append(
            [
                r["config"],
                r["mode"],
                r["layout"],
                "on" if r["activation_checkpointing"] else "off",
                r["loss"],
                f"{r['params'] / 1e6:.2f}M ({r['active_params'] / 1e6:.2f}M)",
                f"{r['batch']} x {r['seq_len']}",
                fmt_ms(r["step_ms"]),
                f"{r['tokens_per_s']:,.0f}",
                vs,
                f"{r['gflop_per_token']:.4g}",
                f"{r['achieved_tflops']:.3g}",
                f"{100 * r['matmul_share']:.1f} %",
                mfu,
                peak_gb,
                f"{r['first_step_s']:.1f}",
            ]
        )
    lines += markdown_table(
        [
            "config",
            "mode",
            "layout",
            "AC",
            "loss",
            "params (active)",
            "batch x seq",
            "step ms",
            "tokens/s",
            "time / dense",
            "GFLOP/token",
            "TFLOP/s",
            "share of matmul rate",
            "MFU",
            "peak GB",
            "first step s",
        ],
        rows,
    )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = config_bench_parser("model", __doc__, "results/model", 5, 2, "e.g. model.n_layers=2")
    p.add_argument("--compile", choices=["both", "off", "on"], default="both", help="eager, compiled or both")
    p.add_argument(
        "--layout",
        choices=["ddp", "fsdp"],
        default="ddp",
        help="ddp: the plain model (one process); fsdp: FSDP2 on a one-process group",
    )
    p.add_argument("--ac", choices=["off", "on", "both"], default="off", help="per-block activation checkpointing")
    p.add_argument(
        "--loss",
        choices=["chunked", "full", "both"],
        default="chunked",
        help="LM loss: the trainer's chunked loss, the full float32 logits, or both side by side",
    )
    device_options(p, "bfloat16 = autocast over float32 weights, as train.bf16 (auto: bf16 on CUDA)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="sequences per step (default: each config's data.micro_batch_size, else data.batch_size)",
    )
    p.add_argument("--seq-len", type=int, default=None, help="default: each config's model.max_seq_len")
    p.add_argument("--peak-tflops", type=float, default=None, help="GPU peak for MFU (default: known GPUs)")
    p.add_argument("--matmul-size", type=int, default=None, help="n of the n^3 rate matmul (2048 CPU, 8192 CUDA)")
    a = parse_checked(p, argv)
    a.set = a.set or []
    return a


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, dtype = start(args)
    args.configs = config_files(args.configs, device, "0*-tiny-*.yaml", "1*-paper-*.yaml")
    load_start = os.getloadavg()[0]
    env = distributed.setup(device, need_group=args.layout == "fsdp")
    entries = build_entries(args, device, dtype)
    firsts = [e.step_fn() for e in entries]  # first step: compilation for compiled entries
    for e, t in zip(entries, firsts):
        e.first_step_s = t
    times, load = round_robin([e.step_fn for e in entries], args.warmup, args.repeats)
    for e, t in zip(entries, times):
        e.times_s = t
    if device.type == "cpu":  # after all timing: RssPeak changes malloc settings for the rest of the process
        rss = RssPeak()
        for e in entries:
            e.peak_bytes = rss.measure(e.step_fn) or 0
    matmul = matmul_rate(device, dtype, args.matmul_size or (8192 if device.type == "cuda" else 2048))
    peak = gpu_peak_flops(device, args.peak_tflops)
    result = {
        "machine": machine_info(device, dtype, load_start),
        "settings": {
            "repeats": args.repeats,
            "warmup": args.warmup,
            "seed": args.seed,
            "overrides": args.set,
            "configs": [str(c) for c in args.configs],
        },
        "matmul_tflops": matmul / 1e12,
        "peak_tflops": peak / 1e12 if peak else None,
        "loadavg_per_round": load,
        "rows": summarize(entries, args, matmul, peak),
    }
    write_results(
        args.out,
        f"bench_model_{device.type}_{dtype_name(dtype)}" + ("_fsdp" if args.layout == "fsdp" else ""),
        markdown(result),
        result,
    )
    distributed.teardown(env)
    return result


if __name__ == "__main__":
    main()
