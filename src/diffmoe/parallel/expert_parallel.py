"""Expert parallelism (EP) for token-choice experts: each rank of an ``ep`` group holds E/ep experts.

:class:`ExpertParallelExperts` is an :class:`~diffmoe.moe.experts.Experts` whose stacks ``w1``, ``w3``,
``w2`` are DTensors ``Shard(0)`` on a 1-D ``ep`` mesh: rank r holds experts [r*L, (r+1)*L), L = E/ep,
as local tensors w1/w3 [L, d_ff, d], w2 [L, d, d_ff]. Parameter names, and so state_dict keys, are
those of ``Experts``; ``num_experts`` stays the global E. Build it with
``layer.experts = expert_parallel(layer.experts, ep_mesh)``.

What moves where, in one ``forward(x [N, d], token_idx [A], expert_idx [A], gate [A])`` on each rank:

1. The A assignments are sorted by expert; the rows x[token_idx] [A, d] for rank r's experts are then
   contiguous, and ``counts`` [E] says how many go to each expert.
2. Count exchange: an equal-split ``all_to_all_single`` of ``counts`` viewed [ep, L] — rank r gets
   ``received`` [ep, L], the rows every source rank will send to each of its experts.
3. Split lists: row totals per destination rank (``counts``) and per source rank (``received``) are
   brought to the host with one ``.tolist()``, a device-to-host sync: on a GPU the host waits here
   (torchtitan sets explicit FSDP prefetch under EP for this reason), and ``torch.compile`` needs
   ``capture_scalar_outputs`` to trace it.
4. Dispatch: ``all_to_all_single_autograd`` sends the rows (variable splits; a rank may send or
   receive none). Rank r receives R rows [R, d], rank-major (source rank, then local expert).
5. The local experts run on them through :func:`~diffmoe.moe.dispatch.dispatch`, which orders them by
   local expert, runs the loop or the grouped GEMM, and returns [R, d] in the received order.
6. Combine: the reverse all-to-all returns each row to its source rank ([A, d], sorted order); the
   source multiplies by the gate and ``index_add``s into y [N, d].

The backward runs the same two all-to-alls in reverse. The gate multiplies on the source rank, so gate
(and router) gradients never travel; an expert's gradient sums the contributions of every rank's rows.
So when each rank's loss is its local share of a global sum (e.g. local token sum / global token count)
and reductions are plain sums, a rank's shard gradient equals the rows of the one-process gradient for
its experts with no correction. Composed with FSDP2 on the other dimension of an (efsdp, ep) mesh,
``fully_shard`` needs ``set_gradient_divide_factor(1.0)`` (and, on gloo,
``set_force_sum_reduction_for_comms(True)``); FSDP2 all-gathers each parameter back to the ep DTensor
before forward, which is what :meth:`ExpertParallelExperts.forward` checks and reads.

Under autocast the tokens travel and the experts run in the autocast dtype, as in ``dispatch``.

Only layers whose family declares ``expert_sharding == "ep"`` (token choice, whose routing of a token
does not depend on the other tokens of the batch) are expert-parallel. Families that select tokens per
expert within a micro-batch stay data-parallel: each rank runs every expert on its own selection and
no token needs to move. Layers that merge all E experts per segment
need every expert on each rank: ``forward_merged`` and ``merge`` raise here (those layers shard d_ff
instead, ``etp``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from ..moe.dispatch import dispatch
from ..moe.experts import Experts
from ..runtime import compute_dtype
from .layout import ShardingError

_WEIGHTS = ("w1", "w3", "w2")


class _LocalExperts(NamedTuple):
    """This rank's experts as ``dispatch`` reads them: w1/w3 [L, d_ff, d], w2 [L, d, d_ff], L experts."""

    w1: torch.Tensor
    w3: torch.Tensor
    w2: torch.Tensor
    num_experts: int


