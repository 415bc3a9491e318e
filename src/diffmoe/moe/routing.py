"""What a routing family returns, and the one place auxiliary losses and statistics come from.

A family's ``route`` decides *which experts with which weights* and returns a :class:`Routing`; the
layer runs the experts on it (:class:`diffmoe.moe.base.MoELayer`), and :meth:`MoELayer.losses` and
:func:`routing_stats` turn the same object into the losses to train with and the statistics to log.
:class:`Capabilities` is what generic code may ask of any FFN layer instead of testing its class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class RoutingContext:
    """Per-call information the decoder passes to every FFN.

    prompt_len: ``prompt`` routing routes on the mean of the first ``prompt_len`` positions of the
        input (default: all of them), so a full forward can reproduce generation's routing.
    state: a dict owned by the layer that persists across the calls of one incremental decoding
        (it lives in the KV cache); None for an ordinary forward.
    mask: [B, L] bool, False at the padding of a padded batch (left-padded prompts): a layer keeps it
        out of its routing means, or refuses padding it cannot route around; None when there is none.
    aux: see below.
    """

    prompt_len: int | None = None
    state: dict | None = None
    mask: torch.Tensor | None = None
    aux: "AuxLosses | None" = None
    """Collects the auxiliary losses of the forward (training passes one); None: not collected."""


class AuxLosses:
    """The auxiliary losses of one forward, collected from every MoE layer: ``total`` (the scaled sum to add
    to the LM loss, float32, with graph) and ``unscaled`` (name -> sum over layers, detached)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.unscaled: dict[str, torch.Tensor] = {}

    def add(self, scaled: torch.Tensor, unscaled: dict[str, torch.Tensor]) -> None:
        self.total = scaled if self.total is None else self.total + scaled.to(self.total.device)
        for name, value in unscaled.items():
            value = value.detach().float()
            self.unscaled[name] = value if name not in self.unscaled else self.unscaled[name] + value

    def sum(self, like: torch.Tensor) -> torch.Tensor:
        """``total``, or a float32 zero on ``like``'s device when no layer added one."""
        return self.total if self.total is not None else like.new_zeros((), dtype=torch.float32)


@dataclass(frozen=True)
class Capabilities:
    """What generic code (decoder, trainer, evaluation, parallelism) may ask of an FFN layer."""

    causal_from: int | None = 0
    """In the layer's current mode (``train()`` or ``eval()``), outputs at positions >= ``causal_from``
    depend on no later position of their sequence. None: not causal at all (the output depends on the
    rest of the batch)."""
    routing_modes: tuple[str, ...] = ()
    """Inference routing modes the layer can be switched to through ``layer.routing``; empty when the
    layer routes one fixed way."""
    segment_len: int | None = None
    """Tokens per routing decision of a layer that routes segments (the default prompt length of
    ``prompt`` routing); None when it routes tokens."""
    global_counts: bool = False
    """The forward all-reduces routing counts over the data-parallel ranks, so every rank must run
    every forward call of the layer (GRIN's global balance)."""
    incremental_decoding: bool = True
    """Decoding token by token with the KV cache (after a prompt that covers the first routing segment)
    gives what the full forward gives."""
    dense_gradients: bool = True
    """Every parameter gets a gradient in every training step (DDP need not search for unused ones)."""


