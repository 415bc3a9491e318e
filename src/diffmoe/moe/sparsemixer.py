"""SparseMixer-v2 top-2 routing (GRIN, arXiv 2409.12136).

For router logits z of one token:

1. band: keep expert i when (z* - z_i) / max(|z_i|, z*) <= 2 * jitter_eps (z* = max z), computed
   without gradient; p = softmax of z with the others at -inf.
2. slot 1: D1 ~ p by Gumbel-max in training, argmax in eval; gate w1 = p_D1.
3. slot 2: z_D1 := -inf, rebuild the band around the new maximum (the scale still uses the original
   |z_i|, as transformers' reference does), sample or argmax D2 from its masked softmax p'; w2 = p'_D2.
   Gates are not renormalised: a lone expert in its band has gate 1.
4. Heun switch (training): s = 1 when D is the band's argmax, else s = 1 with probability 1/4 and
   1/3 with probability 3/4. The multiplier m = w * s comes from :class:`HeunMultiplier`, whose
   backward returns g * p_D * (onehot(D) - p) for upstream g — the masked-softmax Jacobian row of D,
   whatever s is. With s = 1 that is the exact derivative of the forward value; with s = 1/3 it is
   deliberately 3x that derivative (the mid-point node of the estimator).

Deviation from transformers' reference: s is exactly 1/3 here (transformers uses 0.3333), and the
input jitter is applied once to the layer input (transformers' block applies it in the block and
again in the router).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..schema import check, positive_int
from .base import MoELayer, family_config
from .family import Family, Native
from .remote import RemoteMoE, dispatch_top
from .routing import Capabilities, Routing, RoutingContext, balance_and_z

HEUN_P_ONE = 0.25  # probability that s = 1 when the sampled expert is not the band's argmax


@dataclass
class SparseMixerConfig:
    """SparseMixer-v2 top-2 routing (GRIN, arXiv 2409.12136)."""

    jitter_eps: float = 0.01
    """Band half-width: expert i stays in the band when (z* - z_i) / max(|z_i|, z*) <= 2 * jitter_eps."""
    input_jitter_eps: float = 0.01
    """Training only: the layer input is multiplied by U(1 - eps, 1 + eps). 0 disables it."""

    def validate(self, num_experts: int | None = None) -> None:
        """Check the fields; given ``num_experts`` (the family is in use), also that there are two."""
        if positive_int(num_experts):
            check(
                num_experts >= 2, "num_experts", num_experts, "SparseMixer-v2 routes to 2 experts and needs at least 2"
            )
        check(self.jitter_eps >= 0, "jitter_eps", self.jitter_eps, "must be >= 0")
        check(0 <= self.input_jitter_eps < 1, "input_jitter_eps", self.input_jitter_eps, "must be in [0, 1)")


class HeunMultiplier(torch.autograd.Function):
    """m = p_D * s with the SparseMixer-v2 backward.

    forward(logits [N, E], band [N, E] bool, selected [N, 1] int64, scale [N, 1]) -> m [N, 1], where
    p = softmax(logits masked to the band). backward gives logits the gradient g * p_D * (onehot(D) - p)
    and nothing to the other inputs.
    """

    @staticmethod
    def forward(ctx, logits, band, selected, scale):
        p = logits.masked_fill(~band, float("-inf")).softmax(-1)
        p_d = p.gather(-1, selected)
        ctx.save_for_backward(p, p_d, selected)
        return p_d * scale

    @staticmethod
    def backward(ctx, grad_m):
        p, p_d, selected = ctx.saved_tensors
        g = grad_m * p_d  # [N, 1]
        grad_logits = (-g) * p
        grad_logits = grad_logits.scatter_add(-1, selected, g)
        return grad_logits, None, None, None


def band_mask(logits: torch.Tensor, scale_ref: torch.Tensor, jitter_eps: float) -> torch.Tensor:
    """Experts within the jitter band of the row maximum. logits [N, E] (may hold -inf) -> bool [N, E].

    scale_ref: the original logits, whose |z_i| sets the relative scale max(|z_i|, z*).
    """
    with torch.no_grad():
        top = logits.max(-1, keepdim=True).values
        factor = scale_ref.abs().clamp(min=top)
        # written as "not outside" so that 0/0 (all-zero logits) keeps the expert, as the reference does
        return ~(((top - logits) / factor) > 2 * jitter_eps)


def sparsemixer_route(
    logits: torch.Tensor, jitter_eps: float, training: bool, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SparseMixer-v2 top-2 routing of router logits [N, E].

    Returns (multiplier [N, 2] with the custom gradient, experts [N, 2] int64,
    band_size [N, 2] int64 — experts in each slot's band).
    """
    mults, experts, band_sizes = [], [], []
    scores = logits
    for _ in range(2):
        band = band_mask(scores, logits, jitter_eps)
        with torch.no_grad():
            masked = scores.masked_fill(~band, float("-inf"))
            argmax = masked.argmax(-1, keepdim=True)
            if training:
                gumbel = -torch.empty_like(masked).exponential_(generator=generator).log()
                selected = (masked + gumbel).argmax(-1, keepdim=True)
                u = torch.rand(selected.shape, device=logits.device, generator=generator)
                keep_one = (selected == argmax) | (u < HEUN_P_ONE)
                scale = torch.where(keep_one, 1.0, 1.0 / 3.0).to(logits.dtype)
            else:
                selected, scale = argmax, torch.ones_like(argmax, dtype=logits.dtype)
        mults.append(HeunMultiplier.apply(logits, band, selected, scale))
        experts.append(selected)
        band_sizes.append(band.sum(-1, keepdim=True))
        scores = scores.scatter(-1, selected, float("-inf")).detach()
    return torch.cat(mults, -1), torch.cat(experts, -1), torch.cat(band_sizes, -1)


