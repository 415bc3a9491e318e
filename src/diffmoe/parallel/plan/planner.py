"""The plan: every candidate layout of a config on a cluster with its memory, communication and fit,
and the one recommended."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from ...config import ConfigError, ModelConfig, RunConfig
from ..layout import Layout
from .comm import Collective, communication
from .inputs import MODES, Cluster, GiB, Workload, workload
from .memory import Memory, memory
from .model import expert_d_ff, expert_sharding, model_params


@dataclass
class LayoutPlan:
    """One layout: its memory, its communication per checkpointing mode, whether it fits, and the
    largest micro-batch (sequences per rank) that fits per mode (None: not even 1)."""

    name: str
    layout: Layout
    memory: Memory
    comm: dict[str, list[Collective]]
    fits: dict[str, bool]
    max_micro_batch: dict[str, int | None]
    configured: bool = False

    def comm_bytes(self, mode: str) -> tuple[float, float]:
        """(intra-node, inter-node) bytes this rank sends per step."""
        total = sum(c.bytes for c in self.comm[mode])
        intra = sum(c.intra for c in self.comm[mode])
        return intra, total - intra

    def comm_seconds(self, mode: str, cluster: Cluster) -> float:
        """Estimated time of all of the step's collectives, one after the other."""
        return sum(c.seconds(cluster) for c in self.comm[mode])

    def blocking_seconds(self, mode: str, cluster: Cluster) -> float:
        """The part of :meth:`comm_seconds` that cannot overlap computation."""
        return sum(c.seconds(cluster) for c in self.comm[mode] if not c.overlaps)

    @property
    def mode(self) -> str:
        """The checkpointing mode this layout would run with: none if it fits so, else block."""
        return "none" if self.fits["none"] or not self.fits["block"] else "block"


@dataclass
class Plan:
    """Every candidate layout of ``config`` on ``cluster`` and the recommended one (``recommended`` is a
    layout name, ``recommended_mode`` its checkpointing mode; both None when nothing fits)."""

    config: str
    cluster: Cluster
    workload: Workload
    params: int
    expert_params: int
    layouts: list[LayoutPlan]
    recommended: str | None
    recommended_mode: str | None
    reason: str
    notes: list[str] = field(default_factory=list)

    def layout(self, name: str) -> LayoutPlan:
        return next(lp for lp in self.layouts if lp.name == name)

    def to_dict(self) -> dict:
        """Plain values for JSON (bytes as numbers; seconds per step)."""
        return {
            "config": self.config,
            "cluster": asdict(self.cluster),
            "workload": asdict(self.workload),
            "params": self.params,
            "expert_params": self.expert_params,
            "recommended": self.recommended,
            "recommended_mode": self.recommended_mode,
            "reason": self.reason,
            "notes": self.notes,
            "layouts": [self._layout_dict(lp) for lp in self.layouts],
        }

    def _layout_dict(self, lp: LayoutPlan) -> dict:
        m = lp.memory
        out = {
            "name": lp.name,
            "configured": lp.configured,
            "layout": {k: getattr(lp.layout, k) for k in ("world", "mode", "dp_replicate", "dp_shard", "ep", "etp")},
            "memory_bytes": {
                "params": m.params,
                "grads": m.grads,
                "optimizer": m.optimizer,
                "copies": m.copies,
                "ddp_buckets": m.buffers,
                "reserve": m.reserve,
            },
            "modes": {},
        }
        for mode in MODES:
            intra, inter = lp.comm_bytes(mode)
            out["modes"][mode] = {
                "activations_bytes": m.activations[mode],
                "transient_bytes": m.transient[mode],
                "total_bytes": m.total(mode),
                "fits": lp.fits[mode],
                "max_micro_batch": lp.max_micro_batch[mode],
                "comm_intra_bytes": intra,
                "comm_inter_bytes": inter,
                "comm_seconds": lp.comm_seconds(mode, self.cluster),
                "blocking_seconds": lp.blocking_seconds(mode, self.cluster),
                "collectives": [asdict(c) for c in lp.comm[mode]],
            }
        return out


