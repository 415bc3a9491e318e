"""``diffmoe plan``: an analytic model of per-GPU memory and per-step communication of the parallel
layouts a run config can use, and the layout it recommends. Nothing is built or allocated: parameter
shapes come from the :class:`~diffmoe.config.ModelConfig`, so a 7B config plans in milliseconds.

    plan = make_plan(load_config("configs/12-paper-0.3b-lory-32e.yaml"), Cluster(gpus=8, gpu_mem_gib=80))
    print(format_plan(plan))          # or plan.to_dict() for JSON

Layouts (:class:`~diffmoe.parallel.layout.Layout`, i.e. ``train.parallel``): ``ddp``; ``fsdp``
(dp_shard = N); ``hsdpRxS`` (R = nodes, S = GPUs per node; only when N spans nodes); for each of those
two shardings, ``+epE`` for E in the divisors > 1 of gcd(dp_shard, num_experts) when every MoE layer is
ep-capable (top-k, SparseMixer), or ``+etpT`` for T in {2, 4, 8} dividing dp_shard and the experts' d_ff
when every MoE layer is etp-capable (Lory); plus the config's own ``train.parallel`` when it is none of
these. ep/etp
ranks are data-parallel ranks too: every rank reads distinct data, dense parameters are FSDP-sharded
over all dp_shard ranks, experts are split over ep (whole experts) or etp (a d_ff slice of every
expert) and FSDP-sharded over efsdp = dp_shard / ep (or / etp).

Units: memory in bytes (shown in GiB = 2^30 bytes, the unit GPU memory sizes are quoted in; ``--gpu-mem
80`` is 80 GiB); communication in bytes (shown in GB = 1e9 bytes) with bandwidths in GB/s.

Batch. data.batch_size = sequences per optimizer step over all ranks; data.micro_batch_size = sequences
per forward on one rank (default batch_size / N); accumulation A = batch_size / (micro_batch_size * N).
Tokens per rank per micro-batch b = micro_batch_size * L, L = the dataset's context length when
data.path holds a prepared dataset, else model.max_seq_len (``--seq-len`` overrides both).

Dtypes. ``train.bf16``: activations bfloat16 (a = 2 bytes), else float32. FSDP: parameters all-gathered
and computed in param_dtype (default bf16 with train.bf16), gradients reduced in reduce_dtype (default
fp32), residual stream in param_dtype. DDP: fp32 parameters under bf16 autocast, so the residual stream
is fp32 and autocast keeps bf16 copies of the weights it casts.

Memory per GPU (bytes):

- parameters: fp32 master weights, the rank's FSDP2 shard (each tensor ``Shard(0)`` with dim 0 padded to
  a multiple of the group size: ceil(dim0 / G) rows, FSDP2's default placement — experts whose local
  dim 0 is smaller than efsdp are therefore padded, not split on dim 1); DDP: everything.
- gradients: fp32, the same shard; DDP: everything, plus DDP's gradient buckets (another fp32 copy:
  ``gradient_as_bucket_view=False``, the default) counted under ``other``.
- optimizer: AdamW, two fp32 moments per shard element (8 bytes).
- other = compute copies + transient + reserve:
  compute copies — FSDP: unsharded param_dtype copies of the root unit (never resharded after forward)
  and of 2 blocks (the one computing and the one prefetched), a block counting its experts unit;
  DDP with bf16: the bf16 copies autocast makes of every matrix it multiplies (attention, dense FFN,
  lm_head, token-choice experts; not the embedding, norms, routers, or Lory's experts, which merge in
  fp32), held for backward;
  transient — the largest of: the fp32 gradient of the logits (4·V per token), one MoE layer's backward
  workspace (Lory: fp32 accumulators of the expert gradients 12·E·f·d, their cast to param_dtype, merge
  buffers and dh13 for a chunk of min(E, segments) segments; token choice: the [k·b, f] gradients and
  the experts' param_dtype gradients), and FSDP2's unsharded gradient of one unit before its
  reduce-scatter (param_dtype + reduce_dtype); it is added to the activations as if at the peak, which
  slightly overestimates; reserve — a fixed amount (default 4 GiB) for the CUDA context, NCCL buffers
  and allocator fragmentation.
- activations, per token and layer (a = activation bytes, r = residual-stream bytes; scaled
  dot-product attention with a flash/efficient kernel: no L^2 term):
  norm = 4d (float32 input for the statistics) + 2·r·d (normalised and scaled outputs) (+ a·d when
  autocast casts an fp32 output to bf16); attention = norm + a·(3d + 2·d_kv) (q, k, v, the attention
  output and the wo input) + 4·heads (log-sum-exp); dense FFN = norm + 4·a·d_ff (h1, h3, silu(h1),
  their product); Lory = norm + 2·a·f (the kernel saves x and [h1|h3]) + (etp-1)·a·d (the segments
  gathered from the etp group); token choice with k assignments per token (top-k: k, SparseMixer: 2,
  expert choice: capacity factor) = norm + 4d (the router's float32 input) + 16·E (router logits and
  probabilities) + k·(2·a·d + 4·a·f) (gathered rows, h1, h3, silu, product, gated output) + k·a·d with
  ep (the rows received by the all-to-all); plus final norm and float32 logits 8·V per token (the
  logits and the cross-entropy's log-softmax, both fp32). With per-block checkpointing: each block's
  input r·d per layer, plus one block's full activations (the one being recomputed), plus final norm
  and logits.

Communication per rank per optimizer step (bytes a rank sends, ring algorithms: all_reduce
2(G-1)/G·n, all_gather (G-1)/G·output, reduce_scatter (G-1)/G·input, all_to_all the bytes bound for
other ranks, broadcast (G-1)/G·n; G the group's size; groups of one rank send nothing and FSDP2 issues no
collective on them). These are exactly what :class:`~diffmoe.parallel.comm_count.CommCounter` counts.

- DDP: gradients all-reduced once per step in fp32 (a plain sum; ``no_sync`` on the other
  micro-batches), in ≈25 MiB buckets; DDP broadcasts module buffers (rotary cos/sin) in the forward of
  that micro-batch; with ``find_unused_parameters`` (top-k and SparseMixer layers, whose gradients are
  sparse) an all-reduce of the used-map (4 bytes per parameter tensor).
- FSDP2: one unit per transformer block plus the root (embedding, final norm, lm_head); with ep/etp the
  experts of each MoE block are a unit on the efsdp mesh. Per micro-batch: each block and experts unit
  all-gathered in forward and again in backward (reshard after forward), the root once, in
  param_dtype; every unit reduce-scattered in reduce_dtype every micro-batch; HSDP adds an all-reduce of
  the reduce-scattered shard over the replicate group, every micro-batch. Activation checkpointing adds
  no all-gather (FSDP2 does not reshard in the recompute, so the recompute's all-gather replaces the
  pre-backward one; measured with CommCounter).
- EP, per ep MoE layer and micro-batch, uniform routing ((ep-1)/ep of the rows leave the rank): count
  exchange (all_to_all of E int64), dispatch and combine all-to-alls of k·b rows of d activations in
  forward, the same two in backward; with checkpointing the forward's three run again.
- etp (Lory), per layer and micro-batch: forward all-gather of the segments ((t-1)·b·d·a) and of the
  routing weights ((t-1)·S·E float32, S = segments per rank), reduce-scatter of the output
  ((t-1)·b·d·a); backward all-gather of dy, reduce-scatter of dx and of d(weights). About 4(t-1)·b·d·a,
  +50 % with checkpointing (the forward's three run again).
- Small, listed but negligible: the global token count (one float64 all-reduce per step), the loss
  sums (float64 x2 per step), balance-loss expert counts (E float32 all-reduced over the world per
  top-k/SparseMixer layer per forward, with moe.global_balance), and the gradient norm (a float32
  all-reduce per sharded mesh dimension of the gradients, FSDP only).

Time estimate: bytes inside a node at ``intra_gbps``, bytes crossing nodes at ``inter_gbps`` (per-GPU
bus bandwidths, NCCL's "busbw"), summed serially with no overlap with compute or each other: an upper
bound on exposed communication, good for ranking layouts. A ring collective whose group spans nodes is
charged at the inter-node bandwidth in full (its slowest link); an all-to-all is split by the share of
peers inside the node. Mesh placement: ranks are laid out (dp_replicate, efsdp, ep|etp) row-major with
consecutive ranks on a node, so ep/etp groups and dp_shard groups of at most gpus_per_node ranks stay
inside a node.

Recommendation: among the layouts that fit without activation checkpointing (else, with it), the one
with the least estimated communication time per step. Recomputation costs about a third of the
step's FLOPs, more than the communication differences between layouts that fit, so fitting without it
comes first.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..config import ConfigError, ModelConfig, RunConfig
from ..moe import FAMILIES, MoELayer
from .layout import Layout

GiB = 2 ** 30
GB = 1e9
MODES = ("none", "block")
"""Activation checkpointing modes: none, or per transformer block."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DDP_BUCKET_BYTES = 25 * 2 ** 20
DDP_FIRST_BUCKET_BYTES = 2 ** 20

