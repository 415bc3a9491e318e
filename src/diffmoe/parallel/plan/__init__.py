"""``diffmoe plan``: an analytic model of per-GPU memory and per-step communication of the parallel
layouts a run config can use, and the layout it recommends. Nothing is built or allocated: parameter
shapes come from the :class:`~diffmoe.config.ModelConfig`, so a 7B config plans in milliseconds.

    plan = make_plan(load_config("run.yaml"), Cluster(gpus=8, gpu_mem_gib=80))
    print(format_plan(plan))          # or plan.to_dict() for JSON

Layouts (:class:`~diffmoe.parallel.layout.Layout`, i.e. ``train.parallel``): ``ddp``; ``fsdp``
(dp_shard = N); ``hsdpRxS`` (R = nodes, S = GPUs per node; only when N spans nodes); for each of those
two shardings, ``+epE`` for E in the divisors > 1 of gcd(dp_shard, num_experts) when every MoE layer is
ep-capable, or ``+etpT`` for T in {2, 4, 8} dividing dp_shard and the experts' d_ff when every MoE layer
is etp-capable (the layer class's ``expert_sharding``); plus the config's own ``train.parallel`` when it
is none of these. ep/etp ranks are data-parallel ranks too: every rank reads distinct data, dense
parameters are FSDP-sharded over all dp_shard ranks, experts are split over ep (whole experts) or etp
(a d_ff slice of every expert) and FSDP-sharded over efsdp = dp_shard / ep (or / etp).

Layers. The plan never names a routing family: it reads what each FFN kind's layer declares
(:func:`~diffmoe.parallel.plan.model.ffn_facts`), so a newly registered family is planned as it is. A
layer is dense (not an :class:`~diffmoe.moe.base.MoELayer`), merged (``merges_experts``: each routing
segment of T = ``capabilities.segment_len`` tokens runs one expert merged from all E) or dispatched
(tokens sent to experts, k = ``experts_per_token`` rows per token: top-k routing's k, or a capacity
factor); ``expert_sharding`` says whether it can use ep or etp, ``capabilities.dense_gradients`` whether
DDP must find unused parameters, ``capabilities.global_counts`` whether its balance counts are
all-reduced.

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
  lm_head, dispatched experts; not the embedding, norms, routers, or merged experts, which merge in
  fp32), held for backward;
  transient — the largest of: the fp32 gradient of the logits (4·V per token), one MoE layer's backward
  workspace (merged: fp32 accumulators of the expert gradients 12·E·f·d, their cast to param_dtype,
  merge buffers and dh13 for a chunk of min(E, segments) segments; dispatched: the [k·b, f] gradients
  and the experts' param_dtype gradients), and FSDP2's unsharded gradient of one unit before its
  reduce-scatter (param_dtype + reduce_dtype); it is added to the activations as if at the peak, which
  slightly overestimates; reserve — a fixed amount (default 4 GiB) for the CUDA context, NCCL buffers
  and allocator fragmentation.
- activations, per token and layer (a = activation bytes, r = residual-stream bytes; scaled
  dot-product attention with a flash/efficient kernel: no L^2 term):
  norm = 4d (float32 input for the statistics) + 2·r·d (normalised and scaled outputs) (+ a·d when
  autocast casts an fp32 output to bf16); attention = norm + a·(3d + 2·d_kv) (q, k, v, the attention
  output and the wo input) + 4·heads (log-sum-exp); dense FFN = norm + 4·a·d_ff (h1, h3, silu(h1),
  their product); merged experts = norm + 2·a·f (the kernel saves x and [h1|h3]) + (etp-1)·a·d (the
  segments gathered from the etp group); dispatched experts with k rows per token = norm + 4d (the
  router's float32 input) + 16·E (router logits and probabilities) + k·(2·a·d + 4·a·f) (gathered rows,
  h1, h3, silu, product, gated output) + k·a·d with ep (the rows received by the all-to-all); plus final
  norm and float32 logits 8·V per token (the logits and the cross-entropy's log-softmax, both fp32).
  With per-block checkpointing: each block's input r·d per layer, plus one block's full activations
  (the one being recomputed), plus final norm and logits.

Communication per rank per optimizer step (bytes a rank sends, ring algorithms: all_reduce
2(G-1)/G·n, all_gather (G-1)/G·output, reduce_scatter (G-1)/G·input, all_to_all the bytes bound for
other ranks, broadcast (G-1)/G·n; G the group's size; groups of one rank send nothing and FSDP2 issues no
collective on them). These are exactly what :class:`~diffmoe.parallel.comm_count.CommCounter` counts.

- DDP: gradients all-reduced once per step in fp32 (a plain sum; ``no_sync`` on the other
  micro-batches), in ≈25 MiB buckets; DDP broadcasts module buffers (rotary cos/sin) in the forward of
  that micro-batch; with ``find_unused_parameters`` (a layer whose gradients are sparse: no
  ``capabilities.dense_gradients``) an all-reduce of the used-map (4 bytes per parameter tensor).
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
- etp (merged experts), per layer and micro-batch: forward all-gather of the segments ((t-1)·b·d·a)
  and of the routing weights ((t-1)·S·E float32, S = segments per rank), reduce-scatter of the output
  ((t-1)·b·d·a); backward all-gather of dy, reduce-scatter of dx and of d(weights). About 4(t-1)·b·d·a,
  +50 % with checkpointing (the forward's three run again).
- Small, listed but negligible: the global token count (one float64 all-reduce per step), the loss
  sums (float64 x2 per step), balance-loss expert counts (E float32 all-reduced over the world per
  forward of each layer with ``capabilities.global_counts``: moe.global_balance), and the gradient
  norm (a float32 all-reduce per sharded mesh dimension of the gradients, FSDP only).

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

Modules: :mod:`.inputs` (cluster, workload, bytes per element), :mod:`.model` (parameter shapes, what
each FFN kind declares), :mod:`.units` (process groups, FSDP2 units), :mod:`.memory`, :mod:`.comm`,
:mod:`.planner` (candidate layouts, fit, recommendation), :mod:`.report` (text and JSON).
"""

