"""What every MoE layer shares: a router, the experts, auxiliary losses and routing statistics.

A layer is called as ``layer(x)`` with x [batch, seq, d_model] and returns [batch, seq, d_model].
After each forward:

- ``layer.aux_losses``: dict name -> unscaled scalar loss (e.g. ``balance``, ``z``), with graph;
- ``layer.aux_loss``: the scaled sum to add to the LM loss (a zero tensor when there is none);
- ``layer.stats``: dict name -> detached tensor for logging and analysis (``load`` [E] is the
  fraction of routing mass or assignments per expert, ``mean_weight`` [E] the mean router
  probability; each family adds its own, see the layer's docstring).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from .experts import Experts


@dataclass
class RoutingContext:
    """Per-call routing information the decoder passes to every FFN (only Lory reads it).

    prompt_len: Lory ``prompt`` routing routes on the mean of the first ``prompt_len`` positions of
        the input (default: all of them), so a full forward can reproduce generation's routing.
    state: a dict owned by the layer that persists across the calls of one incremental decoding
        (it lives in the KV cache); None for an ordinary forward.
    """

    prompt_len: int | None = None
    state: dict | None = None


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in at least float32: router inputs and segment means are accumulated in it."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def check_arg(cond: bool, name: str, value, why: str) -> None:
    """Raise ConfigError naming the argument (layers use the config field names)."""
    if not cond:
        raise ConfigError(f"invalid config: {name}={value!r}: {why}")


class MoELayer(nn.Module):
    """Base class: ``router`` (nn.Linear d_model -> E, no bias) and ``experts`` (stacked SwiGLU)."""

    def __init__(self, d_model: int, d_ff: int, num_experts: int):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts)):
            check_arg(isinstance(value, int) and value >= 1, name, value, "must be a positive integer")
        self.d_model, self.d_ff, self.num_experts = d_model, d_ff, num_experts
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.experts = Experts(num_experts, d_model, d_ff)
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.stats: dict[str, torch.Tensor] = {}
        self.experts_per_token = 1.0  # experts whose FLOPs a token costs on average; set by each family
        nn.init.normal_(self.router.weight, std=0.02)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits in at least float32 (routing math is precision-sensitive). x [..., d] -> [..., E]."""
        x = upcast(x)
        return F.linear(x, self.router.weight.to(x.dtype))

    def _set_aux(self, losses: dict[str, tuple[torch.Tensor, float]], ref: torch.Tensor) -> None:
        """Record unscaled losses and their coefficient-weighted sum (skipping zero coefficients)."""
        self.aux_losses = {name: value for name, (value, _) in losses.items()}
        total = ref.new_zeros((), dtype=torch.float32)
        for value, coef in losses.values():
            if coef:
                total = total + coef * value
        self.aux_loss = total


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


def token_choice_stats(probs: torch.Tensor, expert_idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Detached statistics shared by token-choice families. probs [N, E]; expert_idx [A]."""
    E = probs.shape[-1]
    counts = torch.bincount(expert_idx.detach(), minlength=E).float()
    return {
        "load": counts / counts.sum().clamp(min=1),
        "mean_weight": probs.detach().mean(0),
        "entropy": -(probs.detach() * probs.detach().clamp_min(1e-20).log()).sum(-1).mean(),
    }
