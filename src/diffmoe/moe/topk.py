"""Top-k token choice: Switch (k=1), GShard and Mixtral (k=2)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..schema import check, positive_int
from .base import MoELayer, family_config
from .family import Family, Native
from .remote import RemoteMoE, dispatch_top
from .routing import Capabilities, Routing, RoutingContext, balance_and_z


@dataclass
class TopKConfig:
    """Top-k token choice (Switch k=1, GShard / Mixtral k=2)."""

    top_k: int = 2
    renormalize: bool = True
    """Mixtral renormalises the k gates to sum to 1; Switch / GShard keep the raw softmax values."""
    capacity_factor: float | None = None
    """Training: None: dropless. A number c: each expert takes at most ceil(c * tokens * k / E)
    assignments of the batch, the overflow is dropped (its slot contributes zero; the residual carries
    the token). Not causal: a later token's choice can push out an earlier token's slot."""
    eval_capacity_factor: float | None = None
    """The same in eval mode (evaluation, export, generation); None: dropless, which is causal and
    independent of the rest of the batch (GShard also evaluates with its own capacity)."""

    def validate(self, num_experts: int | None = None) -> None:
        """Check the fields; given ``num_experts`` (the family is in use), also top_k <= num_experts."""
        check(positive_int(self.top_k), "top_k", self.top_k, "must be a positive integer")
        if positive_int(num_experts):
            check(self.top_k <= num_experts, "top_k", self.top_k, f"must be at most num_experts={num_experts}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            check(value is None or value > 0, name, value, "must be positive or null (dropless)")

    def check_training(self, context_len: int) -> list[str]:
        """Refuse a top-1 router that cannot learn; warn that an evaluation capacity makes held-out
        scores depend on the batch. Returns the warnings."""
        check(
            not (self.top_k == 1 and self.renormalize),
            "renormalize",
            self.renormalize,
            "with top_k=1 the renormalised gate is always 1, so the router would learn only from the balance "
            "loss; set renormalize: false (Switch) or top_k >= 2",
        )
        if self.eval_capacity_factor is None:
            return []
        return [
            f"eval_capacity_factor={self.eval_capacity_factor}: evaluation drops tokens by the rest of its "
            "batch, later tokens included, so held-out scores are not a causal likelihood (null: dropless)"
        ]


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
    Losses: ``balance`` = E * sum_i f_i P_i (f over assignments; see
    :func:`~diffmoe.moe.routing.balance_loss`) with ``balance_coef``, and the router ``z`` loss with
    ``z_loss_coef``. ``capacity_factor`` c (optional, training; ``eval_capacity_factor`` in eval mode)
    caps each expert at ceil(c * N * k / E) assignments, GShard order; dropped slots contribute nothing
    (the residual carries the token).

    Stats: the shared ones (``load`` counts assignments before dropping) and ``dropped`` (share of
    assignments dropped).
    """

    expert_sharding = "ep"
    shared_options = ("balance_coef", "z_loss_coef", "global_balance", "dispatch_impl")
    loss_coefs = {"balance": "balance_coef", "z": "z_loss_coef"}
    logged_stats = {"dropped": None}

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int = 8,
        config: TopKConfig | None = None,
        *,
        balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        global_balance: bool = True,
        dispatch_impl: str = "auto",
        **options,
    ):
        config = family_config(TopKConfig, config, options, num_experts)
        super().__init__(d_model, d_ff, num_experts, balance_coef, z_loss_coef, global_balance, dispatch_impl)
        self.top_k, self.renormalize = config.top_k, config.renormalize
        self.capacity_factor, self.eval_capacity_factor = config.capacity_factor, config.eval_capacity_factor
        self.experts_per_token = float(config.top_k)

    @property
    def capacity_in_force(self) -> float | None:
        """The capacity factor of the current mode: ``capacity_factor`` in training, else ``eval_capacity_factor``."""
        return self.capacity_factor if self.training else self.eval_capacity_factor

    @property
    def capabilities(self) -> Capabilities:
        # a capacity makes a token's slots depend on the batch; decoding runs in eval mode
        return Capabilities(
            causal_from=0 if self.capacity_in_force is None else None,
            global_counts=self.global_balance,
            incremental_decoding=self.eval_capacity_factor is None,
            dense_gradients=False,
        )

    def route(self, x: torch.Tensor, ctx: RoutingContext) -> Routing:
        xf = x.reshape(-1, x.shape[-1])  # [N, d]
        N = xf.shape[0]
        logits = self.router(xf)  # [N, E] float32
        probs = logits.softmax(-1)
        gate, idx = probs.topk(self.top_k, dim=-1)  # [N, k]
        if self.renormalize:
            gate = gate / gate.sum(-1, keepdim=True)
        token_idx = torch.arange(N, device=x.device).repeat_interleave(self.top_k)
        chosen, flat_gate = idx.reshape(-1), gate.reshape(-1)
        expert_idx, extra = chosen, {}
        factor = self.capacity_in_force
        if factor is not None:
            capacity = math.ceil(factor * N * self.top_k / self.num_experts)
            keep = capacity_keep_mask(idx, self.num_experts, capacity).reshape(-1)
            token_idx, expert_idx, flat_gate = token_idx[keep], chosen[keep], flat_gate[keep]
            extra["dropped"] = 1.0 - keep.float().mean()
        return Routing(
            inputs=xf,
            probs=probs,
            token_idx=token_idx,
            expert_idx=expert_idx,
            gate=flat_gate,
            chosen=chosen,
            logits=logits,
            extra_stats=extra,
        )

    def losses(self, routing: Routing) -> dict[str, torch.Tensor]:
        return balance_and_z(routing, self.global_balance)


