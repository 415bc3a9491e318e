"""Markdown tables of the layer benchmark: one shape's full table, and a sweep's summary table."""

from __future__ import annotations

from .common import fmt_ms, machine_line
from .layer_specs import Sweep


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def shape_line(s: dict) -> str:
    return (
        f"{s['batch']} x {s['seq_len']} tokens, d_model {s['d_model']}, d_ff {s['d_ff']}, "
        f"{s['experts']} experts, top-{s['top_k']}, Lory T {s['segment_len']}"
    )


def markdown(result: dict) -> str:
    m, st = result["machine"], result["settings"]
    peak_how = (
        "CUDA max_memory_allocated minus allocated before"
        if m["device"].startswith("cuda")
        else "process peak-RSS delta (VmHWM after clear_refs; glibc mmap threshold 64 KiB)"
    )
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
        "time / dense, no switch: the same ratio measured in a fresh process without the allocator switch "
        "(DIFFMOE_MALLOC=default), as in a script that imports the layers (n/a: not measured there).",
        "TFLOP/s: model FLOPs / median time; MFU: that / the GPU's dense bf16 peak "
        + (f"({result['peak_tflops']:g} TFLOP/s)." if result.get("peak_tflops") else "(n/a: no GPU peak known)."),
        "",
        "| layer | FLOPs / dense | time ms | time / dense | time / dense, no switch | time / (FLOPs x dense) "
        "| ideal ms | time / ideal | TFLOP/s | MFU | act MiB | act / dense | peak act MiB | peak act / dense | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['name']} | {r['flop_factor']:.3g} | {fmt_ms(r['time_ms'])} | {r['time_ratio']:.2f} | "
            f"{_fmt(r.get('time_ratio_no_switch'), '.2f')} | {r['time_per_flop_ratio']:.2f} | {fmt_ms(r['ideal_ms'])} | {r['time_over_ideal']:.2f} | "
            f"{r['achieved_tflops']:.3g} | {_fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'' if r['mfu'] is None else ' %'} | "
            f"{r['act_mib']:.1f} | {r['act_ratio']:.2f} | {_fmt(r['peak_act_mib'], '.1f')} | "
            f"{_fmt(r['peak_act_ratio'], '.2f')} | {r['note']} |"
        )
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
    lines = [
        f"# Layer sweep over {sweep.title} ({m['device']}, {m['dtype']})",
        "",
        machine_line(m),
        f"First line's shape: {shape_line(results[0]['shape'])}; each cell: time / dense (peak activation "
        f"memory / dense) of the same run, medians of {st['repeats']} rounds after {st['warmup']} "
        "warm-up rounds. Full tables in the JSON.",
        "",
        f"| {sweep.title} | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
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