from .comm import DDP_BUCKET_BYTES, DDP_FIRST_BUCKET_BYTES, Collective, communication, ring_bytes
from .inputs import (
    DEFAULT_INTER_GBPS,
    DEFAULT_INTRA_GBPS,
    DEFAULT_RESERVE_GIB,
    DTYPE_BYTES,
    GB,
    MODES,
    Cluster,
    GiB,
    Precision,
    Workload,
    workload,
)
from .memory import Memory, activation_bytes, ddp_cast_numel, layer_activation_bytes, memory, moe_workspace_bytes
from .model import FFNFacts, ParamSpec, expert_d_ff, expert_sharding, ffn_class, ffn_facts, model_params
from .planner import (
    NEAR_TIE,
    LayoutPlan,
    Plan,
    candidate_layouts,
    layout_name,
    make_plan,
    max_micro_batch,
    plan_layout,
    recommend,
)
from .report import format_plan, plan_json
from .units import Group, Unit, fsdp_units, groups, local_shape, shard_numel

__all__ = [
    "DDP_BUCKET_BYTES",
    "DDP_FIRST_BUCKET_BYTES",
    "DEFAULT_INTER_GBPS",
    "DEFAULT_INTRA_GBPS",
    "DEFAULT_RESERVE_GIB",
    "DTYPE_BYTES",
    "GB",
    "MODES",
    "NEAR_TIE",
    "Cluster",
    "Collective",
    "FFNFacts",
    "GiB",
    "Group",
    "LayoutPlan",
    "Memory",
    "ParamSpec",
    "Plan",
    "Precision",
    "Unit",
    "Workload",
    "activation_bytes",
    "candidate_layouts",
    "communication",
    "ddp_cast_numel",
    "expert_d_ff",
    "expert_sharding",
    "ffn_class",
    "ffn_facts",
    "format_plan",
    "fsdp_units",
    "groups",
    "layer_activation_bytes",
    "layout_name",
    "local_shape",
    "make_plan",
    "max_micro_batch",
    "memory",
    "model_params",
    "moe_workspace_bytes",
    "plan_json",
    "plan_layout",
    "recommend",
    "ring_bytes",
    "shard_numel",
    "workload",
]
