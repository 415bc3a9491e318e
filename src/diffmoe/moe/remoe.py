"""ReMoE: fully differentiable MoE with ReLU routing (Wang et al., ICLR 2025, arXiv 2412.14711).

For router logits z = x W_r of one token, the gates are R = ReLU(z) and the output is
y = sum_e R_e * expert_e(x): a token runs the experts whose gate is positive, a number that varies by
token and layer, and the routing is continuous (an expert's gate reaches zero smoothly), so the router
learns from the language-modelling loss through every gate. Sparsity is steered by an L1 penalty on the
gates whose coefficient adapts once per optimizer step:

- penalty (``load_balance``, the paper's Eq. 8, ReMoE's default): L = E / (k T^2) sum_e c_e sum_t R_te over
  the layer's T tokens, c_e the count of tokens with R_te > 0 (no gradient): an L1 norm weighted by each
  expert's load, so overloaded experts are pushed harder; without ``load_balance`` (Eq. 6):
  L = (1/T) sum_t sum_e R_te. Summed over layers, like every auxiliary loss here (the paper averages
  over layers: a factor the adaptive coefficient absorbs).
- coefficient (Eq. 7): lambda_{i+1} = lambda_i * alpha ** sign(S_target - S_i), S_i the share of zero
  gates over all ReMoE layers, micro-batches and data-parallel ranks of step i, S_target = 1 - k/E, so the
  layers activate k of E experts per token on average. lambda_0 = 1e-8, alpha = 1.2 (the paper's values).
  One coefficient for all layers, held by each layer as the float64 buffer ``l1_coef`` (float32 would
  underflow within a few hundred steps of a sparsity above target and then never recover; the loss uses
  it in float32, where it may round to 0), in checkpoints: a resumed
  run continues it exactly) and updated by :meth:`ReMoE.post_step`, which the trainer calls after every
  optimizer step (a step skipped for a non-finite loss updates it too, from that step's gates).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..schema import check, positive_int
from .base import MoELayer, family_config
from .family import Family
from .remote import RemoteMoE, dispatch_top
from .routing import Capabilities, Routing, RoutingContext


@dataclass
class ReMoEConfig:
    """ReLU routing with an adaptive L1 penalty (ReMoE, arXiv 2412.14711)."""

    top_k: int = 2
    """k: the experts a token activates on average, set through the target sparsity 1 - k/E."""
    l1_coef_init: float = 1e-8
    """lambda_0, the L1 coefficient of the first step."""
    l1_multiplier: float = 1.2
    """alpha: the coefficient is multiplied (sparsity below target) or divided by it after every step."""
    load_balance: bool = True
    """Weight each expert's L1 term by its load (the paper's Eq. 8); False: the plain L1 norm (Eq. 6)."""

    def validate(self, num_experts: int | None = None) -> None:
        check(positive_int(self.top_k), "top_k", self.top_k, "must be a positive integer")
        if positive_int(num_experts):
            check(
                self.top_k < num_experts,
                "top_k",
                self.top_k,
                f"must be below num_experts={num_experts} (the target sparsity 1 - k/E must be positive)",
            )
        check(self.l1_coef_init > 0, "l1_coef_init", self.l1_coef_init, "must be positive")
        check(self.l1_multiplier > 1, "l1_multiplier", self.l1_multiplier, "must be above 1")


class ReMoE(MoELayer):
    """ReLU-routed MoE layer, dropless (see the module docstring). x [B, L, d] -> [B, L, d].

    Losses: ``l1`` (the penalty above) with the adaptive ``l1_coef``.
    Stats: the shared ones (``load``: share of the positive gates per expert; ``mean_weight``, ``entropy``:
    of each token's gates normalised to sum 1), ``sparsity`` (share of zero gates), ``active`` (experts per
    token) and ``l1_coef``.
    """

    expert_sharding = "ep"
    shared_options = ("dispatch_impl",)
    loss_coefs = {"l1": "l1_weight"}
    logged_stats = {"sparsity": None, "active": None, "l1_coef": None}

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int = 8,
        config: ReMoEConfig | None = None,
        *,
        dispatch_impl: str = "auto",
        **options,
    ):
        config = family_config(ReMoEConfig, config, options, num_experts)
        super().__init__(d_model, d_ff, num_experts, dispatch_impl=dispatch_impl)
        self.top_k, self.load_balance, self.l1_multiplier = config.top_k, config.load_balance, config.l1_multiplier
        self.target_sparsity = 1.0 - config.top_k / num_experts
        self.experts_per_token = float(config.top_k)
        self.register_buffer("l1_coef", torch.tensor(config.l1_coef_init, dtype=torch.float64))
        self._zero_gates: torch.Tensor | None = None  # zero and all gates of the training forwards of this step

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(dense_gradients=False)

    @property
    def l1_weight(self) -> torch.Tensor:
        """The coefficient as the loss uses it (float32)."""
        return self.l1_coef.float()

    def route(self, x: torch.Tensor, ctx: RoutingContext) -> Routing:
        xf = x.reshape(-1, x.shape[-1])  # [N, d]
        logits = self.router(xf)  # [N, E] float32
        gates = logits.relu()
        token_idx, expert_idx = (gates > 0).nonzero(as_tuple=True)
        zero = (gates.detach() == 0).sum()
        if self.training and torch.is_grad_enabled():
            counted = torch.stack([zero, zero.new_full((), gates.numel())]).double()  # no copy from the host
            self._zero_gates = counted if self._zero_gates is None else self._zero_gates + counted
        share = gates / gates.sum(-1, keepdim=True).clamp_min(torch.finfo(gates.dtype).tiny)
        return Routing(
            inputs=xf,
            probs=share,
            token_idx=token_idx,
            expert_idx=expert_idx,
            gate=gates[token_idx, expert_idx],
            chosen=expert_idx,
            logits=logits,
            extra_stats={
                "sparsity": zero / gates.numel(),
                "active": (gates > 0).sum(-1).float().mean(),
                "l1_coef": self.l1_coef.clone(),
            },
        )  # the value this forward used

    def losses(self, routing: Routing) -> dict[str, torch.Tensor]:
        gates = routing.logits.relu()  # [T, E]
        T = gates.shape[0]
        if not self.load_balance:
            return {"l1": gates.sum(-1).mean()}
        counts = torch.bincount(routing.chosen, minlength=self.num_experts).to(gates.dtype)  # c_e
        return {"l1": self.num_experts / (self.top_k * T * T) * (counts * gates.sum(0)).sum()}

    @classmethod
    def post_step(cls, layers: list["ReMoE"], reduce) -> None:
        """lambda <- lambda * alpha ** sign(S_target - S) in every layer, S the share of zero gates of all of
        ``layers`` over the step's training forwards on every rank (``reduce`` sums over the ranks)."""
        counted = [layer._zero_gates for layer in layers if layer._zero_gates is not None]
        device = layers[0].l1_coef.device
        local = torch.stack(counted).sum(0) if counted else torch.zeros(2, dtype=torch.float64, device=device)
        zero, total = reduce(local.to(device))
        sparsity = zero / total.clamp_min(1)
        for layer in layers:
            layer._zero_gates = None
            step = layer.l1_multiplier ** torch.sign(layer.target_sparsity - sparsity)
            layer.l1_coef.mul_(torch.where(total > 0, step, 1.0))  # unchanged after a step without training forwards


class RemoteReMoE(RemoteMoE):
    """The custom-code export of ReMoE: every expert with a positive gate ReLU(x W_r), weighted by it."""

    def __init__(self, d, f, moe, opt):
        super().__init__(d, f, moe, opt)
        self.register_buffer("l1_coef", torch.zeros((), dtype=torch.float64))  # training state, unused here

    def forward(self, x, ctx):
        gates = self.logits(x.reshape(-1, x.shape[-1])).relu()  # [N, E]
        experts = torch.arange(self.E, device=x.device).expand_as(gates)
        return dispatch_top(self, x, gates, experts, (gates > 0) & ctx["valid"].reshape(-1, 1))


FAMILY = Family("remoe", ReMoE, ReMoEConfig, remote=RemoteReMoE)
