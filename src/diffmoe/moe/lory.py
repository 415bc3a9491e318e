"""Lory: fully differentiable MoE by expert merging (arXiv 2405.03133).

The router is a linear map d -> E and a softmax, trained only by the language-modelling loss (no
auxiliary loss, no top-k, no noise). Experts are merged in parameter space and the merged SwiGLU runs
on the tokens (see :mod:`diffmoe.moe.merge`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import LORY_FIRST_SEGMENT, LORY_ROUTING
from .base import MoELayer, RoutingContext, check_arg, upcast
from .merge import Merged, merge_experts, merged_swiglu, segment_merged_swiglu


class LoryMoE(MoELayer):
    """Lory MoE layer. x [B, L, d] -> [B, L, d].

    Routing modes (``routing``, settable per call site, e.g. ``model.set_lory_routing``):

    - ``segment`` (training and evaluation): cut each sequence into N = ceil(L / T) segments of
      ``segment_len`` T tokens (the last may be shorter). Segment k > 1 uses the expert merged from
      e = softmax(router(mean of segment k-1)), so its tokens depend only on the past; the weights of
      the last segment are never used.
    - ``prefix`` (the paper's ablation): segments 2..N all use the weights routed from segment 1.
    - ``prompt`` (generation): route once on the mean of the prompt (the first ``ctx.prompt_len``
      positions, default all), merge once, and use that FFN for every position: decoding then costs
      what a dense model costs.

    ``first_segment`` — segment 1 has no predecessor:

    - ``uniform`` (default): weights 1/E, i.e. the average expert. Strictly causal, so training and
      segment-mode evaluation compute a true autoregressive likelihood; after Lory's dense warm-up
      (all experts equal) it is exactly the warmed-up dense FFN. It costs segment 1 its routing (1/N of
      the tokens: 1/16 at L 4096, T 256).
    - ``own_mean`` (the paper): the segment's own mean with a stop-gradient on its weights. Tokens of
      segment 1 then see a summary of later tokens of segment 1 in the forward pass (a leak the paper
      does not quantify), which makes segment-1 perplexity optimistic. Choose it to reproduce the paper.

    Incremental decoding (``ctx.state`` set by the KV cache) follows the same rules; in ``segment`` and
    ``prefix`` modes with ``own_mean``, segment 1 is routed on the part of it the first call sees (the
    prompt) and keeps those weights, which equals the full forward when the prompt covers segment 1.

    Stats: ``mean_weight`` [E] (= ``load``), ``usage`` [E] (share of routed segments whose weight for
    the expert exceeds 2/E, the paper's utilisation), ``entropy``, and ``routing_weights`` [B, N, E],
    the weights each segment was processed with (for analysis per domain).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int = 8,
        segment_len: int = 256,
        first_segment: str = "uniform",
        routing: str = "segment",
    ):
        super().__init__(d_model, d_ff, num_experts)
        check_arg(isinstance(segment_len, int) and segment_len >= 1, "segment_len", segment_len,
                  "segment length T must be an integer >= 1")
        check_arg(first_segment in LORY_FIRST_SEGMENT, "first_segment", first_segment,
                  f"choose one of {', '.join(LORY_FIRST_SEGMENT)}")
        self.segment_len, self.first_segment = segment_len, first_segment
        self.routing = routing

    @property
    def routing(self) -> str:
        return self._routing

    @routing.setter
    def routing(self, mode: str) -> None:
        check_arg(mode in LORY_ROUTING, "routing", mode, f"choose one of {', '.join(LORY_ROUTING)}")
        self._routing = mode

    # ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        ctx = ctx or RoutingContext()
        self._set_aux({}, x)
        if ctx.state is not None:
            return self._forward_cached(x, ctx)
        if self.routing == "prompt":
            return self._forward_prompt(x, ctx.prompt_len)
        return self._forward_segments(x)

    def _probs(self, means: torch.Tensor) -> torch.Tensor:
        """Routing weights softmax(router(means)) in at least float32. means [..., d] -> [..., E]."""
        return self.router_logits(means).softmax(-1)

    def _first_weights(self, probs0: torch.Tensor) -> torch.Tensor:
        """Weights of segment 1 given its own routing probabilities [B, E]."""
        if self.first_segment == "uniform":
            return torch.full_like(probs0, 1.0 / self.num_experts)
        return probs0.detach()

    def _forward_segments(self, x: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        T, E = self.segment_len, self.num_experts
        N = math.ceil(L / T)
        xp = F.pad(x, (0, 0, 0, N * T - L)).view(B, N, T, d)
        counts = (L - torch.arange(N, device=x.device) * T).clamp(max=T)  # tokens per segment [N]
        means = upcast(xp).sum(2) / counts.view(1, N, 1)  # [B, N, d]
        probs = self._probs(means)  # [B, N, E]
        source = probs[:, :-1] if self.routing == "segment" else probs[:, :1].expand(B, N - 1, E)
        weights = torch.cat([self._first_weights(probs[:, 0]).unsqueeze(1), source], 1)  # [B, N, E]
        y = segment_merged_swiglu(xp.reshape(B * N, T, d), weights.reshape(B * N, E), self.experts)
        self._record(weights, routed_from=0 if self.first_segment == "own_mean" else 1)
        return y.view(B, N * T, d)[:, :L]

    def _forward_prompt(self, x: torch.Tensor, prompt_len: int | None) -> torch.Tensor:
        return merged_swiglu(x, merge_experts(self._prompt_weights(x, prompt_len), self.experts))

    def _prompt_weights(self, x: torch.Tensor, prompt_len: int | None) -> torch.Tensor:
        """Routing weights [B, E] from the mean of the first ``prompt_len`` positions (default all)."""
        L = x.shape[1]
        P = L if prompt_len is None else prompt_len
        check_arg(1 <= P <= L, "prompt_len", prompt_len, f"must be between 1 and the sequence length {L}")
        weights = self._probs(upcast(x[:, :P]).mean(1))
        self._record(weights.unsqueeze(1), routed_from=0)
        return weights

    # ------------------------------------------------------------------------------------------
    def _forward_cached(self, x: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        """Incremental decoding: x [B, L, d] continues the positions seen by earlier calls."""
        st = ctx.state
        if self.routing == "prompt":
            if "merged" not in st:
                weights = self._prompt_weights(x, ctx.prompt_len)
                st["merged"] = _detach_merged(merge_experts(weights, self.experts))
            return merged_swiglu(x, st["merged"])
        T = self.segment_len
        if "pos" not in st:
            st.update(pos=0, seg_sum=upcast(x.new_zeros(x.shape[0], x.shape[2])))
        outs, start = [], 0
        while start < x.shape[1]:
            end = min(x.shape[1], start + T - st["pos"] % T)
            piece = x[:, start:end]
            if "merged" not in st:  # first token of a segment, or the first call
                if st["pos"] < T:
                    weights = self._first_weights(self._probs(upcast(piece).mean(1)))
                else:
                    weights = st["next_weights"]
                st["merged"] = _detach_merged(merge_experts(weights, self.experts))
            outs.append(merged_swiglu(piece, st["merged"]))
            st["seg_sum"] += upcast(piece).sum(1)
            st["pos"] += end - start
            if st["pos"] % T == 0:  # segment complete: route the next one
                probs = self._probs(st["seg_sum"] / T)
                if st["pos"] == T:
                    st["prefix_weights"] = probs
                st["next_weights"] = probs if self.routing == "segment" else st["prefix_weights"]
                st["seg_sum"].zero_()
                del st["merged"]
            start = end
        return torch.cat(outs, 1)

    def _record(self, weights: torch.Tensor, routed_from: int) -> None:
        """Statistics from the weights segments were processed with. weights [B, N, E]."""
        E = self.num_experts
        w = weights.detach()
        routed = w[:, routed_from:].reshape(-1, E)
        self.stats = {"routing_weights": w}
        if routed.numel():
            mean = routed.mean(0)
            self.stats.update(
                mean_weight=mean, load=mean, usage=(routed > 2.0 / E).float().mean(0),
                entropy=-(routed * routed.clamp_min(1e-20).log()).sum(-1).mean(),
            )


def _detach_merged(merged: Merged) -> Merged:
    """Decoding keeps merged weights across calls; they carry no graph between calls."""
    return tuple(w.detach() for w in merged)  # type: ignore[return-value]
