"""Per-GPU memory of a layout (bytes): the FSDP2 shard of parameters, gradients and AdamW moments,
compute copies, the transient backward peak, saved activations, and the reserve."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...config import ModelConfig
from ..layout import Layout
from .inputs import MODES, Cluster, GiB, Precision, Workload
from .model import expert_d_ff, ffn_class, ffn_facts, model_params
from .units import Unit, fsdp_units


@dataclass
class Memory:
    """Bytes per GPU (see :mod:`diffmoe.parallel.plan`): ``activations`` and ``transient`` per checkpointing mode."""

    params: int
    grads: int
    optimizer: int
    copies: int
    buffers: int
    reserve: int
    transient: dict[str, int]
    activations: dict[str, int]

    def other(self, mode: str) -> int:
        """Compute copies, DDP buckets, transient peak and reserve."""
        return self.copies + self.buffers + self.transient[mode] + self.reserve

    def total(self, mode: str) -> int:
        return self.params + self.grads + self.optimizer + self.other(mode) + self.activations[mode]


def _norm_bytes(d: int, pr: Precision) -> int:
    """Per token: float32 statistics input, normalised and scaled outputs (+ an autocast cast)."""
    return 4 * d + 2 * pr.resid * d + (pr.act * d if pr.resid != pr.act else 0)


def layer_activation_bytes(mc: ModelConfig, layer: int, layout: Layout, pr: Precision) -> float:
    """Bytes one token leaves saved for backward in block ``layer`` (attention + FFN)."""
    d, a, f = mc.d_model, pr.act, expert_d_ff(mc)
    attention = _norm_bytes(d, pr) + a * (3 * d + 2 * mc.kv_heads * mc.head_dim) + 4 * mc.n_heads
    facts = ffn_facts(mc, mc.layer_ffn(layer))
    ffn = _norm_bytes(d, pr)
    if facts.ffn == "dense":
        ffn += 4 * a * mc.d_ff
    elif facts.ffn == "merged":
        ffn += 2 * a * f + (layout.etp - 1) * a * d
    else:
        k = facts.rows_per_token
        ffn += 4 * d + 16 * mc.moe.num_experts + k * (2 * a * d + 4 * a * f) + (k * a * d if layout.ep > 1 else 0)
    return attention + ffn


def activation_bytes(mc: ModelConfig, layout: Layout, w: Workload, pr: Precision, mode: str) -> int:
    """Saved activations per GPU for one micro-batch, without (``none``) or with (``block``) per-block
    checkpointing."""
    per_layer = [layer_activation_bytes(mc, i, layout, pr) for i in range(mc.n_layers)]
    head = _norm_bytes(mc.d_model, pr) + 8 * mc.vocab_size
    if mode == "none":
        per_token = sum(per_layer) + head
    else:
        per_token = mc.n_layers * pr.resid * mc.d_model + max(per_layer) + head
    return int(w.tokens * per_token)


def moe_workspace_bytes(mc: ModelConfig, layout: Layout, w: Workload, pr: Precision) -> int:
    """The largest backward workspace of one MoE layer (see :mod:`diffmoe.parallel.plan`)."""
    d, a, E, f = mc.d_model, pr.act, mc.moe.num_experts, expert_d_ff(mc)
    sharded_grads = pr.compute if layout.mode == "fsdp" else 0  # DDP accumulates straight into fp32 .grad
    best = 0
    for kind in set(mc.kinds):
        facts = ffn_facts(mc, kind)
        if facts.ffn == "merged":
            t = layout.etp
            f_loc, T = f // t, facts.segment_tokens(w.seq_len)
            segments = t * w.micro_batch * math.ceil(w.seq_len / T)
            chunk = min(E, segments)
            stack = 3 * E * f_loc * d
            ws = stack * (4 + sharded_grads) + a * 3 * chunk * f_loc * d + a * chunk * T * 2 * f_loc
        elif facts.ffn == "dispatched":
            k = facts.rows_per_token
            local_experts = E // layout.ep
            ws = k * w.tokens * (4 * a * f + 2 * a * d) + 3 * local_experts * f * d * sharded_grads
        else:
            continue
        best = max(best, int(ws))
    return best


def ddp_cast_numel(mc: ModelConfig) -> int:
    """Elements autocast copies to bf16 under DDP (matrices fed to matmuls; not the embedding, norms,
    routers, or merged experts, which merge in their own dtype)."""
    total = 0
    for spec in model_params(mc):
        if len(spec.shape) < 2 or spec.name == "embed.weight" or ".router." in spec.name:
            continue
        if spec.expert and ffn_class(mc.layer_ffn(spec.layer)) == "merged":
            continue
        total += spec.numel
    if mc.tie_embeddings:
        total += mc.vocab_size * mc.d_model  # lm_head uses the embedding matrix
    return total


def memory(mc: ModelConfig, layout: Layout, w: Workload, cluster: Cluster) -> Memory:
    """Per-GPU memory of ``layout`` for workload ``w`` (bytes)."""
    pr = Precision.of(layout, w)
    units = fsdp_units(mc, layout)
    shard = sum(u.shard for u in units)
    if layout.mode == "ddp":
        copies, buckets, staging = pr.compute * ddp_cast_numel(mc), 4 * shard, 0
    else:
        blocks = _block_numels(units)
        root = sum(u.numel for u in units if u.kind == "root")
        copies = pr.compute * (root + 2 * max(blocks.values(), default=0))
        buckets = 0
        staging = (pr.compute + pr.reduce) * max((u.numel for u in units), default=0)
    logits_grad = 4 * mc.vocab_size * w.tokens
    transient = max(logits_grad, moe_workspace_bytes(mc, layout, w, pr), staging)
    return Memory(
        params=4 * shard,
        grads=4 * shard,
        optimizer=8 * shard,
        copies=copies,
        buffers=buckets,
        reserve=int(cluster.reserve_gib * GiB),
        transient={m: transient for m in MODES},
        activations={m: activation_bytes(mc, layout, w, pr, m) for m in MODES},
    )


def _block_numels(units: list[Unit]) -> dict[int, int]:
    """Unsharded elements per block, its experts unit included."""
    out: dict[int, int] = {}
    for u in units:
        if u.layer is not None:
            out[u.layer] = out.get(u.layer, 0) + u.numel
    return out
