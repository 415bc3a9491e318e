"""``parallelize(model, plan)``: wrap a built model for the run's process layout; the model itself
never knows how it is distributed.

Order: shard experts across ranks (``ep`` / ``etp``), per-block activation checkpointing, then
``mode=fsdp``: ``torch.compile`` of each block, then FSDP2 (as torchtitan) — the experts of each MoE block
on the expert mesh, each block and the root on the dense mesh; ``mode=ddp``: DDP, then ``torch.compile``
of the DDP wrapper (PyTorch's order for DDP, whose optimizer splits the graph at its buckets).

One scaling rule for every layout: each rank's loss is its share of a global sum (LM: local token sum
over the global token count; auxiliary losses over the number of ranks), and every gradient reduction
is a plain sum (FSDP2 ``set_gradient_divide_factor(1.0)`` with ``set_force_sum_reduction_for_comms``,
which gloo needs; DDP through a summing comm hook), so no parallel dimension needs a correction factor.
"""

from __future__ import annotations

import types
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from .layout import Layout, Meshes, build_meshes


@dataclass(frozen=True)
class ParallelPlan:
    """How a model runs: the resolved layout, its meshes (None for one process under ddp), and the
    per-run options of ``train.parallel`` / ``train.compile``."""

    layout: Layout
    meshes: Meshes | None = None
    compile: bool = False
    activation_checkpointing: bool = False
    param_dtype: torch.dtype = torch.float32
    reduce_dtype: torch.dtype = torch.float32

    @classmethod
    def build(cls, pc, world: int, device_type: str, compile: bool = False, bf16: bool = False) -> "ParallelPlan":
        """From ``train.parallel`` (``pc``) for ``world`` ranks on ``device_type``; builds the meshes when
        the layout needs them (a process group must exist)."""
        layout = Layout.resolve(pc, world)
        meshes = build_meshes(layout, device_type) if layout.mode == "fsdp" else None
        param, reduce = (getattr(torch, name) for name in pc.dtypes(bf16))
        return cls(layout, meshes, compile, pc.activation_checkpointing == "block", param, reduce)

    @property
    def autocast(self) -> bool:
        """Whether the step should run under bf16 autocast itself (ddp); FSDP2 casts the parameters."""
        return self.layout.mode == "ddp"


def parallelize(model: nn.Module, plan: ParallelPlan, device: torch.device | str | None = None) -> nn.Module:
    """The module to call for training steps (``model`` keeps its parameters, as DTensors under fsdp).

    device: where the model runs (None: leave it where it is). Under ddp the whole model moves there
    first; under fsdp the model is sharded where it was built (the CPU) and FSDP2 / ``distribute_tensor``
    move each unit's tensors to the device as they shard them, so a device never holds more than one
    unit unsharded (the host holds the whole model until then).
    """
    if device is not None and plan.layout.mode == "ddp":
        model.to(device)
    wrapped = _parallelize(model, plan)
    if device is not None:
        model.to(device)  # anything no FSDP unit moved (a no-op when all were)
    return wrapped


def _parallelize(model: nn.Module, plan: ParallelPlan) -> nn.Module:
    if plan.layout.expert_size > 1:
        shard_experts(model, plan.meshes)
    if plan.activation_checkpointing:
        for block in model.blocks:
            block.forward = types.MethodType(_checkpointed_forward, block)
    if plan.layout.mode == "fsdp":
        if plan.compile:
            for block in model.blocks:
                block.compile()
        apply_fsdp(model, plan)
        return model
    wrapped = model
    if plan.layout.world > 1:
        dense = all(ffn.capabilities.dense_gradients for ffn in model.ffns())
        wrapped = DistributedDataParallel(model, find_unused_parameters=not dense)
        wrapped.register_comm_hook(None, _sum_allreduce)
    return torch.compile(wrapped) if plan.compile else wrapped


def shard_experts(model: nn.Module, meshes: Meshes) -> None:
    """Replace the experts of every MoE layer by their ep- or etp-sharded version (the layer's family
    says which it supports: ``expert_sharding``)."""
    kind = meshes.layout.expert_dim
    for _, layer in model.moe_layers():
        if layer.expert_sharding != kind:
            raise ValueError(f"layer {type(layer).__name__} cannot shard its experts with {kind}")
        if kind == "ep":
            from .expert_parallel import expert_parallel as shard
        else:
            from .expert_tensor_parallel import shard_experts_ffn as shard
        layer.experts = shard(layer.experts, meshes.expert_shard)


def apply_fsdp(model: nn.Module, plan: ParallelPlan) -> None:
    """FSDP2 per block (experts of MoE blocks first, on their own mesh when sharded across ranks; with a
    low-precision param_dtype, routers as their own float32 units, so routing sees float32 weights as
    under autocast), then the root; sum reductions everywhere."""
    meshes = plan.meshes
    mp = MixedPrecisionPolicy(param_dtype=plan.param_dtype, reduce_dtype=plan.reduce_dtype)
    sparse = not all(ffn.capabilities.dense_gradients for ffn in model.ffns())
    router_mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=plan.reduce_dtype)
    for block in model.blocks:
        experts = getattr(block.ffn, "experts", None)
        if experts is not None and plan.layout.expert_size > 1:
            fully_shard(experts, mesh=meshes.expert_fsdp, mp_policy=mp)
            for method in ("forward_merged", "merge"):
                register_fsdp_forward_method(experts, method)
        router = getattr(block.ffn, "router", None)
        if router is not None and plan.param_dtype != torch.float32:  # routers compute in float32 weights
            fully_shard(router, mesh=meshes.dense, mp_policy=router_mp)
        fully_shard(block, mesh=meshes.dense, mp_policy=mp)
    fully_shard(model, mesh=meshes.dense, mp_policy=mp)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
            if sparse:
                module.set_reduce_scatter_unused_params(True, recurse=False)


def _checkpointed_forward(self, *args):
    """A block's forward recomputed in backward (activation checkpointing, non-reentrant)."""
    return checkpoint(type(self).forward, self, *args, use_reentrant=False)


def _sum_allreduce(state, bucket):
    """DDP comm hook: sum the gradients over the ranks (DDP's default divides by the world size)."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def data_parallel(wrapped: nn.Module) -> DistributedDataParallel | None:
    """The DDP module inside a (possibly compiled) wrapped model, or None."""
    inner = getattr(wrapped, "_orig_mod", wrapped)
    return inner if isinstance(inner, DistributedDataParallel) else None


@contextmanager
def gradient_sync(wrapped: nn.Module, enabled: bool):
    """Forward and backward inside the block reduce gradients over the ranks only when ``enabled``:
    under DDP, gradient accumulation syncs on its last micro-batch alone (``no_sync`` for the others).
    FSDP2 reduce-scatters every micro-batch (keeping sharded gradients only)."""
    ddp = data_parallel(wrapped)
    with ddp.no_sync() if ddp is not None and not enabled else nullcontext():
        yield