class RemoteTopK(RemoteMoE):
    """The custom-code export of top-k: dropless, or the evaluation capacity in GShard order."""

    def __init__(self, d, f, moe, opt):
        super().__init__(d, f, moe, opt)
        self.decodes = opt.get("eval_capacity_factor") is None

    def forward(self, x, ctx):
        B, L, d = x.shape
        k, valid = self.opt["top_k"], ctx["valid"].reshape(-1)
        gate, idx = self.probs(x.reshape(-1, d)).topk(k, dim=-1)  # [N, k]
        if self.opt["renormalize"]:
            gate = gate / gate.sum(-1, keepdim=True)
        keep = valid.unsqueeze(1).expand_as(idx)
        if not self.decodes:  # every slot 1 before any slot 2
            if ctx["cache"] is not None:
                raise ValueError("top-k with an evaluation capacity cannot decode token by token")
            capacity = math.ceil(self.opt["eval_capacity_factor"] * int(valid.sum()) * k / self.E)
            onehot = F.one_hot(idx.t().reshape(-1), self.E) * keep.t().reshape(-1, 1)
            position = (onehot.cumsum(0) * onehot).sum(-1) - 1
            keep = keep & (position < capacity).view(k, -1).t()
        return dispatch_top(self, x, gate, idx, keep)


def _native(config: TopKConfig) -> dict[str, dict] | str:
    if config.eval_capacity_factor is not None:
        return (
            f"moe.topk.eval_capacity_factor={config.eval_capacity_factor} drops tokens, but the native "
            "transformers MoE classes are dropless"
        )
    qwen = {"num_experts_per_tok": config.top_k, "norm_topk_prob": bool(config.renormalize)}
    return (
        {"mixtral": {"num_experts_per_tok": config.top_k}, "qwen2_moe": qwen}
        if config.renormalize
        else {"qwen2_moe": qwen}
    )


FAMILY = Family(
    "topk",
    TopKMoE,
    TopKConfig,
    remote=RemoteTopK,
    native=Native(
        _native,
        imports={
            "mixtral": lambda c: TopKConfig(top_k=c.get("num_experts_per_tok", 2), renormalize=True),
            "qwen2_moe": lambda c: TopKConfig(
                top_k=c.get("num_experts_per_tok", 2), renormalize=bool(c.get("norm_topk_prob", False))
            ),
        },
    ),
)
