"""Top-k token choice: Switch (k=1), GShard and Mixtral (k=2)."""

from __future__ import annotations

import math

import torch

from .base import MoELayer, RoutingContext, balance_loss, check_arg, token_choice_stats, z_loss
from .dispatch import dispatch


def capacity_keep_mask(expert_idx: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Which assignments fit under a per-expert capacity, GShard priority order.

    expert_idx: [N, k] chosen experts per token and slot. Slot 1 of every token (in token order) is
    served before any slot 2, and so on; an expert keeps its first ``capacity`` assignments.
    Returns a bool mask [N, k].
    """
    N, k = expert_idx.shape
    by_priority = expert_idx.t().reshape(-1)  # [k*N]: slot-major
    onehot = torch.nn.functional.one_hot(by_priority, num_experts)
    position = (onehot.cumsum(0) * onehot).sum(-1) - 1  # rank of the assignment inside its expert
    return (position < capacity).view(k, N).t()


class TopKMoE(MoELayer):
    """Top-k token choice MoE, dropless by default.

    p = softmax(router(x)); each token goes to its k most probable experts with gates p (Switch /
    GShard, ``renormalize=False``) or p renormalised over the k (Mixtral, ``renormalize=True``).
    Losses: ``balance`` = E * sum_i f_i P_i (f over assignments; see :func:`balance_loss`) with
    ``balance_coef``, and the router ``z`` loss with ``z_loss_coef``.
    ``capacity_factor`` c (optional) caps each expert at ceil(c * N * k / E) assignments, GShard order;
    dropped slots contribute nothing (the residual carries the token).

    Stats: ``load`` [E] (share of assignments, before dropping), ``mean_weight`` [E], ``entropy``,
    ``dropped`` (share of assignments dropped).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int = 8,
        top_k: int = 2,
        renormalize: bool = True,
        capacity_factor: float | None = None,
        balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        global_balance: bool = True,
        dispatch_impl: str = "auto",
    ):
        super().__init__(d_model, d_ff, num_experts)
        check_arg(isinstance(top_k, int) and 1 <= top_k <= num_experts, "top_k", top_k,
                  f"must be between 1 and num_experts={num_experts}")
        check_arg(capacity_factor is None or capacity_factor > 0, "capacity_factor", capacity_factor,
                  "must be positive or None (dropless)")
        self.top_k, self.renormalize, self.capacity_factor = top_k, renormalize, capacity_factor
        self.balance_coef, self.z_loss_coef, self.global_balance = balance_coef, z_loss_coef, global_balance
        self.dispatch_impl = dispatch_impl
        self.experts_per_token = float(top_k)

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        B, L, d = x.shape
        xf = x.reshape(-1, d)
        N = xf.shape[0]
        logits = self.router_logits(xf)  # [N, E] float32
        probs = logits.softmax(-1)
        gate, idx = probs.topk(self.top_k, dim=-1)  # [N, k]
        if self.renormalize:
            gate = gate / gate.sum(-1, keepdim=True)
        token_idx = torch.arange(N, device=x.device).repeat_interleave(self.top_k)
        expert_idx, flat_gate = idx.reshape(-1), gate.reshape(-1)
        stats = token_choice_stats(probs, expert_idx)
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * N * self.top_k / self.num_experts)
            keep = capacity_keep_mask(idx, self.num_experts, capacity).reshape(-1)
            token_idx, expert_idx, flat_gate = token_idx[keep], expert_idx[keep], flat_gate[keep]
            stats["dropped"] = 1.0 - keep.float().mean()
        y = dispatch(xf, self.experts, token_idx, expert_idx, flat_gate, self.dispatch_impl)
        self._set_aux({"balance": (balance_loss(probs, idx.reshape(-1), self.global_balance), self.balance_coef),
                       "z": (z_loss(logits), self.z_loss_coef)}, x)
        self.stats = stats
        return y.view(B, L, d)
