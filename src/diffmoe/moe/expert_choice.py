"""Expert choice routing (Zhou et al., NeurIPS 2022), at token or segment level."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..schema import check, positive_int
from .base import MoELayer, family_config
from .family import Family
from .remote import RemoteMoE, remote_segments
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
        check(
            self.granularity in GRANULARITY, "granularity", self.granularity, f"choose one of {', '.join(GRANULARITY)}"
        )
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

    shared_options = ("dispatch_impl",)
    logged_stats = {"unrouted": None}

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int = 8,
        config: ExpertChoiceConfig | None = None,
        *,
        dispatch_impl: str = "auto",
        **options,
    ):
        config = family_config(ExpertChoiceConfig, config, options, num_experts)
        super().__init__(d_model, d_ff, num_experts, dispatch_impl=dispatch_impl)
        self.capacity_factor, self.granularity = config.capacity_factor, config.granularity
        self.segment_len = config.segment_len
        self.experts_per_token = config.capacity_factor

    @property
    def capabilities(self) -> Capabilities:
        segments = self.granularity == "segment"
        return Capabilities(
            causal_from=None, segment_len=self.segment_len if segments else None, incremental_decoding=False
        )

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
        return Routing(
            inputs=xp.reshape(-1, d),
            probs=scores,
            token_idx=token_idx,
            expert_idx=chosen.repeat_interleave(T),
            gate=gate.reshape(-1).repeat_interleave(T),
            chosen=chosen,
            extra_stats={"unrouted": 1.0 - selected.float().mean()},
        )


class RemoteExpertChoice(RemoteMoE):
    """The custom-code export of expert choice: each expert takes its capacity of the batch's highest-scoring
    tokens (or segments), padding excluded."""

    decodes = False
    note = (
        "expert_choice layers select tokens over the whole batch, future tokens included: the scores leak "
        "future tokens and depend on the batch, and the model cannot generate token by token"
    )

    def forward(self, x, ctx):
        if ctx["cache"] is not None:
            raise ValueError("expert choice routing cannot decode token by token (it selects over the whole batch)")
        B, L, d = x.shape
        T = self.opt["segment_len"] if self.opt["granularity"] == "segment" else 1
        valid = ctx["valid"]
        if T > 1 and not bool(valid.all()):
            raise ValueError("segment-level expert choice does not support padded batches")
        xp, means = remote_segments(x, T)
        items = means.shape[0] * means.shape[1]
        scores = self.probs(means.reshape(items, d))  # [items, E]
        cand = valid.reshape(-1) if T == 1 else torch.ones(items, dtype=torch.bool, device=x.device)
        n = int(cand.sum())
        cap = max(1, min(n, round(n * self.opt["capacity_factor"] / self.E)))
        item = scores.masked_fill(~cand.unsqueeze(1), float("-inf")).t().topk(cap, dim=-1).indices  # [E, cap]
        gate = scores.t().gather(1, item)
        tokens = (item.reshape(-1, 1) * T + torch.arange(T, device=x.device)).reshape(-1)
        experts = torch.arange(self.E, device=x.device).repeat_interleave(cap * T)
        y = self.experts.dispatch(xp.reshape(-1, d), experts, tokens, gate.reshape(-1).repeat_interleave(T))
        return y.view(B, -1, d)[:, :L]


FAMILY = Family("expert_choice", ExpertChoiceMoE, ExpertChoiceConfig, remote=RemoteExpertChoice)
