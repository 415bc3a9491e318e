"""Expert choice routing (Zhou et al., NeurIPS 2022), at token or segment level."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..schema import check, positive_int
from .base import MoELayer
from .routing import Capabilities, Routing, RoutingContext, segment_means

GRANULARITY = ("token", "segment")


@dataclass
class ExpertChoiceConfig:
    """Expert choice routing (Zhou et al. 2022)."""

    capacity_factor: float = 1.0
    """c: each expert takes n * c / E tokens (or segments). The EC paper uses 2, Lory's comparison 1."""
    granularity: str = "token"
    """``token``: each expert picks tokens; ``segment``: each expert picks whole segments."""
    segment_len: int = 256

    def validate(self, num_experts: int | None = None) -> None:
        check(self.capacity_factor > 0, "capacity_factor", self.capacity_factor, "must be positive")
        check(self.granularity in GRANULARITY, "granularity", self.granularity,
              f"choose one of {', '.join(GRANULARITY)}")
        check(positive_int(self.segment_len), "segment_len", self.segment_len, "must be an integer >= 1")


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

    Stats: the shared ones (``load`` is uniform by construction) and ``unrouted`` (share of tokens, or
    segments, that no expert chose).
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
        ExpertChoiceConfig(capacity_factor, granularity, segment_len).validate(num_experts)
        super().__init__(d_model, d_ff, num_experts, dispatch_impl=dispatch_impl)
        self.capacity_factor, self.granularity, self.segment_len = capacity_factor, granularity, segment_len
        self.experts_per_token = capacity_factor

    @property
    def capabilities(self) -> Capabilities:
        segments = self.granularity == "segment"
        return Capabilities(causal_from=None, segment_len=self.segment_len if segments else None,
                            incremental_decoding=False)

    def route(self, x: torch.Tensor, ctx: RoutingContext) -> Routing:
        B, L, d = x.shape
        T = self.segment_len if self.granularity == "segment" else 1
        xp, means = segment_means(x, T)  # items: tokens (T=1) or segments, [B, N, T, d] and [B, N, d]
        items = B * xp.shape[1]
        scores = self.router(means.reshape(items, d)).softmax(-1)  # [items, E]
        E = self.num_experts
        cap = expert_capacity(items, self.capacity_factor, E)
        gate, item = scores.t().topk(cap, dim=-1)  # [E, cap] each expert's chosen items
        chosen = torch.arange(E, device=x.device).repeat_interleave(cap)  # the expert of each selection
        token_idx = (item.reshape(-1, 1) * T + torch.arange(T, device=x.device)).reshape(-1)
        selected = torch.zeros(items, dtype=torch.bool, device=x.device)
        selected[item.reshape(-1)] = True
        return Routing(inputs=xp.reshape(-1, d), probs=scores, token_idx=token_idx,
                       expert_idx=chosen.repeat_interleave(T), gate=gate.reshape(-1).repeat_interleave(T),
                       chosen=chosen, extra_stats={"unrouted": 1.0 - selected.float().mean()})
