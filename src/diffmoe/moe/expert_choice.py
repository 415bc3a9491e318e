"""Expert choice routing (Zhou et al., NeurIPS 2022), at token or segment level."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import EC_GRANULARITY
from .base import MoELayer, RoutingContext, check_arg, upcast
from .dispatch import dispatch


def expert_capacity(n: int, capacity_factor: float, num_experts: int) -> int:
    """Items each expert takes: round(n * c / E), at least 1 and at most n."""
    return max(1, min(n, round(n * capacity_factor / num_experts)))


class ExpertChoiceMoE(MoELayer):
    """Each expert picks its own tokens (or whole segments). x [B, L, d] -> [B, L, d].

    S = softmax(router(x)) per token over the experts. With ``granularity="token"`` each expert takes
    the ``expert_capacity(B*L, c, E)`` tokens of the whole batch with the highest S[:, expert];
    output = sum over the selections of S * FFN_expert(x). A token may be chosen by several experts or
    by none (the residual carries it). With ``granularity="segment"`` the router scores segment means
    (segments of ``segment_len`` tokens) and each expert takes whole segments, all their tokens with
    the segment's score. Perfect balance by construction; no auxiliary loss.

    Causality: whether a token is selected depends on the scores of every other token in the batch,
    future tokens of its own sequence included, and a segment's score is its own mean. Expert choice
    therefore leaks future information in a causal LM (training and evaluation alike) and cannot
    decode one token at a time as trained; it is provided as the Lory paper's baseline, not as a
    causal layer.

    Stats: ``load`` [E] (share of assignments, uniform by construction), ``mean_weight`` [E],
    ``unrouted`` (share of tokens, or segments, that no expert chose).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int = 8,
        capacity_factor: float = 1.0,
        granularity: str = "token",
        segment_len: int = 256,
        dispatch_impl: str = "auto",
    ):
        super().__init__(d_model, d_ff, num_experts)
        check_arg(capacity_factor > 0, "capacity_factor", capacity_factor, "must be positive")
        check_arg(granularity in EC_GRANULARITY, "granularity", granularity,
                  f"choose one of {', '.join(EC_GRANULARITY)}")
        check_arg(isinstance(segment_len, int) and segment_len >= 1, "segment_len", segment_len,
                  "must be an integer >= 1")
        self.capacity_factor, self.granularity, self.segment_len = capacity_factor, granularity, segment_len
        self.dispatch_impl = dispatch_impl
        self.experts_per_token = capacity_factor

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        B, L, d = x.shape
        T = self.segment_len if self.granularity == "segment" else 1
        N = math.ceil(L / T)
        xp = F.pad(x, (0, 0, 0, N * T - L)).view(B * N, T, d)  # items: tokens (T=1) or segments
        counts = (L - torch.arange(N, device=x.device) * T).clamp(max=T).repeat(B)  # tokens per item
        scores = self.router_logits(upcast(xp).sum(1) / counts.unsqueeze(1)).softmax(-1)  # [items, E]
        cap = expert_capacity(B * N, self.capacity_factor, self.num_experts)
        gate, item = scores.t().topk(cap, dim=-1)  # [E, cap] each expert's chosen items
        E = self.num_experts
        expert_idx = torch.arange(E, device=x.device).repeat_interleave(cap * T)
        token_idx = (item.reshape(-1, 1) * T + torch.arange(T, device=x.device)).reshape(-1)
        y = dispatch(xp.reshape(-1, d), self.experts, token_idx, expert_idx,
                     gate.reshape(-1).repeat_interleave(T), self.dispatch_impl)
        self._set_aux({}, x)
        chosen = torch.zeros(B * N, dtype=torch.bool, device=x.device)
        chosen[item.reshape(-1)] = True
        self.stats = {"load": torch.full((E,), 1.0 / E, device=x.device), "mean_weight": scores.detach().mean(0),
                      "unrouted": 1.0 - chosen.float().mean()}
        return y.view(B, N * T, d)[:, :L]