class ExpertParallelExperts(Experts):
    """The experts of ``experts`` sharded over the 1-D mesh ``ep_mesh``, expert dim first (Shard(0)).

    The full stacks must be equal on every rank (models are seeded alike); rank 0 of ``ep_mesh``
    scatters its copy, so every rank keeps only its own experts. ``num_experts`` must divide by the
    mesh size. See the module docstring for the forward's communication.
    """

    def __init__(self, experts: Experts, ep_mesh: DeviceMesh):
        with torch.device("meta"):  # the parameters are replaced below; allocate nothing full-size
            super().__init__(experts.num_experts, experts.d_model, experts.d_ff)
        if ep_mesh.ndim != 1:
            raise ValueError(f"expert parallelism takes a 1-D ep mesh, got {ep_mesh.ndim} dimensions")
        ep = ep_mesh.size()
        if self.num_experts % ep:
            raise ValueError(f"num_experts={self.num_experts} must be divisible by the ep size {ep}")
        self.ep_mesh = ep_mesh
        for name in _WEIGHTS:
            full = getattr(experts, name).detach()
            setattr(self, name, nn.Parameter(distribute_tensor(full, ep_mesh, [Shard(0)])))

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_mesh.size()

    def forward(
        self, x: torch.Tensor, token_idx: torch.Tensor, expert_idx: torch.Tensor, gate: torch.Tensor, impl: str = "auto"
    ) -> torch.Tensor:
        """Dispatched tokens over all E experts, as :meth:`Experts.forward`: x [N, d] -> y [N, d],
        y[n] = sum over the assignments a of token n of gate[a] * expert(expert_idx[a])(x[n])."""
        device, dtype = x.device.type, compute_dtype(x)
        with torch.autocast(device, enabled=False):  # run in the autocast dtype, explicitly
            x = x.to(dtype)
            order = torch.argsort(expert_idx, stable=True)
            tok = token_idx[order]
            counts = torch.bincount(expert_idx, minlength=self.num_experts)  # [E]
            received, send_splits, recv_splits = self._exchange_counts(counts)
            rows = self._all_to_all(x.index_select(0, tok), recv_splits, send_splits)  # [R, d]
            out = self._run_local(rows, received, impl)
            back = self._all_to_all(out, send_splits, recv_splits)  # [A, d], sorted by expert
            return x.new_zeros(x.shape).index_add_(0, tok, back * gate[order].to(dtype).unsqueeze(-1))

    def _exchange_counts(self, counts: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
        """counts [E] (rows this rank sends to each expert) -> (received [ep, L]: rows each source rank
        sends to each local expert, rows sent to each rank, rows received from each rank)."""
        ep = self.ep_mesh.size()
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.ep_mesh.get_group())
        received = received.view(ep, self.num_local_experts)
        send_splits, recv_splits = torch.stack([counts.view(ep, -1).sum(1), received.sum(1)]).tolist()
        return received, send_splits, recv_splits

    def _all_to_all(self, t: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        """Rows of t [sum(in_splits), d] to the ep ranks -> [sum(out_splits), d], differentiable."""
        return all_to_all_single_autograd(t, out_splits, in_splits, self.ep_mesh)

    def _run_local(self, rows: torch.Tensor, received: torch.Tensor, impl: str) -> torch.Tensor:
        """The local experts on the received rows [R, d] (rank-major, each rank's rows by local expert,
        ``received`` [ep, L] of them) -> [R, d] in the same order, ungated."""
        L = self.num_local_experts
        local = _LocalExperts(*(self._local_shard(name) for name in _WEIGHTS), L)
        expert = torch.arange(L, device=rows.device).repeat(received.shape[0]).repeat_interleave(received.view(-1))
        R = rows.shape[0]
        return dispatch(rows, local, torch.arange(R, device=rows.device), expert, rows.new_ones(R), impl)

    def _local_shard(self, name: str) -> torch.Tensor:
        """This rank's experts of parameter ``name``: [L, ...]. Under FSDP2 the parameter read in forward
        is the all-gathered one, again the ep DTensor."""
        w = getattr(self, name)
        if not (isinstance(w, DTensor) and w.device_mesh == self.ep_mesh and tuple(w.placements) == (Shard(0),)):
            where = (w.device_mesh, w.placements) if isinstance(w, DTensor) else type(w).__name__
            raise RuntimeError(
                f"ExpertParallelExperts.{name} must be Shard(0) on the ep mesh in forward, "
                f"got {where} (an FSDP-sharded parameter read outside its forward?)"
            )
        return w.to_local()

    def forward_merged(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        raise _needs_every_expert("forward_merged")

    def merge(self, weights: torch.Tensor):
        raise _needs_every_expert("merge")

    def expert_forward(self, x: torch.Tensor, i: int) -> torch.Tensor:
        raise _needs_every_expert("expert_forward")

    @torch.no_grad()
    def copy_from_dense(self, dense: nn.Module) -> None:
        """Set every expert to the weights of a dense SwiGLU (on each rank's own shards)."""
        for name in _WEIGHTS:
            local = getattr(self, name).to_local()
            local.copy_(getattr(dense, name).weight.expand_as(local))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ep={self.ep_mesh.size()}"


def _needs_every_expert(method: str) -> ShardingError:
    return ShardingError(
        f"ExpertParallelExperts.{method}: each rank holds only E/ep experts, and this needs all of them; "
        "expert parallelism serves layers that dispatch tokens only; layers that merge experts shard d_ff "
        "instead (etp)"
    )


def expert_parallel(experts: Experts, ep_mesh: DeviceMesh) -> ExpertParallelExperts:
    """``experts`` sharded over the 1-D ``ep_mesh``, same values: ``layer.experts = expert_parallel(layer.experts,
    mesh["ep"])``. Every rank of ``ep_mesh`` must call it (rank 0 scatters the shards)."""
    return ExpertParallelExperts(experts, ep_mesh)
