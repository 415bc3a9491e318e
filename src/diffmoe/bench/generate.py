"""Decoding benchmark: prefill time and time per generated token with the KV cache, vs the dense model.

Each config's model (random weights, eval mode) generates greedily through
:func:`diffmoe.eval.generate.generate_stream`, the path of ``diffmoe generate``: a prefill call on a
[B, P] random prompt fills the KV cache, then G single-token steps follow. Lory layers run in
``prompt`` routing (merge once on the prompt's mean, then decode as a dense FFN); ``--lory-segment``
adds a row for ``segment`` routing (a new merge every T tokens). Expert choice is left out of the
defaults: its routing depends on the batch, so it is not an autoregressive decoder.

Measured per entry and round: prefill = the time to the first token (prefill forward + sampling);
per token = the time of the remaining G - 1 steps / (G - 1). Entries run round-robin (see
:mod:`diffmoe.bench.common`), medians over rounds after warm-up; ratios to the dense config are
medians of per-round ratios.

Usage: diffmoe bench generate [CONFIG.yaml ...] [--prompt-len P] [--new-tokens G] [--batch-size B]
[--set section.field=value ...]. Default configs: configs/0[0-3]-tiny-*.yaml on CPU,
configs/1[0-3]-paper-*.yaml on CUDA. Writes bench_generate_<device>_<dtype>.md and .json under --out
(default results/generate/).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path

import torch

from ..config import ConfigError, load_config
from ..eval.generate import generate_stream
from ..model import Decoder
from .common import (
    config_bench_parser,
    config_files,
    device_options,
    dtype_name,
    fmt_ms,
    machine_info,
    machine_line,
    markdown_table,
    median_ratio,
    parse_checked,
    round_robin,
    start,
    sync,
    write_results,
)


@dataclasses.dataclass
class Entry:
    """One model decoding with one Lory routing; calling it runs one generation (a round's step)."""

    config: str
    ffn: str
    routing: str | None  # Lory routing while decoding
    model: Decoder
    prompt: torch.Tensor
    new_tokens: int
    prefill_s: list[float] = dataclasses.field(default_factory=list)
    token_s: list[float] = dataclasses.field(default_factory=list)

    def __call__(self) -> float:
        """Generate once; record prefill and per-token seconds; return the total."""
        device = self.prompt.device
        sync(device)
        t0 = time.perf_counter()
        stream = generate_stream(self.model, self.prompt, self.new_tokens, routing=self.routing or "prompt")
        next(stream)
        sync(device)
        t1 = time.perf_counter()
        for _ in stream:
            pass
        sync(device)
        t2 = time.perf_counter()
        self.prefill_s.append(t1 - t0)
        self.token_s.append((t2 - t1) / (self.new_tokens - 1))
        return t2 - t0


def build_entries(args, device: torch.device, dtype: torch.dtype) -> list[Entry]:
    entries = []
    for path in args.configs:
        cfg = load_config(str(path), args.set)
        if args.prompt_len + args.new_tokens > cfg.model.max_seq_len:
            raise ConfigError(
                f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} exceeds "
                f"model.max_seq_len={cfg.model.max_seq_len} of {path}"
            )
        torch.manual_seed(args.seed)
        model = Decoder(cfg.model).to(device=device, dtype=dtype).eval()
        g = torch.Generator().manual_seed(args.seed)
        prompt = torch.randint(0, cfg.model.vocab_size, (args.batch_size, args.prompt_len), generator=g).to(device)
        routed = any("prompt" in ffn.capabilities.routing_modes for ffn in model.ffns())
        routings = ["prompt", "segment"] if routed and args.lory_segment else ["prompt"]
        for routing in routings:
            entries.append(
                Entry(Path(path).stem, cfg.model.ffn, routing if routed else None, model, prompt, args.new_tokens)
            )
    return entries


def markdown(result: dict) -> str:
    m, st = result["machine"], result["settings"]
    lines = [
        f"# Decoding benchmark: KV cache, greedy ({m['device']}, {m['dtype']})",
        "",
        machine_line(m),
        f"Batch {st['batch_size']}, prompt {st['prompt_len']} tokens, {st['new_tokens']} new tokens; median of "
        f"{st['repeats']} generations per entry after {st['warmup']} warm-up rounds (entries round-robin). "
        "per token: the G - 1 steps after the first token; ratios: medians of per-round ratios to the dense config.",
        "",
    ]
    rows = []
    for r in result["rows"]:
        vs = lambda k: "n/a" if r[k] is None else f"{r[k]:.2f}"  # noqa: E731
        rows.append(
            [
                r["config"],
                r["routing"] or "-",
                f"{r['params'] / 1e6:.2f}M ({r['active_params'] / 1e6:.2f}M)",
                fmt_ms(r["prefill_ms"]),
                vs("prefill_vs_dense"),
                fmt_ms(r["token_ms"]),
                f"{r['tokens_per_s']:,.0f}",
                vs("token_vs_dense"),
            ]
        )
    lines += markdown_table(
        [
            "config",
            "Lory routing",
            "params (active)",
            "prefill ms",
            "prefill / dense",
            "ms per token",
            "tokens/s",
            "per token / dense",
        ],
        rows,
    )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = config_bench_parser("generate", __doc__, "results/generate", 7, 2, "e.g. model.d_model=512")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lory-segment", action="store_true", help="also decode Lory with segment routing")
    device_options(p, "weights' dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    a = parse_checked(p, argv)
    a.set = a.set or []
    if a.prompt_len < 1 or a.new_tokens < 2 or a.batch_size < 1:
        p.error("--prompt-len and --batch-size must be >= 1 and --new-tokens >= 2")
    return a


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, dtype = start(args)
    args.configs = config_files(args.configs, device, "0[0-3]-tiny-*.yaml", "1[0-3]-paper-*.yaml")
    load_start = os.getloadavg()[0]
    entries = build_entries(args, device, dtype)
    round_robin(entries, args.warmup, args.repeats)
    for e in entries:  # keep the rounds after warm-up
        e.prefill_s, e.token_s = e.prefill_s[args.warmup :], e.token_s[args.warmup :]
    dense = next((e for e in entries if e.ffn == "dense"), None)
    rows = []
    for e in entries:
        token = statistics.median(e.token_s)
        counts = e.model.parameter_counts()
        rows.append(
            {
                "config": e.config,
                "ffn": e.ffn,
                "routing": e.routing,
                "params": counts["total"],
                "active_params": counts["active"],
                "prefill_ms": 1e3 * statistics.median(e.prefill_s),
                "token_ms": 1e3 * token,
                "tokens_per_s": args.batch_size / token,
                "prefill_vs_dense": median_ratio(e.prefill_s, dense.prefill_s) if dense else None,
                "token_vs_dense": median_ratio(e.token_s, dense.token_s) if dense else None,
                "prefill_runs_ms": [1e3 * t for t in e.prefill_s],
                "token_runs_ms": [1e3 * t for t in e.token_s],
            }
        )
    result = {
        "machine": machine_info(device, dtype, load_start),
        "settings": {
            "batch_size": args.batch_size,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "seed": args.seed,
            "overrides": args.set,
            "configs": [str(c) for c in args.configs],
        },
        "rows": rows,
    }
    write_results(args.out, f"bench_generate_{device.type}_{dtype_name(dtype)}", markdown(result), result)
    return result


if __name__ == "__main__":
    main()