DEFAULT_INTRA_GBPS = 150.0
"""Per-GPU bus bandwidth inside a node (GB/s): NVLink, as NCCL achieves on A100/H100 nodes."""
DEFAULT_INTER_GBPS = 25.0
"""Per-GPU bus bandwidth across nodes (GB/s): one 200 Gb/s InfiniBand NIC per GPU."""
DEFAULT_RESERVE_GIB = 4.0
"""CUDA context, NCCL buffers and allocator fragmentation (GiB), added to every layout."""


# ---------------------------------------------------------------------------------------------------
# inputs
@dataclass(frozen=True)
class Cluster:
    """The machines: ``gpus`` GPUs of ``gpu_mem_gib`` GiB, ``gpus_per_node`` per node, and the per-GPU
    bandwidths (GB/s) inside a node and across nodes."""

    gpus: int
    gpu_mem_gib: float
    gpus_per_node: int = 8
    intra_gbps: float = DEFAULT_INTRA_GBPS
    inter_gbps: float = DEFAULT_INTER_GBPS
    reserve_gib: float = DEFAULT_RESERVE_GIB

    def __post_init__(self) -> None:
        _positive_int("--gpus", self.gpus)
        _positive_int("--gpus-per-node", self.gpus_per_node)
        for flag, value in (("--gpu-mem", self.gpu_mem_gib), ("--intra-bw", self.intra_gbps),
                            ("--inter-bw", self.inter_gbps)):
            if not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"invalid {flag}={value!r}: must be a positive number")
        if not (isinstance(self.reserve_gib, (int, float)) and self.reserve_gib >= 0):
            raise ConfigError(f"invalid --reserve={self.reserve_gib!r}: must be a number >= 0")
        if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            raise ConfigError(f"invalid --gpus={self.gpus}: a multi-node job needs a multiple of "
                              f"--gpus-per-node={self.gpus_per_node}")


