"""Scale benchmark: a config under each parallel layout with 1, 2 and 4 processes (``torchrun
--standalone`` on this machine: gloo on CPU, NCCL on GPUs), against ``diffmoe plan``'s model.

For every (config, processes, layout) one torchrun job builds the model as ``diffmoe train`` does
(``parallelize``, ``build_optimizer``, ``Stepper``) on random ids of the config's global batch
(``data.batch_size`` sequences of ``model.max_seq_len``, or ``--seq-len``), runs ``--warmup`` steps,
then times ``--repeats`` steps (median), and counts the bytes every rank sends through collectives
in one more step (:class:`~diffmoe.parallel.comm_count.CommCounter`; a separate step because counting
slows every op). Reported per rank (rank 0; all ranks in the JSON): ms per step, bytes per step, the
plan's bytes for the same layout and their ratio, and peak memory: on CUDA the allocator's peak, on
CPU how much the process's peak resident set grew from before the model was built (model, optimizer,
activations, and whatever the allocator keeps). Layouts: ddp, fsdp,
and fsdp+ep{2,4} or fsdp+etp{2,4} where the config's MoE layers allow them and the processes divide.
Each job is a separate process, so memory is per layout.

Usage: diffmoe bench scale [CONFIG.yaml ...] [--procs 1 2 4] [--set section.field=value ...]
Default configs: configs/01-tiny-lory-8e.yaml and configs/03-tiny-topk-8e.yaml with a reduced shape
(--set defaults below). Writes bench_scale_<device>.md and .json under --out (default results/scale/).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..config import load_config
from .common import (
    config_bench_parser,
    fmt_ms,
    machine_info,
    machine_line,
    markdown_table,
    parse_checked,
    resolve_device,
    write_results,
)

DEFAULT_CONFIGS = ("configs/01-tiny-lory-8e.yaml", "configs/03-tiny-topk-8e.yaml")
DEFAULT_SET = ("model.n_layers=2", "model.max_seq_len=128", "data.batch_size=8")


def layouts_for(cfg, procs: int) -> list[dict]:
    """train.parallel fields of the layouts to run for ``procs`` processes (see the module docstring)."""
    from ..moe import FAMILIES

    out = [{"mode": "ddp"}]
    if procs == 1:
        return out
    out.append({"mode": "fsdp"})
    ways = {getattr(FAMILIES[k].layer, "expert_sharding", None) for k in cfg.model.kinds} - {None}
    moe = [k for k in cfg.model.kinds if k != "dense"]
    if len(ways) == 1 and all(getattr(FAMILIES[k].layer, "expert_sharding", None) in ways for k in moe):
        way = ways.pop()
        for n in (2, 4):
            if procs % n == 0:
                out.append({"mode": "fsdp", way: n})
    return out


def layout_label(fields: dict) -> str:
    extra = [f"{k}{v}" for k, v in fields.items() if k in ("ep", "etp")]
    return "+".join([fields["mode"], *extra])


# ----------------------------------------------------------------------------------------------
# worker: one layout, under torchrun


def worker(
    config: str, overrides: list[str], fields: dict, warmup: int, repeats: int, seq_len: int | None, out: str
) -> None:
    import torch.distributed as dist

    from ..model import Decoder
    from ..parallel import distributed
    from ..parallel.comm_count import CommCounter
    from ..parallel.parallelize import ParallelPlan, parallelize
    from ..train.loop import batch_split
    from ..train.optim import build_optimizer
    from ..train.step import Stepper

    cfg = load_config(config, overrides)
    cfg.train.parallel = dataclasses.replace(cfg.train.parallel, **fields)
    cfg.validate()
    env = distributed.setup(need_group=fields["mode"] == "fsdp")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # imports, torch, the group
    seq = seq_len or cfg.model.max_seq_len
    micro, accum = batch_split(cfg, env.world)
    plan = ParallelPlan.build(cfg.train.parallel, env.world, env.device.type, bf16=cfg.train.bf16)
    torch.manual_seed(cfg.train.seed)
    model = Decoder(cfg.model)
    wrapped = parallelize(model, plan, env.device)
    optimizer = build_optimizer(model, cfg.train)
    g = torch.Generator().manual_seed(env.rank)
    ids = torch.randint(0, cfg.model.vocab_size, (micro, seq + 1), generator=g)
    batches = itertools.repeat((ids[:, :-1], ids[:, 1:]))
    stepper = Stepper(wrapped, optimizer, plan, env, cfg.train.grad_clip, cfg.train.bf16)

    def step() -> float:
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        stepper.step(batches, accum)
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(warmup):
        step()
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [step() for _ in range(repeats)]
    with CommCounter() as counter:
        step()
    peak = (
        torch.cuda.max_memory_allocated()
        if env.device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    )
    record = {
        "rank": env.rank,
        "world": env.world,
        "step_ms": [1e3 * t for t in times],
        "bytes": counter.total_bytes,
        "comm": counter.as_dict(),
        "peak_bytes": peak,
        "micro": micro,
        "accum": accum,
        "seq_len": seq,
        "device": str(env.device),
    }
    records = [None] * env.world
    if env.world > 1:
        dist.all_gather_object(records, record)
    else:
        records = [record]
    if env.rank == 0:
        Path(out).write_text(json.dumps(records), encoding="utf-8")
    distributed.teardown(env)
    if env.world > 1:
        sys.stdout.flush()
        os._exit(0)  # gloo jobs using FSDP2 may abort at interpreter exit (docs/scaling.md)


# ----------------------------------------------------------------------------------------------
# driver


def run_job(args, config: str, procs: int, fields: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "records.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(procs),
            "-m",
            "diffmoe.bench.scale",
            "--worker",
            json.dumps(fields),
            "--out",
            str(out),
            "--warmup",
            str(args.warmup),
            "--repeats",
            str(args.repeats),
            config,
            "--set",
            *args.set,
        ]
        if args.seq_len:
            cmd += ["--seq-len", str(args.seq_len)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads or max(1, (os.cpu_count() or 1) // procs)))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"bench scale: {config} on {procs} processes, {layout_label(fields)} failed:\n{proc.stderr[-3000:]}"
            )
        return json.loads(out.read_text(encoding="utf-8"))


def planned(config: str, overrides: list[str], procs: int, fields: dict, seq_len: int | None) -> dict:
    """The plan's bytes per rank per step and memory per GPU for this layout (no activation
    checkpointing; a cluster with room for everything)."""
    from ..parallel.layout import Layout
    from ..parallel.plan import Cluster, plan_layout, workload

    cfg = load_config(config, overrides)
    cfg.train.parallel = dataclasses.replace(cfg.train.parallel, **fields)
    cluster = Cluster(gpus=procs, gpu_mem_gib=10_000, reserve_gib=0)
    layout = Layout.resolve(cfg.train.parallel, procs)
    lp = plan_layout(cfg.model, layout, workload(cfg, procs, seq_len or cfg.model.max_seq_len), cluster)
    return {
        "bytes": sum(lp.comm_bytes("none")),
        "memory_bytes": lp.memory.total("none"),
        "by_kind": _by_kind(lp.comm["none"]),
    }


def _by_kind(collectives) -> dict[str, float]:
    out: dict[str, float] = {}
    for c in collectives:
        out[c.kind] = out.get(c.kind, 0.0) + c.bytes
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# Scale benchmark ({m['device']})",
        "",
        machine_line(m),
        f"Median of {result['settings']['repeats']} steps after {result['settings']['warmup']} warm-up steps; "
        "bytes = what rank 0 sends through collectives in one step (ring convention, see diffmoe.parallel.plan); "
        "plan = `diffmoe plan`'s model of the same layout; peak = CUDA allocator peak, or on CPU the growth "
        "of the process's peak RSS from before the model was built.",
        "",
    ]
    rows = []
    for r in result["rows"]:
        ratio = f"{r['bytes'] / r['plan_bytes']:.3f}" if r["plan_bytes"] else ("1 (none)" if not r["bytes"] else "n/a")
        rows.append(
            [
                r["config"],
                r["procs"],
                r["layout"],
                f"{r['micro']} x {r['accum']}",
                fmt_ms(r["step_ms"]),
                f"{r['bytes'] / 1e6:.2f}",
                f"{r['plan_bytes'] / 1e6:.2f}",
                ratio,
                f"{r['peak_bytes'] / 2**20:.0f}",
                f"{r['plan_memory_bytes'] / 2**20:.0f}",
            ]
        )
    lines += markdown_table(
        [
            "config",
            "processes",
            "layout",
            "micro x accum",
            "ms / step",
            "MB sent / step",
            "plan MB",
            "measured / plan",
            "peak MB",
            "plan memory MB (no reserve)",
        ],
        rows,
    )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = config_bench_parser(
        "scale",
        __doc__,
        "results/scale",
        3,
        1,
        f"default: {' '.join(DEFAULT_SET)}",
        threads_help="threads per process (default: cores / processes)",
    )
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per torchrun job")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = parse_checked(p, argv)
    a.configs = [str(c) for c in a.configs] or list(DEFAULT_CONFIGS)
    a.set = list(DEFAULT_SET) if a.set is None else a.set
    return a


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.worker:
        worker(
            args.configs[0], args.set, json.loads(args.worker), args.warmup, args.repeats, args.seq_len, str(args.out)
        )
        return None
    device = resolve_device("auto")
    load_start = os.getloadavg()[0]
    rows = []
    for config in args.configs:
        cfg = load_config(config, args.set)
        for procs in args.procs:
            for fields in layouts_for(cfg, procs):
                records = run_job(args, config, procs, fields)
                plan = planned(config, args.set, procs, fields, args.seq_len)
                r0 = records[0]
                rows.append(
                    {
                        "config": Path(config).stem,
                        "procs": procs,
                        "layout": layout_label(fields),
                        "fields": fields,
                        "micro": r0["micro"],
                        "accum": r0["accum"],
                        "step_ms": statistics.median(r0["step_ms"]),
                        "bytes": r0["bytes"],
                        "plan_bytes": plan["bytes"],
                        "plan_by_kind": plan["by_kind"],
                        "peak_bytes": max(r["peak_bytes"] for r in records),
                        "plan_memory_bytes": plan["memory_bytes"],
                        "ranks": records,
                    }
                )
    result = {
        "machine": machine_info(device, torch.float32, load_start),
        "settings": {
            "configs": args.configs,
            "overrides": args.set,
            "procs": args.procs,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "seq_len": args.seq_len,
        },
        "rows": rows,
    }
    write_results(args.out, f"bench_scale_{device.type}", markdown(result), result)
    return result


if __name__ == "__main__":
    main()