def candidate_layouts(mc: ModelConfig, cluster: Cluster) -> list[Layout]:
    """ddp; fsdp; hsdp (nodes x GPUs per node) when the job spans nodes; each sharding with ep or etp as
    the model's MoE layers allow (see :mod:`diffmoe.parallel.plan`)."""
    N, gpn = cluster.gpus, cluster.gpus_per_node
    out = [Layout(N, "ddp", dp_replicate=N)]
    if N == 1:
        return out
    shapes = [(1, N)] + ([(N // gpn, gpn)] if N > gpn else [])  # (dp_replicate, dp_shard): fsdp, hsdp
    out += [Layout(N, "fsdp", R, S) for R, S in shapes]
    way = expert_sharding(mc)
    for R, S in shapes:
        if way == "ep":
            E = mc.moe.num_experts
            out += [Layout(N, "fsdp", R, S, ep=e) for e in range(2, math.gcd(S, E) + 1) if math.gcd(S, E) % e == 0]
        elif way == "etp":
            f = expert_d_ff(mc)
            out += [Layout(N, "fsdp", R, S, etp=t) for t in (2, 4, 8) if S % t == 0 and f % t == 0]
    return out


def layout_name(layout: Layout) -> str:
    """``ddp``, ``fsdp``, ``hsdp2x8``, ``fsdp+ep4``, ``fsdp+etp4``, ``hsdp2x8+ep4`` ..."""
    if layout.mode == "ddp":
        return "ddp"
    name = "fsdp" if layout.dp_replicate == 1 else f"hsdp{layout.dp_replicate}x{layout.dp_shard}"
    if layout.ep > 1:
        name += f"+ep{layout.ep}"
    if layout.etp > 1:
        name += f"+etp{layout.etp}"
    return name


def plan_layout(mc: ModelConfig, layout: Layout, w: Workload, cluster: Cluster, configured: bool = False) -> LayoutPlan:
    """Memory, communication and fit of one layout."""
    mem = memory(mc, layout, w, cluster)
    limit = cluster.gpu_mem_gib * GiB
    fits = {m: mem.total(m) <= limit for m in MODES}
    comm = {m: communication(mc, layout, w, cluster, m) for m in MODES}
    return LayoutPlan(layout_name(layout), layout, mem, comm, fits, max_micro_batch(mc, layout, w, cluster), configured)


def max_micro_batch(mc: ModelConfig, layout: Layout, w: Workload, cluster: Cluster) -> dict[str, int | None]:
    """Per mode, the largest micro-batch (a divisor of the per-rank batch) whose memory fits."""
    per_rank = w.global_batch // layout.world
    limit = cluster.gpu_mem_gib * GiB
    out: dict[str, int | None] = {}
    for mode in MODES:
        out[mode] = None
        for m in sorted((m for m in range(1, per_rank + 1) if per_rank % m == 0), reverse=True):
            trial = replace(w, micro_batch=m, accum=per_rank // m)
            if memory(mc, layout, trial, cluster).total(mode) <= limit:
                out[mode] = m
                break
    return out


def make_plan(cfg: RunConfig, cluster: Cluster, seq_len: int | None = None, config_name: str = "") -> Plan:
    """Plan every candidate layout of ``cfg`` on ``cluster`` and recommend one."""
    mc = cfg.model
    w = workload(cfg, cluster.gpus, seq_len)
    layouts, notes = candidate_layouts(mc, cluster), []
    configured = _configured_layout(cfg, cluster, notes)
    if configured is not None and configured not in layouts:
        layouts.append(configured)
    plans = [plan_layout(mc, lay, w, cluster, configured=lay == configured) for lay in layouts]
    specs = model_params(mc)
    name, mode, reason = recommend(plans, cluster)
    return Plan(
        config_name,
        cluster,
        w,
        sum(s.numel for s in specs),
        sum(s.numel for s in specs if s.expert),
        plans,
        name,
        mode,
        reason,
        notes,
    )


def _configured_layout(cfg: RunConfig, cluster: Cluster, notes: list[str]) -> Layout | None:
    """The config's ``train.parallel`` resolved for the cluster, or None (with a note) when it does not."""
    pc = getattr(cfg.train, "parallel", None)
    if pc is None:
        return None
    try:
        return Layout.resolve(pc, cluster.gpus)
    except ConfigError as err:
        notes.append(f"the config's train.parallel does not apply to {cluster.gpus} GPUs: {err}")
        return None


NEAR_TIE = 0.05
"""Layouts within this fraction of the least communication time count as tied; the tie goes to the one
with the least blocking communication, then to the simpler (earlier in the candidate list)."""


def recommend(plans: list[LayoutPlan], cluster: Cluster) -> tuple[str | None, str | None, str]:
    """(layout name, checkpointing mode, why): fits without checkpointing first, else with it; then the
    least estimated communication time per step, near-ties (:data:`NEAR_TIE`) going to the least
    blocking communication."""
    limit = cluster.gpu_mem_gib
    for mode in MODES:
        fitting = [lp for lp in plans if lp.fits[mode]]
        if not fitting:
            continue
        best_time = min(lp.comm_seconds(mode, cluster) for lp in fitting)
        tied = [lp for lp in fitting if lp.comm_seconds(mode, cluster) <= best_time * (1 + NEAR_TIE)]
        best = min(tied, key=lambda lp: lp.blocking_seconds(mode, cluster))
        return best.name, mode, _reason(best, mode, fitting, tied, cluster)
    smallest = min(plans, key=lambda lp: lp.memory.total("block"))
    hint = smallest.max_micro_batch["block"]
    advice = f"set data.micro_batch_size={hint} (with activation checkpointing)" if hint else "use more or larger GPUs"
    return (
        None,
        None,
        (
            f"no layout fits in {limit:g} GiB; the smallest is {smallest.name} with checkpointing at "
            f"{smallest.memory.total('block') / GiB:.1f} GiB: {advice}"
        ),
    )


def _reason(best: LayoutPlan, mode: str, fitting: list[LayoutPlan], tied: list[LayoutPlan], cluster: Cluster) -> str:
    how = (
        "without activation checkpointing"
        if mode == "none"
        else "only with per-block activation checkpointing (no layout fits without it)"
    )
    t, blocking = best.comm_seconds(mode, cluster), best.blocking_seconds(mode, cluster)
    why = f"{best.name} fits {how} ({best.memory.total(mode) / GiB:.1f} of {cluster.gpu_mem_gib:g} GiB)"
    if len(fitting) == 1:
        return why + f"; it is the only layout that does ({t:.2f} s of communication per step)"
    others = ", ".join(f"{lp.name} {lp.comm_seconds(mode, cluster):.2f} s" for lp in fitting if lp is not best)
    if len(tied) > 1:
        return why + (
            f"; its estimated communication, {t:.2f} s per step, is within {NEAR_TIE:.0%} of the least "
            f"and it has the least that cannot overlap computation ({blocking:.2f} s); others: {others}"
        )
    return why + f" and has the least estimated communication: {t:.2f} s per step ({others})"