@dataclass
class Routing:
    """One call's routing decision. How the experts run is one of:

    - dispatched tokens: ``inputs`` [N, d] and assignments ``token_idx``, ``expert_idx`` [A] int64 with
      weights ``gate`` [A]: assignment a sends token ``token_idx[a]`` to expert ``expert_idx[a]``;
    - merged experts: ``inputs`` [S, T, d] segments and ``segment_weights`` [S, E]: segment s runs the
      expert sum_i segment_weights[s, i] * W_i.

    The layer's output is that result read back as [B, -1, d] and cut to the input's length, so a
    family that pads the sequence to whole segments pads ``inputs`` at the end of each sequence.

    What the losses and statistics come from:

    - ``probs`` [..., E]: the router's weights of the routed items (tokens, or segments), items along
      the leading dimensions;
    - ``chosen`` [A'] int64: the expert of every assignment chosen, before a capacity drops any
      (discrete routing); None for merged experts, whose load is their mean weight;
    - ``logits`` [n, E]: the router's logits, for families whose losses need them;
    - ``extra_stats``: the family's own statistics (detached when recorded).

    A family computes nothing here that it does not need: under ``torch.compile`` every tensor created
    before the experts run is an output of the compiled graph, so statistics are derived (and detached)
    afterwards, by :func:`routing_stats`.
    """

    inputs: torch.Tensor
    probs: torch.Tensor
    token_idx: torch.Tensor | None = None
    expert_idx: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    segment_weights: torch.Tensor | None = None
    chosen: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    extra_stats: dict[str, torch.Tensor] = field(default_factory=dict)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in at least float32: router inputs and segment means are accumulated in it."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def segment_means(x: torch.Tensor, segment_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut every sequence into N = ceil(L / T) segments, the last zero-padded.

    x [B, L, d] -> (segments [B, N, T, d] in x's dtype, means [B, N, d] in at least float32 over each
    segment's real tokens).
    """
    B, L, d = x.shape
    T = segment_len
    N = math.ceil(L / T)
    xp = F.pad(x, (0, 0, 0, N * T - L)).view(B, N, T, d)
    counts = (L - torch.arange(N, device=x.device) * T).clamp(max=T)  # tokens per segment [N]
    return xp, upcast(xp).sum(2) / counts.view(1, N, 1)


def balance_loss(probs: torch.Tensor, expert_idx: torch.Tensor, global_counts: bool) -> torch.Tensor:
    """Switch / GShard load-balancing loss ``E * sum_i f_i * P_i`` (unscaled; 1.0 when uniform).

    probs: [N, E] full softmax router probabilities; P_i = probs[:, i].mean().
    expert_idx: [A] chosen expert of every assignment; f_i = share of assignments to expert i.
    With ``global_counts`` and an initialised process group, the counts are all-reduced across ranks
    before f is formed (GRIN's global balance); P and the gradient stay local.
    Note: transformers' Mixtral loss uses per-slot token fractions, i.e. k times this value for top-k.
    """
    E = probs.shape[-1]
    counts = torch.bincount(expert_idx, minlength=E).to(probs.dtype)
    if global_counts and dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    f = counts / counts.sum().clamp(min=1)
    return E * (f * probs.mean(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(z)^2. logits [N, E] -> scalar."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def balance_and_z(routing: Routing, global_counts: bool) -> dict[str, torch.Tensor]:
    """The unscaled ``balance`` (over ``chosen``) and router ``z`` losses of a token-choice routing that
    set ``logits``: what top-k and SparseMixer-v2 train with."""
    return {"balance": balance_loss(routing.probs, routing.chosen, global_counts), "z": z_loss(routing.logits)}


def usage_threshold(num_experts: int) -> float:
    """An expert is in use for a segment when its merge weight exceeds 2/E (the Lory paper's criterion)."""
    return 2.0 / num_experts


def routing_stats(routing: Routing, num_experts: int) -> dict[str, torch.Tensor]:
    """Detached statistics of one call.

    Every layer: ``load`` [E] (share of assignments; for merged experts the mean weight),
    ``mean_weight`` [E] (mean router weight), ``entropy`` (mean routing entropy) and ``experts_in_use``
    (discrete routing: experts with load > 1/(2E); merged experts: experts whose weight exceeds
    :func:`usage_threshold` in at least one segment). Merged experts add ``usage`` [E] (share of routed
    segments above the threshold) and ``routed_segment_weights`` [n, E] (every routed segment's
    weights; when no segment was routed, the only statistic besides the family's). Then the family's
    ``extra_stats``.
    """
    E = num_experts
    probs = routing.probs.detach().reshape(-1, E)
    entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1).mean()
    if routing.chosen is not None:
        counts = torch.bincount(routing.chosen.detach(), minlength=E).float()
        load = counts / counts.sum().clamp(min=1)
        stats = {
            "load": load,
            "mean_weight": probs.mean(0),
            "entropy": entropy,
            "experts_in_use": (load > 1 / (2 * E)).sum(),
        }
    else:
        stats = {"routed_segment_weights": probs}
        if probs.numel():
            mean = probs.mean(0)
            usage = (probs > usage_threshold(E)).float().mean(0)
            stats.update(mean_weight=mean, load=mean, usage=usage, entropy=entropy, experts_in_use=(usage > 0).sum())
    stats.update({name: value.detach() for name, value in routing.extra_stats.items()})
    return stats
