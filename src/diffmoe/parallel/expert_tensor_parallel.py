"""Sharded merged experts (arXiv 2405.03133, section 6): expert tensor parallelism, ``etp``, for layers
that merge experts per segment (``merges_experts``, ``expert_sharding == "etp"``).

In a group of t ranks (a 1-D ``etp_mesh``), every rank holds the same d_ff slice of **every** expert:

    w1, w3: [E, d_ff, d]  Shard(1)  -> local [E, d_ff/t, d]
    w2:     [E, d, d_ff]  Shard(2)  -> local [E, d, d_ff/t]

A merged SwiGLU splits along d_ff like a dense one: the slice computes w2_f @ (silu(w1_f x) * (w3_f x))
for its part f of the hidden units, and the output is the sum of the t slices' outputs. So per layer
only activations and routing weights move, never expert weights:

- forward: all-gather the segments x [S, T, d] and their routing weights [S, E] of the t ranks along
  dim 0; run the local kernel (:class:`~diffmoe.moe.merge.SegmentMergedSwiGLU` on the local slice)
  on all t*S segments, which gives a partial sum of the output; reduce-scatter it, so each rank gets
  the full output of its own S segments;
- backward: all-gather dy; reduce-scatter (sum) dx and d(weights). The d(weights) reduction is needed
  because d(weights)[s, i] = <W_i, dW_merged[s]> sums over the sharded d_ff dimension. Expert-slice
  gradients need no reduction inside the group: each rank's slice saw every segment of the group.

Loss convention: every rank's loss is its share of a global sum and gradient reductions are plain
sums (FSDP2: ``set_gradient_divide_factor(1.0)``); gradients then equal those of one process on the
summed loss, with no correction factor.

Communication per layer per rank and step, for b tokens per rank (S*T = b), width d and ``bytes``
per activation element. Each of the four activation collectives (x, y forward; dy, dx backward)
moves (t-1)*b*d elements into or out of a rank, so activations cost about 4(t-1)*b*d*bytes, +50 %
with activation recompute (the forward's two collectives run again in backward); the routing
weights (S*E per rank) are negligible. Plain FSDP2 over the expert stack (3*E*d_ff*d elements,
resharded after forward: two all-gathers and one reduce-scatter) moves about 9*E*d_ff*d elements.
Sharding d_ff therefore beats plain FSDP2 when

    (t-1) * b < 9/4 * E * d_ff        (3/2 * E * d_ff with recompute)

about 203k tokens for the paper's 0.3B/32E (d 1024, d_ff 2816; docs/scaling.md).
The paper's world-wide t loses at that scale (203 GB per rank and step against 39 GB, 64 ranks of
16k tokens); a 2-D mesh, t = 4..8 ranks inside a node and FSDP2 over ``efsdp`` across nodes, wins
(t=4 x FSDP2/16: 19 GB).

Composition with FSDP2: ``fully_shard(experts, mesh=mesh["efsdp"])`` with
``set_gradient_divide_factor(1.0)``, ``set_force_sum_reduction_for_comms(True)`` (required on gloo) and
``register_fsdp_forward_method`` for ``forward_merged`` and ``merge``, which are not ``forward``.
Token-choice families (dispatched tokens) use expert parallelism (ep) instead.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from ..moe.experts import Experts
from ..moe.merge import Merged, SegmentMergedSwiGLU, merge_stacks
from ..runtime import compute_dtype
from .layout import ShardingError

SHARD_DIMS = {"w1": 1, "w3": 1, "w2": 2}
"""Parameter name -> its d_ff dimension, the one sharded over etp."""

# differentiable collectives (backward: reduce-scatter resp. all-gather); renamed in torch 2.13
_all_gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
_reduce_scatter = getattr(funcol, "reduce_scatter_single_autograd", None) or funcol.reduce_scatter_tensor_autograd


class ShardedFFNExperts(Experts):
    """:class:`Experts` whose stacks are d_ff-sharded DTensors on a 1-D ``etp_mesh`` (see module docstring).

    Parameter names (state_dict keys) and ``num_experts``, ``d_model``, ``d_ff`` are those of the
    unsharded module; each parameter is a DTensor, w1/w3 ``Shard(1)`` and w2 ``Shard(2)``.
    Build one with :func:`shard_experts_ffn`.
    """

    def __init__(self, experts: Experts, etp_mesh: DeviceMesh):
        """Shard ``experts``' values (identical on every rank of ``etp_mesh``) over ``etp_mesh``."""
        nn.Module.__init__(self)  # the parameters are experts', sharded, not new ones
        if etp_mesh.ndim != 1:
            raise ValueError(f"etp_mesh must be 1-D, got a {etp_mesh.ndim}-D mesh")
        self.num_experts, self.d_model, self.d_ff = experts.num_experts, experts.d_model, experts.d_ff
        self.etp_mesh = etp_mesh
        for name, dim in SHARD_DIMS.items():
            full = getattr(experts, name).detach()
            setattr(self, name, nn.Parameter(distribute_tensor(full, etp_mesh, [Shard(dim)])))

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        """The values :meth:`Experts.reset_parameters` draws from the same RNG state: every rank draws the
        full stacks (transiently) and keeps its part. DTensor's own ``normal_`` draws the same local
        values on every CPU rank: all d_ff slices would be equal, a symmetry training never breaks."""
        for name in SHARD_DIMS:
            p = getattr(self, name)
            full = torch.empty(p.shape, dtype=p.dtype, device=p.device)
            _assign(p, nn.init.normal_(full, std=std if name != "w2" or out_std is None else out_std))

    @torch.no_grad()
    def copy_from_dense(self, dense: nn.Module) -> None:
        """Set every expert to the weights of a dense SwiGLU (the dense warm-up's switch)."""
        for name in SHARD_DIMS:
            p = getattr(self, name)
            _assign(p, getattr(dense, name).weight.expand(p.shape))

    def expert_forward(self, x: torch.Tensor, i: int) -> torch.Tensor:
        raise ShardingError(
            "ShardedFFNExperts.expert_forward: each rank holds a d_ff slice of expert "
            f"{i}; run the unsharded Experts as the reference"
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, etp={self.etp_mesh.size()}"

    def forward(self, *args, **kwargs) -> torch.Tensor:
        raise ShardingError(
            "ShardedFFNExperts (etp) shards every expert's d_ff and only runs merged experts "
            "(forward_merged and merge); layers that dispatch tokens use expert parallelism (ep) instead"
        )

    def forward_merged(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [S, T, d], weights [S, E] -> [S, T, d]; every rank of the etp group has the same S and T.

        Under autocast the segments are cast to the autocast dtype before they are gathered (the kernel
        then runs in it, as :func:`~diffmoe.moe.merge.segment_merged_swiglu` does).
        """
        device = x.device.type
        x = x.to(compute_dtype(x))
        group = self.etp_mesh
        with torch.autocast(device, enabled=False):
            xs = _all_gather(x.contiguous(), 0, group)  # [t*S, T, d]
            ws = _all_gather(weights.contiguous(), 0, group)  # [t*S, E]
            partial = SegmentMergedSwiGLU.apply(xs, ws, *self._local_slices(), self.num_experts)
            return _reduce_scatter(partial, "sum", 0, group)  # [S, T, d]

    def merge(self, weights: torch.Tensor) -> Merged:
        """Full merged weights per row of weights [S, E] (each rank its own rows):
        (w1 [S, d_ff, d], w3 [S, d_ff, d], w2 [S, d, d_ff]).

        Gathers the routing weights of the group, merges the local slice for all t*S rows and exchanges
        the slices (a DTensor redistribute Shard(d_ff) -> Shard(0): an all-to-all, or on gloo an
        all-gather), so merged weights move, never the expert stack. Differentiable like forward_merged.
        """
        ws = _all_gather(weights.contiguous(), 0, self.etp_mesh)  # [t*S, E]
        local = self._local_slices()
        merged = merge_stacks(ws, *local, local[0].dtype)
        return tuple(self._rows_of_this_rank(m, dim) for m, dim in zip(merged, SHARD_DIMS.values()))  # type: ignore

    def _local_slices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's (w1 [E, f, d], w3 [E, f, d], w2 [E, d, f]), f its share of d_ff; differentiable."""
        return tuple(self._local_slice(name, dim) for name, dim in SHARD_DIMS.items())  # type: ignore[return-value]

    def _local_slice(self, name: str, dim: int) -> torch.Tensor:
        """This rank's slice of parameter ``name``. Under FSDP2 the parameter read in forward is the
        all-gathered one, again the etp DTensor; the FSDP-sharded one would give wrong slices."""
        w = getattr(self, name)
        if not (isinstance(w, DTensor) and w.device_mesh == self.etp_mesh and tuple(w.placements) == (Shard(dim),)):
            where = (w.device_mesh, w.placements) if isinstance(w, DTensor) else type(w).__name__
            raise RuntimeError(
                f"ShardedFFNExperts.{name} must be Shard({dim}) on the etp mesh in forward, got "
                f"{where} (an FSDP-sharded parameter read outside a registered forward method?)"
            )
        return w.to_local()

    def _rows_of_this_rank(self, merged: torch.Tensor, dim: int) -> torch.Tensor:
        """merged [t*S, ...] holding this rank's d_ff slice on ``dim`` -> [S, ...] complete on ``dim``."""
        shape = list(merged.shape)
        shape[dim] = self.d_ff
        full = DTensor.from_local(
            merged,
            self.etp_mesh,
            [Shard(dim)],
            shape=torch.Size(shape),
            stride=torch.empty(shape, device="meta").stride(),
        )
        return full.redistribute(self.etp_mesh, [Shard(0)]).to_local()


def _assign(p: DTensor, full: torch.Tensor) -> None:
    """Copy the part of ``full`` (p's global shape, the same on every rank) that p holds, in any layout
    of p (etp alone or FSDP2's over it)."""
    p.copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None))


def shard_experts_ffn(experts: Experts, etp_mesh: DeviceMesh) -> ShardedFFNExperts:
    """``experts`` with every expert's d_ff sharded over the 1-D ``etp_mesh`` (same values), for
    ``layer.experts = shard_experts_ffn(layer.experts, mesh["etp"])`` on a layer that merges experts. Every rank of
    ``etp_mesh`` must call it (rank 0 of the group scatters the slices)."""
    return ShardedFFNExperts(experts, etp_mesh)
