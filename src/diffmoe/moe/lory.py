"""Lory: fully differentiable MoE by expert merging (arXiv 2405.03133).

The router is a linear map d -> E and a softmax, trained only by the language-modelling loss (no
auxiliary loss, no top-k, no noise). Experts are merged in parameter space and the merged SwiGLU runs
on the tokens (see :mod:`diffmoe.moe.merge`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..schema import check, positive_int
from .base import MoELayer, family_config
from .family import Family
from .merge import Merged, merged_swiglu
from .remote import RemoteMoE, remote_merged_swiglu, remote_segments
from .routing import Capabilities, Routing, RoutingContext, segment_means, upcast

FIRST_SEGMENT = ("uniform", "own_mean")
ROUTING = ("segment", "prefix", "prompt")


@dataclass
class LoryConfig:
    """Lory expert merging (arXiv 2405.03133)."""

    segment_len: int = 256
    """T: tokens per routing segment (paper: 256)."""
    first_segment: str = "uniform"
    """Routing of segment 1, which has no predecessor. ``uniform``: weights 1/E (strictly causal,
    the default; see ``LoryMoE``). ``own_mean``: the paper's rule, the segment's own mean with a
    stop-gradient on its routing weights (tokens of segment 1 then see later tokens of segment 1)."""
    routing: str = "segment"
    """``segment``: causal segment routing (training and evaluation). ``prefix``: route once from
    segment 1 for the whole sequence (the paper's ablation). ``prompt``: route once on the mean of the
    prompt and decode as a dense model (generation)."""

    def validate(self, num_experts: int | None = None) -> None:
        check(
            positive_int(self.segment_len), "segment_len", self.segment_len, "segment length T must be an integer >= 1"
        )
        check(
            self.first_segment in FIRST_SEGMENT,
            "first_segment",
            self.first_segment,
            f"choose one of {', '.join(FIRST_SEGMENT)}",
        )
        check_routing(self.routing)

    def check_training(self, context_len: int) -> list[str]:
        """Refuse what leaks the future or leaves the router without gradient in training on sequences
        of ``context_len`` positions. Returns the warnings (none)."""
        check(
            self.routing != "prompt",
            "routing",
            self.routing,
            "routes every position on the mean of the whole sequence, future tokens included; train with "
            "segment (or prefix): prompt routing is for inference (model.inference, eval --routing, generate)",
        )
        check(
            self.segment_len < context_len,
            "segment_len",
            self.segment_len,
            f"must be shorter than the training sequences ({context_len} positions): otherwise every position "
            "is in segment 1, which has no predecessor to route on (uniform: the average expert, and the "
            "router gets no gradient; own_mean: every position routed on the whole sequence)",
        )
        return []


def check_routing(mode: str) -> None:
    check(mode in ROUTING, "routing", mode, f"choose one of {', '.join(ROUTING)}")


class LoryMoE(MoELayer):
    """Lory MoE layer. x [B, L, d] -> [B, L, d].

    Routing modes (``routing``, settable per call site, e.g. ``model.set_routing``):

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
    Each cached call records the weights of the segments its tokens ran with in ``stats``. In
    ``prompt`` routing the first cached call is the prompt: it is routed on all of it (its real tokens
    only, when ``ctx.mask`` marks padding) and every later call decodes with that merged expert. In
    ``segment`` and ``prefix`` routing a padded batch (``ctx.mask``, left padding) runs one row at a
    time over its real positions, so each row's segments start at its first real token and it computes
    what it computes alone; under a cache each row keeps its own decoding state from then on.

    Stats: the shared ones for merged experts (``load`` = ``mean_weight``, ``usage`` [E]: share of
    routed segments whose weight for the expert exceeds 2/E, the paper's utilisation; ``entropy``;
    ``routed_segment_weights``) and ``routing_weights`` [B, N, E], the weights each segment was
    processed with, the first (unrouted under ``uniform``) included (in a padded batch, rows with fewer
    segments are NaN at the front).
    """

    expert_sharding = "etp"
    merges_experts = True

    def __init__(self, d_model: int, d_ff: int, num_experts: int = 8, config: LoryConfig | None = None, **options):
        config = family_config(LoryConfig, config, options, num_experts)
        super().__init__(d_model, d_ff, num_experts)
        self.segment_len, self.first_segment = config.segment_len, config.first_segment
        self.routing = config.routing

    @property
    def routing(self) -> str:
        return self._routing

    @routing.setter
    def routing(self, mode: str) -> None:
        check_routing(mode)
        self._routing = mode

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            causal_from=self.segment_len if self.first_segment == "own_mean" else 0,
            routing_modes=ROUTING,
            segment_len=self.segment_len,
        )

    # ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        ctx = ctx or RoutingContext()
        if self.routing != "prompt" and (
            (ctx.mask is not None and not bool(ctx.mask.all())) or (ctx.state is not None and "rows" in ctx.state)
        ):
            return self._forward_rows(x, ctx)
        if ctx.state is not None:
            return self._forward_cached(x, ctx)
        if self.routing == "prompt":  # one merge per sequence, then a dense FFN: decoding's arithmetic
            return merged_swiglu(x, self._prompt_merge(x, ctx.prompt_len, ctx.mask))
        return super().forward(x, ctx)

    def _forward_rows(self, x: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        """Segment or prefix routing of a padded batch: x [B, L, d], ``ctx.mask`` [B, L] (None: no
        padding in this call) -> [B, L, d], zero at padding. Each row runs alone over its real positions,
        with its own decoding state under a cache; the rows' routings are recorded together."""
        B = x.shape[0]
        mask = ctx.mask if ctx.mask is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        states = None if ctx.state is None else ctx.state.setdefault("rows", [{} for _ in range(B)])
        out, routings = torch.zeros_like(x), []
        self.record = routings.append  # each row's routing; recorded together below
        try:
            for r in range(B):
                real = mask[r]
                if not bool(real.any()):
                    continue
                row = RoutingContext(state=None if states is None else states[r])
                xr = x[r : r + 1, real]
                out[r, real] = (super().forward(xr, row) if states is None else self._forward_cached(xr, row))[0]
        finally:
            del self.record
        per_row = [rt.extra_stats["routing_weights"][0] for rt in routings]  # [N_r, E] each
        width = max(w.shape[0] for w in per_row)
        weights = torch.stack([F.pad(w, (0, 0, width - w.shape[0], 0), value=float("nan")) for w in per_row])
        self.record(
            Routing(
                inputs=x,
                probs=torch.cat([rt.probs.reshape(-1, self.num_experts) for rt in routings]),
                extra_stats={"routing_weights": weights},
            )
        )  # weights [rows, N, E], aligned at the end
        return out

    def route(self, x: torch.Tensor, ctx: RoutingContext) -> Routing:
        """Segment and prefix routing: one merged expert per segment."""
        B, L, d = x.shape
        E = self.num_experts
        xp, means = segment_means(x, self.segment_len)  # [B, N, T, d], [B, N, d]
        N = xp.shape[1]
        probs = self._probs(means)  # [B, N, E]
        source = probs[:, :-1] if self.routing == "segment" else probs[:, :1].expand(B, N - 1, E)
        weights = torch.cat([self._first_weights(probs[:, 0]).unsqueeze(1), source], 1)  # [B, N, E]
        routed_from = 0 if self.first_segment == "own_mean" else 1
        return Routing(
            inputs=xp.reshape(B * N, -1, d),
            probs=weights[:, routed_from:],
            segment_weights=weights.reshape(B * N, E),
            extra_stats={"routing_weights": weights},
        )

    def _probs(self, means: torch.Tensor) -> torch.Tensor:
        """Routing weights softmax(router(means)) in at least float32. means [..., d] -> [..., E]."""
        return self.router(means).softmax(-1)

    def _first_weights(self, probs0: torch.Tensor) -> torch.Tensor:
        """Weights of segment 1 given its own routing probabilities [B, E]."""
        if self.first_segment == "uniform":
            return torch.full_like(probs0, 1.0 / self.num_experts)
        return probs0.detach()

    def _prompt_merge(self, x: torch.Tensor, prompt_len: int | None, mask: torch.Tensor | None = None) -> Merged:
        """One merged expert per sequence, routed on the mean of its first ``prompt_len`` positions
        (default all) that ``mask`` [B, L] (None: all) marks real; records the routing's statistics."""
        L = x.shape[1]
        P = L if prompt_len is None else prompt_len
        check(1 <= P <= L, "prompt_len", prompt_len, f"must be between 1 and the sequence length {L}")
        prompt = upcast(x[:, :P])
        if mask is None:
            mean = prompt.mean(1)
        else:
            real = mask[:, :P, None].to(prompt.dtype)  # [B, P, 1]
            mean = (prompt * real).sum(1) / real.sum(1).clamp(min=1)
        weights = self._probs(mean)  # [B, E]
        self.record(
            Routing(inputs=x, probs=weights, segment_weights=weights, extra_stats={"routing_weights": weights[:, None]})
        )
        return self.experts.merge(weights)

    # ------------------------------------------------------------------------------------------
    def _forward_cached(self, x: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        """Incremental decoding: x [B, L, d] continues the positions seen by earlier calls."""
        st = ctx.state
        self.aux_losses, self.aux_loss = {}, x.new_zeros((), dtype=torch.float32)
        if self.routing == "prompt":
            if "merged" not in st:  # the first call is the prompt (Decoder's chunk_size bounds its memory)
                st["merged"] = _detach_merged(self._prompt_merge(x, ctx.prompt_len, ctx.mask))
            return merged_swiglu(x, st["merged"])
        T = self.segment_len
        if "pos" not in st:
            st.update(pos=0, seg_sum=upcast(x.new_zeros(x.shape[0], x.shape[2])))
        outs, used, routed, start = [], [], [], 0
        while start < x.shape[1]:
            end = min(x.shape[1], start + T - st["pos"] % T)
            piece = x[:, start:end]
            if "merged" not in st:  # first token of a segment, or the first call
                if st["pos"] < T:
                    st["weights"] = self._first_weights(self._probs(upcast(piece).mean(1)))
                else:
                    st["weights"] = st["next_weights"]
                st["merged"] = _detach_merged(self.experts.merge(st["weights"]))
            used.append(st["weights"])  # [B, E], the weights this piece's segment runs with
            routed.append(st["pos"] >= T or self.first_segment == "own_mean")
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
        weights = torch.stack(used, 1)  # [B, pieces, E]
        self.record(
            Routing(
                inputs=x,
                probs=weights[:, torch.tensor(routed, device=x.device)],
                extra_stats={"routing_weights": weights},
            )
        )
        return torch.cat(outs, 1)


def _detach_merged(merged: Merged) -> Merged:
    """Decoding keeps merged weights across calls; they carry no graph between calls."""
    return tuple(w.detach() for w in merged)  # type: ignore[return-value]


class RemoteLory(RemoteMoE):
    """The custom-code export of Lory. With a cache (generation): route once on the mean of the prompt's
    real tokens, keep the merged expert on the cache for the decode steps (``prompt`` routing). Without
    one (scoring): the config's routing, causal ``segment`` routing as trained."""

    routes_on_prompt = True

    def forward(self, x, ctx):
        cache, layer, valid = ctx["cache"], ctx["layer"], ctx["valid"]
        B, L, d = x.shape
        if cache is not None or self.opt["routing"] == "prompt":  # one merged expert per row
            store = getattr(cache, "diffmoe_lory", None)  # layer -> merged experts, set at prefill
            if ctx["past"] > 0:
                if store is None or layer not in store:
                    raise ValueError("Lory decoding needs the cache of its prefill (the merged experts)")
                return remote_merged_swiglu(x, store[layer])
            w = valid.to(torch.promote_types(x.dtype, torch.float32)).unsqueeze(-1)
            mean = (x.to(w.dtype) * w).sum(1) / w.sum(1).clamp(min=1)  # over the prompt's real tokens
            merged = self.experts.merge(self.probs(mean))
            if cache is not None:
                if store is None:
                    store = cache.diffmoe_lory = {}
                store[layer] = [m.detach() for m in merged]
            return remote_merged_swiglu(x, merged)
        T, E = self.opt["segment_len"], self.E
        xp, means = remote_segments(x, T)
        N = xp.shape[1]
        probs = self.probs(means)  # [B, N, E]
        source = probs[:, :-1] if self.opt["routing"] == "segment" else probs[:, :1].expand(B, N - 1, E)
        first = torch.full_like(probs[:, 0], 1.0 / E) if self.opt["first_segment"] == "uniform" else probs[:, 0]
        weights = torch.cat([first.unsqueeze(1), source], 1).reshape(B * N, E)
        xs, out = xp.reshape(B * N, T, d), []
        for s in range(0, B * N, E):  # at most E merged experts at a time
            out.append(remote_merged_swiglu(xs[s : s + E], self.experts.merge(weights[s : s + E])))
        return torch.cat(out).view(B, N * T, d)[:, :L]


FAMILY = Family("lory", LoryMoE, LoryConfig, remote=RemoteLory)