class SparseMixerMoE(MoELayer):
    """Top-2 MoE routed by SparseMixer-v2 (see the module docstring), dropless.

    Losses: ``balance`` = E * sum_i f_i P_i (f over both slots' assignments, all-reduced across
    data-parallel ranks when ``global_balance``; P from the full softmax) with ``balance_coef``;
    router ``z`` loss with ``z_loss_coef``.
    Stats: the shared ones and ``band_multi`` [2]: the share of tokens whose band holds more than one
    expert, per slot (only those send task gradient to the router).
    """

    expert_sharding = "ep"
    shared_options = ("balance_coef", "z_loss_coef", "global_balance", "dispatch_impl")
    loss_coefs = {"balance": "balance_coef", "z": "z_loss_coef"}
    logged_stats = {"band_multi": ("slot1", "slot2")}

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int = 16,
        config: SparseMixerConfig | None = None,
        *,
        balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        global_balance: bool = True,
        dispatch_impl: str = "auto",
        **options,
    ):
        config = family_config(SparseMixerConfig, config, options, num_experts)
        super().__init__(d_model, d_ff, num_experts, balance_coef, z_loss_coef, global_balance, dispatch_impl)
        self.jitter_eps, self.input_jitter_eps = config.jitter_eps, config.input_jitter_eps
        self.experts_per_token = 2.0

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(global_counts=self.global_balance, dense_gradients=False)

    def route(self, x: torch.Tensor, ctx: RoutingContext) -> Routing:
        xf = x.reshape(-1, x.shape[-1])  # [N, d]
        if self.training and self.input_jitter_eps > 0:
            noise = torch.empty_like(xf).uniform_(1.0 - self.input_jitter_eps, 1.0 + self.input_jitter_eps)
            xf = xf * noise
        logits = self.router(xf)  # [N, E] float32
        mult, idx, band_size = sparsemixer_route(logits, self.jitter_eps, self.training)
        token_idx = torch.arange(xf.shape[0], device=x.device).repeat_interleave(2)
        expert_idx = idx.reshape(-1)
        return Routing(
            inputs=xf,
            probs=logits.softmax(-1),
            token_idx=token_idx,
            expert_idx=expert_idx,
            gate=mult.reshape(-1),
            chosen=expert_idx,
            logits=logits,
            extra_stats={"band_multi": (band_size > 1).float().mean(0)},
        )

    def losses(self, routing: Routing) -> dict[str, torch.Tensor]:
        return balance_and_z(routing, self.global_balance)


class RemoteSparseMixer(RemoteMoE):
    """The custom-code export of SparseMixer-v2 in eval mode: deterministic top-2, each gate the slot's
    masked-softmax probability."""

    def forward(self, x, ctx):
        d = x.shape[-1]
        logits = self.logits(x.reshape(-1, d))
        scores, gates, picks = logits, [], []
        for _ in range(2):
            top = scores.max(-1, keepdim=True).values
            band = ~(((top - scores) / logits.abs().clamp(min=top)) > 2 * self.opt["jitter_eps"])
            sel = scores.masked_fill(~band, float("-inf")).argmax(-1, keepdim=True)
            gates.append(logits.masked_fill(~band, float("-inf")).softmax(-1).gather(-1, sel))
            picks.append(sel)
            scores = scores.scatter(-1, sel, float("-inf"))
        gate, idx = torch.cat(gates, -1), torch.cat(picks, -1)
        return dispatch_top(self, x, gate, idx, ctx["valid"].reshape(-1, 1).expand_as(idx))


FAMILY = Family(
    "sparsemixer",
    SparseMixerMoE,
    SparseMixerConfig,
    remote=RemoteSparseMixer,
    native=Native(
        lambda config: {
            "phimoe": {
                "num_experts_per_tok": 2,
                "router_jitter_noise": float(config.jitter_eps),
                "input_jitter_noise": 0.0,
            }
        }
    ),
)