def _positive_int(flag: str, value) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ConfigError(f"invalid {flag}={value!r}: must be a positive integer")


@dataclass(frozen=True)
class Workload:
    """What one optimizer step processes and in which dtypes.

    seq_len L: tokens per sequence; global_batch: sequences per step (all ranks); micro_batch:
    sequences per forward on one rank; accum: micro-batches per step on each rank; bf16: activations in
    bfloat16; param_dtype / reduce_dtype: FSDP's compute and gradient-reduction dtypes.
    """

    seq_len: int
    global_batch: int
    micro_batch: int
    accum: int
    bf16: bool
    param_dtype: str = "float32"
    reduce_dtype: str = "float32"

    @property
    def tokens(self) -> int:
        """b: tokens per rank per micro-batch."""
        return self.micro_batch * self.seq_len

    @property
    def act_bytes(self) -> int:
        return 2 if self.bf16 else 4


def workload(cfg: RunConfig, gpus: int, seq_len: int | None = None, micro_batch: int | None = None) -> Workload:
    """The step of ``cfg`` on ``gpus`` ranks; errors (a batch that does not split) are ConfigErrors."""
    d, t = cfg.data, cfg.train
    L = seq_len or _dataset_context_len(d.path) or cfg.model.max_seq_len
    _positive_int("--seq-len", L)
    batch = d.batch_size
    micro = micro_batch or getattr(d, "micro_batch_size", None)
    if micro is None:
        if batch % gpus:
            raise ConfigError(f"invalid config: data.batch_size={batch}: must be divisible by the {gpus} GPUs "
                              "(or set data.micro_batch_size)")
        micro = batch // gpus
    if batch % (micro * gpus):
        raise ConfigError(f"invalid config: data.batch_size={batch}: must be a multiple of data.micro_batch_size "
                          f"x GPUs = {micro} x {gpus}")
    parallel = getattr(t, "parallel", None)
    param, reduce = parallel.dtypes(t.bf16) if parallel is not None else (
        "bfloat16" if t.bf16 else "float32", "float32")
    return Workload(L, batch, micro, batch // (micro * gpus), t.bf16, param, reduce)


def _dataset_context_len(path: str) -> int | None:
    """The context length of a prepared dataset at ``path`` (its manifest), or None."""
    try:
        return int(json.loads((Path(path) / "manifest.json").read_text(encoding="utf-8"))["context_len"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------------
# the model's parameters
@dataclass(frozen=True)
class ParamSpec:
    """One parameter tensor: its ``named_parameters`` name and shape, the block it belongs to (None:
    the root unit) and whether it is an expert stack (``w1``, ``w3``, ``w2`` of an MoE layer)."""

    name: str
    shape: tuple[int, ...]
    layer: int | None = None
    expert: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def ffn_class(kind: str) -> str:
    """``dense`` (SwiGLU), ``merged`` (experts merged per segment: Lory) or ``dispatched`` (tokens sent
    to experts: top-k, SparseMixer, expert choice)."""
    layer = FAMILIES[kind].layer
    if not issubclass(layer, MoELayer):
        return "dense"
    return "merged" if getattr(layer, "expert_sharding", None) == "etp" or kind == "lory" else "dispatched"


def expert_d_ff(mc: ModelConfig) -> int:
    return mc.moe.d_ff or mc.d_ff


def model_params(mc: ModelConfig) -> list[ParamSpec]:
    """Every parameter of ``Decoder(mc)``, by name and shape, without building it."""
    d, V, E, f = mc.d_model, mc.vocab_size, mc.moe.num_experts, expert_d_ff(mc)
    q, kv = mc.n_heads * mc.head_dim, mc.kv_heads * mc.head_dim
    specs = [ParamSpec("embed.weight", (V, d))]
    for i in range(mc.n_layers):
        p = f"blocks.{i}."
        specs += [ParamSpec(p + "attn_norm.weight", (d,), i), ParamSpec(p + "attn.wq.weight", (q, d), i),
                  ParamSpec(p + "attn.wk.weight", (kv, d), i), ParamSpec(p + "attn.wv.weight", (kv, d), i),
                  ParamSpec(p + "attn.wo.weight", (d, q), i), ParamSpec(p + "ffn_norm.weight", (d,), i)]
        if ffn_class(mc.layer_ffn(i)) == "dense":
            specs += [ParamSpec(p + "ffn.w1.weight", (mc.d_ff, d), i), ParamSpec(p + "ffn.w3.weight", (mc.d_ff, d), i),
                      ParamSpec(p + "ffn.w2.weight", (d, mc.d_ff), i)]
        else:
            specs += [ParamSpec(p + "ffn.router.weight", (E, d), i),
                      ParamSpec(p + "ffn.experts.w1", (E, f, d), i, True),
                      ParamSpec(p + "ffn.experts.w3", (E, f, d), i, True),
                      ParamSpec(p + "ffn.experts.w2", (E, d, f), i, True)]
    specs.append(ParamSpec("norm.weight", (d,)))
    if not mc.tie_embeddings:
        specs.append(ParamSpec("lm_head.weight", (V, d)))
    return specs


def expert_sharding(mc: ModelConfig) -> str | None:
    """``ep`` or ``etp`` when every MoE layer of the model can shard its experts that way, else None."""
    ways = {getattr(FAMILIES[k].layer, "expert_sharding", None) for k in mc.kinds if ffn_class(k) != "dense"}
    return ways.pop() if len(ways) == 1 else None


def assignments_per_token(kind: str, mc: ModelConfig) -> float:
    """k: expert rows per token of a dispatched layer (top-k: k; SparseMixer: 2; expert choice: its
    capacity factor)."""
    if kind == "topk":
        return mc.moe.topk.top_k
    if kind == "expert_choice":
        return mc.moe.expert_choice.capacity_factor
    return 2 if kind == "sparsemixer" else 1


# ---------------------------------------------------------------------------------------------------
# groups and FSDP units of a layout
@dataclass(frozen=True)
class Group:
    """A process group of the world mesh: ``size`` ranks ``stride`` apart (consecutive ranks on a node)."""

    name: str
    size: int
    stride: int = 1

    def intra_fraction(self, gpus_per_node: int, all_to_all: bool = False) -> float:
        """Share of this group's traffic that stays inside a node: 1 or 0 for ring collectives (a ring
        spanning nodes runs at the inter-node bandwidth), the share of peers on the node for all-to-all."""
        if self.size <= 1 or self.size * self.stride <= gpus_per_node:
            return 1.0
        if not all_to_all or self.stride >= gpus_per_node:
            return 0.0
        peers = min(self.size, gpus_per_node // self.stride)
        return (peers - 1) / (self.size - 1)


def groups(layout: Layout) -> dict[str, Group]:
    """The groups of ``layout``'s mesh (dp_replicate, efsdp, x), x = ep or etp, row-major."""
    N, X = layout.world, layout.expert_size
    if layout.mode == "ddp":
        return {"world": Group("world", N)}
    S, R = layout.dp_shard, layout.dp_replicate
    return {"world": Group("world", N), "dp_shard": Group("dp_shard", S), "dp_replicate": Group("dp_replicate", R, S),
            "efsdp": Group("efsdp", S // X, X), layout.expert_dim: Group(layout.expert_dim, X)}


def local_shape(spec: ParamSpec, layout: Layout) -> tuple[int, ...]:
    """The shape this rank's ep/etp group member holds before FSDP sharding (experts only)."""
    shape = list(spec.shape)
    if spec.expert and layout.ep > 1:
        shape[0] //= layout.ep
    if spec.expert and layout.etp > 1:
        shape[2 if spec.name.endswith("w2") else 1] //= layout.etp
    return tuple(shape)


def shard_numel(shape: tuple[int, ...], g: int) -> int:
    """Elements of one rank's FSDP2 shard: Shard(0), dim 0 padded to a multiple of ``g``."""
    return math.ceil(shape[0] / g) * math.prod(shape[1:])


@dataclass
class Unit:
    """One FSDP2 unit (DDP: the whole model as one "unit" of group size 1).

    kind: ``root``, ``block`` or ``experts``; group: the mesh group it is sharded over; numel: the
    elements it holds unsharded on this rank (after ep/etp); shard: the elements of this rank's padded
    shard; layer: the block index (None for the root).
    """

    name: str
    kind: str
    group: Group
    numel: int = 0
    shard: int = 0
    layer: int | None = None


def fsdp_units(mc: ModelConfig, layout: Layout) -> list[Unit]:
    """The FSDP2 units of ``layout``: root, one per block, and one experts unit per MoE block when
    ep/etp > 1 (on efsdp). For DDP, one unit holding everything (group of 1)."""
    if layout.mode == "ddp":
        unit = Unit("model", "model", Group("none", 1))
        for spec in model_params(mc):
            unit.numel += spec.numel
            unit.shard += spec.numel
        return [unit]
    g = groups(layout)
    units: dict[str, Unit] = {"root": Unit("root", "root", g["dp_shard"])}
    for spec in model_params(mc):
        if spec.layer is None:
            unit = units["root"]
        elif spec.expert and layout.expert_size > 1:
            name = f"blocks.{spec.layer}.ffn.experts"
            unit = units.setdefault(name, Unit(name, "experts", g["efsdp"], layer=spec.layer))
        else:
            name = f"blocks.{spec.layer}"
            unit = units.setdefault(name, Unit(name, "block", g["dp_shard"], layer=spec.layer))
        shape = local_shape(spec, layout)
        unit.numel += math.prod(shape)
        unit.shard += shard_numel(shape, unit.group.size)
    return list(units.values())


# ---------------------------------------------------------------------------------------------------
# memory
@dataclass(frozen=True)
class Precision:
    """Bytes per element: act (activations), resid (residual stream), compute (FSDP's unsharded
    parameters, or DDP's autocast weight copies; 0 when there are none), reduce (gradient reduction)."""

    act: int
    resid: int
    compute: int
    reduce: int

    @classmethod
    def of(cls, layout: Layout, w: Workload) -> "Precision":
        a = w.act_bytes
        if layout.mode == "ddp":
            return cls(a, 4, 2 if w.bf16 else 0, 4)
        p = DTYPE_BYTES[w.param_dtype]
        return cls(a, p, p, DTYPE_BYTES[w.reduce_dtype])


@dataclass
class Memory:
    """Bytes per GPU (see the module docstring): ``activations`` and ``transient`` per checkpointing mode."""

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
    kind = mc.layer_ffn(layer)
    ffn = _norm_bytes(d, pr)
    cls = ffn_class(kind)
    if cls == "dense":
        ffn += 4 * a * mc.d_ff
    elif cls == "merged":
        ffn += 2 * a * f + (layout.etp - 1) * a * d
    else:
        k = assignments_per_token(kind, mc)
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
    """The largest backward workspace of one MoE layer (see the module docstring)."""
    d, a, E, f = mc.d_model, pr.act, mc.moe.num_experts, expert_d_ff(mc)
    sharded_grads = pr.compute if layout.mode == "fsdp" else 0  # DDP accumulates straight into fp32 .grad
    best = 0
    for kind in set(mc.kinds):
        cls = ffn_class(kind)
        if cls == "merged":
            t = layout.etp
            f_loc, T = f // t, mc.moe.lory.segment_len
            segments = t * w.micro_batch * math.ceil(w.seq_len / T)
            chunk = min(E, segments)
            stack = 3 * E * f_loc * d
            ws = stack * (4 + sharded_grads) + a * 3 * chunk * f_loc * d + a * chunk * T * 2 * f_loc
        elif cls == "dispatched":
            k = assignments_per_token(kind, mc)
            local_experts = E // layout.ep
            ws = k * w.tokens * (4 * a * f + 2 * a * d) + 3 * local_experts * f * d * sharded_grads
        else:
            continue
        best = max(best, int(ws))
    return best


def ddp_cast_numel(mc: ModelConfig) -> int:
    """Elements autocast copies to bf16 under DDP (matrices fed to matmuls; not the embedding, norms,
    routers, or Lory's experts, which merge in their own dtype)."""
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
    return Memory(params=4 * shard, grads=4 * shard, optimizer=8 * shard, copies=copies, buffers=buckets,
                  reserve=int(cluster.reserve_gib * GiB), transient={m: transient for m in MODES},
                  activations={m: activation_bytes(mc, layout, w, pr, m) for m in MODES})


def _block_numels(units: list[Unit]) -> dict[int, int]:
    """Unsharded elements per block, its experts unit included."""
    out: dict[int, int] = {}
    for u in units:
        if u.layer is not None:
            out[u.layer] = out.get(u.layer, 0) + u.numel
    return out


# ---------------------------------------------------------------------------------------------------
# communication
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
        return (self.intra / (cluster.intra_gbps * GB)
                + (self.bytes - self.intra) / (cluster.inter_gbps * GB))


def _collective(what: str, kind: str, group: Group, calls: float, per_call: float, gpn: int,
                small: bool = False, overlaps: bool = False) -> Collective | None:
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
    """Every collective of one optimizer step on one rank (see the module docstring)."""
    items = _ddp_comm(mc, layout, w, cluster) if layout.mode == "ddp" else _fsdp_comm(mc, layout, w, cluster)
    items += _activation_comm(mc, layout, w, cluster, mode)
    items += _small_comm(mc, layout, w, cluster, mode)
    return [c for c in items if c is not None]


def _ddp_comm(mc: ModelConfig, layout: Layout, w: Workload, cluster: Cluster) -> list:
    world, gpn = groups(layout)["world"], cluster.gpus_per_node
    grad_bytes = 4 * sum(s.numel for s in model_params(mc))
    buckets = 1 + math.ceil(max(0, grad_bytes - DDP_FIRST_BUCKET_BYTES) / DDP_BUCKET_BYTES)
    rope = 2 * mc.max_seq_len * (mc.head_dim // 2) * 4  # cos and sin, float32
    items = [_collective("gradient all-reduce, fp32, once per step (~25 MiB buckets)", "all_reduce", world, buckets,
                         ring_bytes("all_reduce", grad_bytes, world.size) / buckets, gpn, overlaps=True),
             _collective("DDP buffer broadcast (rotary cos/sin), syncing micro-batch", "broadcast", world, 1,
                         ring_bytes("broadcast", rope, world.size), gpn, small=True)]
    if {"topk", "sparsemixer"} & set(mc.kinds):  # sparse gradients: find_unused_parameters=True
        items.append(_collective("DDP used-parameter map all-reduce", "all_reduce", world, 1,
                                 ring_bytes("all_reduce", 4 * len(model_params(mc)), world.size), gpn, small=True))
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
        items.append(_collective(f"{kind} all-gather ({when}), {w.param_dtype}", "all_gather", group, A * gathers * n,
                                 (group.size - 1) * shards * pr.compute / n, gpn, overlaps=True))
        items.append(_collective(f"{kind} gradient reduce-scatter, {w.reduce_dtype}", "reduce_scatter", group, A * n,
                                 (group.size - 1) * shards * pr.reduce / n, gpn, overlaps=True))
        items.append(_collective(f"{kind} gradient all-reduce over replicas (HSDP), {w.reduce_dtype}", "all_reduce",
                                 g["dp_replicate"], A * n,
                                 ring_bytes("all_reduce", shards * pr.reduce / n, layout.dp_replicate), gpn,
                                 overlaps=True))
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
            if ffn_class(kind) != "dispatched":
                continue
            rows = assignments_per_token(kind, mc) * b
            items.append(_collective(f"ep count exchange ({kind})", "all_to_all", group, A * layers * fwd,
                                     (X - 1) / X * E * 8, gpn, small=True))
            items.append(_collective(f"ep token all-to-all, dispatch + combine ({kind})", "all_to_all", group,
                                     A * layers * (2 * fwd + 2), (X - 1) / X * rows * d * a, gpn))
    if layout.etp > 1:
        layers = sum(1 for i in range(mc.n_layers) if ffn_class(mc.layer_ffn(i)) == "merged")
        segments = w.micro_batch * math.ceil(w.seq_len / mc.moe.lory.segment_len)
        padded = segments * mc.moe.lory.segment_len  # the last segment of a sequence is padded to T tokens
        x_bytes, wt_bytes = (X - 1) * padded * d * a, (X - 1) * segments * E * 4
        items += [
            _collective("etp all-gather of segments (fwd) and dy (bwd)", "all_gather", group, A * layers * (fwd + 1),
                        x_bytes, gpn),
            _collective("etp reduce-scatter of the output (fwd) and dx (bwd)", "reduce_scatter", group,
                        A * layers * (fwd + 1), x_bytes, gpn),
            _collective("etp all-gather of routing weights (fwd)", "all_gather", group, A * layers * fwd, wt_bytes, gpn,
                        small=True),
            _collective("etp reduce-scatter of d(routing weights) (bwd)", "reduce_scatter", group, A * layers, wt_bytes,
                        gpn, small=True)]
    return items


def _small_comm(mc: ModelConfig, layout: Layout, w: Workload, cluster: Cluster, mode: str) -> list:
    """Token count, loss sums, balance counts and gradient norm, per step."""
    g, gpn = groups(layout), cluster.gpus_per_node
    world = g["world"]
    fwd = 2 if mode == "block" else 1
    balance = sum(1 for i in range(mc.n_layers) if mc.layer_ffn(i) in ("topk", "sparsemixer")) \
        if mc.moe.global_balance else 0
    items = [_collective("global token count", "all_reduce", world, 1, ring_bytes("all_reduce", 8, world.size), gpn,
                         small=True),
             _collective("loss sums (logging)", "all_reduce", world, 1, ring_bytes("all_reduce", 16, world.size), gpn,
                         small=True),
             _collective("balance-loss expert counts", "all_reduce", world, w.accum * balance * fwd,
                         ring_bytes("all_reduce", 4 * mc.moe.num_experts, world.size), gpn, small=True)]
    if layout.mode == "fsdp":
        norm_groups = [g["dp_shard"]]
        if layout.expert_size > 1:
            norm_groups += [g["efsdp"], g[layout.expert_dim]]
        for group in norm_groups:
            items.append(_collective(f"gradient norm ({group.name})", "all_reduce", group, 1,
                                     ring_bytes("all_reduce", 4, group.size), gpn, small=True))
    return items


# ---------------------------------------------------------------------------------------------------
# the plan
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
        return {"config": self.config, "cluster": asdict(self.cluster), "workload": asdict(self.workload),
                "params": self.params, "expert_params": self.expert_params,
                "recommended": self.recommended, "recommended_mode": self.recommended_mode, "reason": self.reason,
                "notes": self.notes, "layouts": [self._layout_dict(lp) for lp in self.layouts]}

    def _layout_dict(self, lp: LayoutPlan) -> dict:
        m = lp.memory
        out = {"name": lp.name, "configured": lp.configured,
               "layout": {k: getattr(lp.layout, k) for k in ("world", "mode", "dp_replicate", "dp_shard", "ep", "etp")},
               "memory_bytes": {"params": m.params, "grads": m.grads, "optimizer": m.optimizer, "copies": m.copies,
                                "ddp_buckets": m.buffers, "reserve": m.reserve},
               "modes": {}}
        for mode in MODES:
            intra, inter = lp.comm_bytes(mode)
            out["modes"][mode] = {
                "activations_bytes": m.activations[mode], "transient_bytes": m.transient[mode],
                "total_bytes": m.total(mode), "fits": lp.fits[mode], "max_micro_batch": lp.max_micro_batch[mode],
                "comm_intra_bytes": intra, "comm_inter_bytes": inter,
                "comm_seconds": lp.comm_seconds(mode, self.cluster),
                "blocking_seconds": lp.blocking_seconds(mode, self.cluster),
                "collectives": [asdict(c) for c in lp.comm[mode]]}
        return out


def candidate_layouts(mc: ModelConfig, cluster: Cluster) -> list[Layout]:
    """ddp; fsdp; hsdp (nodes x GPUs per node) when the job spans nodes; each sharding with ep or etp as
    the model's MoE layers allow (see the module docstring)."""
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
    return Plan(config_name, cluster, w, sum(s.numel for s in specs), sum(s.numel for s in specs if s.expert),
                plans, name, mode, reason, notes)


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
    advice = (f"set data.micro_batch_size={hint} (with activation checkpointing)" if hint else
              "use more or larger GPUs")
    return None, None, (f"no layout fits in {limit:g} GiB; the smallest is {smallest.name} with checkpointing at "
                        f"{smallest.memory.total('block') / GiB:.1f} GiB: {advice}")


def _reason(best: LayoutPlan, mode: str, fitting: list[LayoutPlan], tied: list[LayoutPlan], cluster: Cluster) -> str:
    how = "without activation checkpointing" if mode == "none" else \
        "only with per-block activation checkpointing (no layout fits without it)"
    t, blocking = best.comm_seconds(mode, cluster), best.blocking_seconds(mode, cluster)
    why = f"{best.name} fits {how} ({best.memory.total(mode) / GiB:.1f} of {cluster.gpu_mem_gib:g} GiB)"
    if len(fitting) == 1:
        return why + f"; it is the only layout that does ({t:.2f} s of communication per step)"
    others = ", ".join(f"{lp.name} {lp.comm_seconds(mode, cluster):.2f} s" for lp in fitting if lp is not best)
    if len(tied) > 1:
        return why + (f"; its estimated communication, {t:.2f} s per step, is within {NEAR_TIE:.0%} of the least "
                      f"and it has the least that cannot overlap computation ({blocking:.2f} s); others: {others}")
    return why + f" and has the least estimated communication: {t:.2f} s per step ({others})"


# ---------------------------------------------------------------------------------------------------
# text output
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
        lines.append(f"recommended: {plan.recommended}"
                     f"{', activation_checkpointing=block' if plan.recommended_mode == 'block' else ''}")
    else:
        lines.append("recommended: none")
    lines.append(f"why: {plan.reason}")
    lines += ["", "fits: yes (without checkpointing), ckpt (only with it), no; max_mb: largest micro-batch per GPU "
              "that fits in that mode; intra/inter: GB sent inside / across nodes, time_s: their estimated time, "
              "block_s: the part that cannot overlap compute, all in that mode; * = the config's train.parallel"]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _row(lp: LayoutPlan, c: Cluster) -> str:
    m, mode = lp.memory, lp.mode
    fit = "yes" if lp.fits["none"] else "ckpt" if lp.fits["block"] else "no"
    intra, inter = lp.comm_bytes(mode)
    mb = lp.max_micro_batch[mode]
    name = lp.name + ("*" if lp.configured else "")
    gib = [x / GiB for x in (m.params, m.grads, m.optimizer, m.other(mode), m.activations["none"],
                             m.activations["block"], m.total("none"), m.total("block"))]
    return (f"{name:<14}" + "".join(f"{x:>7.1f}" for x in gib) + f"  {fit:<5}{mb if mb else '-':>7}"
            f"{intra / GB:>9.1f}{inter / GB:>8.1f}{lp.comm_seconds(mode, c):>8.2f}"
            f"{lp.blocking_seconds(mode, c):>8.2f}")


def plan_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), indent=1)
