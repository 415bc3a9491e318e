"""Per-step communication of a layout: every collective one rank issues in an optimizer step, its
bytes (ring convention) and how many of them stay inside a node."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...config import ModelConfig
from ..layout import Layout
from .inputs import GB, Cluster, Precision, Workload
from .model import ffn_facts, model_params
from .units import Group, fsdp_units, groups

DDP_BUCKET_BYTES = 25 * 2**20
DDP_FIRST_BUCKET_BYTES = 2**20


@dataclass
class Collective:
    """One line of a step's communication: ``calls`` collectives of ``kind`` on ``group`` per optimizer
    step, sending ``bytes`` from this rank in all, ``intra`` of them inside a node. ``overlaps``: the
    collective can run while the GPU computes (FSDP2's prefetched all-gathers and side-stream
    reduce-scatters, DDP's bucketed all-reduce during backward); the others (EP all-to-alls, etp
    activations, the small ones) block the computation that needs their result."""

    what: str
    kind: str
    group: str
    group_size: int
    calls: float
    bytes: float
    intra: float
    small: bool = False
    overlaps: bool = False

    def seconds(self, cluster: Cluster) -> float:
        return self.intra / (cluster.intra_gbps * GB) + (self.bytes - self.intra) / (cluster.inter_gbps * GB)


def _collective(
    what: str,
    kind: str,
    group: Group,
    calls: float,
    per_call: float,
    gpn: int,
    small: bool = False,
    overlaps: bool = False,
) -> Collective | None:
    """A line for ``calls`` identical collectives of ``per_call`` bytes; None on a group of one rank."""
    if group.size <= 1 or calls <= 0:
        return None
    total = calls * per_call
    share = group.intra_fraction(gpn, all_to_all=kind == "all_to_all")
    return Collective(what, kind, group.name, group.size, calls, total, total * share, small, overlaps)


def ring_bytes(kind: str, n: float, g: int) -> float:
    """Bytes a rank sends for a collective of ``n`` bytes (all_reduce: the buffer; all_gather: the
    output; reduce_scatter: the input; broadcast: the buffer) on a group of ``g``."""
    factor = 2 if kind == "all_reduce" else 1
    return factor * (g - 1) / g * n


def communication(mc: ModelConfig, layout: Layout, w: Workload, cluster: Cluster, mode: str) -> list[Collective]:
    """Every collective of one optimizer step on one rank (see :mod:`diffmoe.parallel.plan`)."""
    items = _ddp_comm(mc, layout, w, cluster) if layout.mode == "ddp" else _fsdp_comm(mc, layout, w, cluster)
    items += _activation_comm(mc, layout, w, cluster, mode)
    items += _small_comm(mc, layout, w, cluster, mode)
    return [c for c in items if c is not None]


def _ddp_comm(mc: ModelConfig, layout: Layout, w: Workload, cluster: Cluster) -> list:
    world, gpn = groups(layout)["world"], cluster.gpus_per_node
    grad_bytes = 4 * sum(s.numel for s in model_params(mc))
    buckets = 1 + math.ceil(max(0, grad_bytes - DDP_FIRST_BUCKET_BYTES) / DDP_BUCKET_BYTES)
    rope = 2 * mc.max_seq_len * (mc.head_dim // 2) * 4  # cos and sin, float32
    items = [
        _collective(
            "gradient all-reduce, fp32, once per step (~25 MiB buckets)",
            "all_reduce",
            world,
            buckets,
            ring_bytes("all_reduce", grad_bytes, world.size) / buckets,
            gpn,
            overlaps=True,
        ),
        _collective(
            "DDP buffer broadcast (rotary cos/sin), syncing micro-batch",
            "broadcast",
            world,
            1,
            ring_bytes("broadcast", rope, world.size),
            gpn,
            small=True,
        ),
    ]
    if not all(ffn_facts(mc, kind).dense_gradients for kind in set(mc.kinds)):  # find_unused_parameters=True
        items.append(
            _collective(
                "DDP used-parameter map all-reduce",
                "all_reduce",
                world,
                1,
                ring_bytes("all_reduce", 4 * len(model_params(mc)), world.size),
                gpn,
                small=True,
            )
        )
    return items


def _fsdp_comm(mc: ModelConfig, layout: Layout, w: Workload, cluster: Cluster) -> list:
    """FSDP2 all-gathers, reduce-scatters and (HSDP) all-reduces of every unit, per step."""
    pr, A, gpn = Precision.of(layout, w), w.accum, cluster.gpus_per_node
    g = groups(layout)
    items = []
    for kind in ("root", "block", "experts"):
        units = [u for u in fsdp_units(mc, layout) if u.kind == kind]
        if not units:
            continue
        group, shards = units[0].group, sum(u.shard for u in units)
        gathers = 1 if kind == "root" else 2
        when = "forward" if kind == "root" else "forward + backward"
        n = len(units)
        items.append(
            _collective(
                f"{kind} all-gather ({when}), {w.param_dtype}",
                "all_gather",
                group,
                A * gathers * n,
                (group.size - 1) * shards * pr.compute / n,
                gpn,
                overlaps=True,
            )
        )
        items.append(
            _collective(
                f"{kind} gradient reduce-scatter, {w.reduce_dtype}",
                "reduce_scatter",
                group,
                A * n,
                (group.size - 1) * shards * pr.reduce / n,
                gpn,
                overlaps=True,
            )
        )
        items.append(
            _collective(
                f"{kind} gradient all-reduce over replicas (HSDP), {w.reduce_dtype}",
                "all_reduce",
                g["dp_replicate"],
                A * n,
                ring_bytes("all_reduce", shards * pr.reduce / n, layout.dp_replicate),
                gpn,
                overlaps=True,
            )
        )
    return items


def _activation_comm(mc: ModelConfig, layout: Layout, w: Workload, cluster: Cluster, mode: str) -> list:
    """EP all-to-alls and etp all-gathers / reduce-scatters of activations, per step."""
    if layout.expert_size <= 1:
        return []
    a, A, b, d, E, gpn = w.act_bytes, w.accum, w.tokens, mc.d_model, mc.moe.num_experts, cluster.gpus_per_node
    group = groups(layout)[layout.expert_dim]
    X, fwd = group.size, 2 if mode == "block" else 1  # forward passes per micro-batch
    items = []
    if layout.ep > 1:
        for kind in sorted(set(mc.kinds)):
            layers = sum(1 for i in range(mc.n_layers) if mc.layer_ffn(i) == kind)
            facts = ffn_facts(mc, kind)
            if facts.ffn != "dispatched":
                continue
            rows = facts.rows_per_token * b
            items.append(
                _collective(
                    f"ep count exchange ({kind})",
                    "all_to_all",
                    group,
                    A * layers * fwd,
                    (X - 1) / X * E * 8,
                    gpn,
                    small=True,
                )
            )
            items.append(
                _collective(
                    f"ep token all-to-all, dispatch + combine ({kind})",
                    "all_to_all",
                    group,
                    A * layers * (2 * fwd + 2),
                    (X - 1) / X * rows * d * a,
                    gpn,
                )
            )
    if layout.etp > 1:
        for kind in sorted({k for k in mc.kinds if ffn_facts(mc, k).ffn == "merged"}):
            layers = sum(1 for i in range(mc.n_layers) if mc.layer_ffn(i) == kind)
            T = ffn_facts(mc, kind).segment_tokens(w.seq_len)
            segments = w.micro_batch * math.ceil(w.seq_len / T)
            padded = segments * T  # the last segment of a sequence is padded to T tokens
            x_bytes, wt_bytes = (X - 1) * padded * d * a, (X - 1) * segments * E * 4
            items += [
                _collective(
                    "etp all-gather of segments (fwd) and dy (bwd)",
                    "all_gather",
                    group,
                    A * layers * (fwd + 1),
                    x_bytes,
                    gpn,
                ),
                _collective(
                    "etp reduce-scatter of the output (fwd) and dx (bwd)",
                    "reduce_scatter",
                    group,
                    A * layers * (fwd + 1),
                    x_bytes,
                    gpn,
                ),
                _collective(
                    "etp all-gather of routing weights (fwd)",
                    "all_gather",
                    group,
                    A * layers * fwd,
                    wt_bytes,
                    gpn,
                    small=True,
                ),
                _collective(
                    "etp reduce-scatter of d(routing weights) (bwd)",
                    "reduce_scatter",
                    group,
                    A * layers,
                    wt_bytes,
                    gpn,
                    small=True,
                ),
            ]
    return items


def _small_comm(mc: ModelConfig, layout: Layout, w: Workload, cluster: Cluster, mode: str) -> list:
    """Token count, loss sums, balance counts and gradient norm, per step."""
    g, gpn = groups(layout), cluster.gpus_per_node
    world = g["world"]
    fwd = 2 if mode == "block" else 1
    balance = sum(1 for i in range(mc.n_layers) if ffn_facts(mc, mc.layer_ffn(i)).global_counts)
    items = [
        _collective(
            "global token count", "all_reduce", world, 1, ring_bytes("all_reduce", 8, world.size), gpn, small=True
        ),
        _collective(
            "loss sums (logging)", "all_reduce", world, 1, ring_bytes("all_reduce", 16, world.size), gpn, small=True
        ),
        _collective(
            "balance-loss expert counts",
            "all_reduce",
            world,
            w.accum * balance * fwd,
            ring_bytes("all_reduce", 4 * mc.moe.num_experts, world.size),
            gpn,
            small=True,
        ),
    ]
    if layout.mode == "fsdp":
        norm_groups = [g["dp_shard"]]
        if layout.expert_size > 1:
            norm_groups += [g["efsdp"], g[layout.expert_dim]]
        for group in norm_groups:
            items.append(
                _collective(
                    f"gradient norm ({group.name})",
                    "all_reduce",
                    group,
                    1,
                    ring_bytes("all_reduce", 4, group.size),
                    gpn,
                    small=True,
                )
            )
    return items
