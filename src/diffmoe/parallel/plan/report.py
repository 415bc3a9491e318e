"""The plan as text (``diffmoe plan``) and as JSON (``diffmoe plan --json``)."""

from __future__ import annotations

import json
import math

from .inputs import GB, Cluster, GiB
from .planner import LayoutPlan, Plan


def format_plan(plan: Plan) -> str:
    """The human-readable report: header, one row per layout, recommendation, notes."""
    c, w = plan.cluster, plan.workload
    nodes = math.ceil(c.gpus / c.gpus_per_node)
    lines = [
        f"diffmoe plan{': ' + plan.config if plan.config else ''} on {c.gpus} GPU(s) x {c.gpu_mem_gib:g} GiB "
        f"({nodes} node(s) of {min(c.gpus, c.gpus_per_node)})",
        f"model: {plan.params / 1e9:.2f}B parameters ({plan.expert_params / 1e9:.2f}B in experts)",
        f"step: {w.global_batch} sequences x {w.seq_len} tokens = {w.global_batch * w.seq_len / 1e6:.2f}M tokens; "
        f"micro-batch {w.micro_batch} per GPU x {w.accum} accumulation",
        f"dtypes: activations {'bfloat16' if w.bf16 else 'float32'}; fsdp params {w.param_dtype}, "
        f"reduce {w.reduce_dtype}; bandwidth {c.intra_gbps:g} GB/s intra-node, {c.inter_gbps:g} GB/s inter-node; "
        f"reserve {c.reserve_gib:g} GiB",
        "",
        "memory per GPU in GiB (act, total: without / with per-block checkpointing); communication per GPU "
        "and step in GB",
        f"{'layout':<14}{'params':>7}{'grads':>7}{'adam':>7}{'other':>7}{'act':>7}{'act_ck':>7}{'total':>7}"
        f"{'tot_ck':>7}  {'fits':<5}{'max_mb':>7}{'intra':>9}{'inter':>8}{'time_s':>8}{'block_s':>8}",
    ]
    for lp in plan.layouts:
        lines.append(_row(lp, c))
    lines.append("")
    if plan.recommended:
        lines.append(
            f"recommended: {plan.recommended}"
            f"{', activation_checkpointing=block' if plan.recommended_mode == 'block' else ''}"
        )
    else:
        lines.append("recommended: none")
    lines.append(f"why: {plan.reason}")
    lines += [
        "",
        "fits: yes (without checkpointing), ckpt (only with it), no; max_mb: largest micro-batch per GPU "
        "that fits in that mode; intra/inter: GB sent inside / across nodes, time_s: their estimated time, "
        "block_s: the part that cannot overlap compute, all in that mode; * = the config's train.parallel",
    ]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _row(lp: LayoutPlan, c: Cluster) -> str:
    m, mode = lp.memory, lp.mode
    fit = "yes" if lp.fits["none"] else "ckpt" if lp.fits["block"] else "no"
    intra, inter = lp.comm_bytes(mode)
    mb = lp.max_micro_batch[mode]
    name = lp.name + ("*" if lp.configured else "")
    gib = [
        x / GiB
        for x in (
            m.params,
            m.grads,
            m.optimizer,
            m.other(mode),
            m.activations["none"],
            m.activations["block"],
            m.total("none"),
            m.total("block"),
        )
    ]
    return (
        f"{name:<14}" + "".join(f"{x:>7.1f}" for x in gib) + f"  {fit:<5}{mb if mb else '-':>7}"
        f"{intra / GB:>9.1f}{inter / GB:>8.1f}{lp.comm_seconds(mode, c):>8.2f}"
        f"{lp.blocking_seconds(mode, c):>8.2f}"
    )


def plan_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), indent=1)
