"""The MoE layer every routing family builds on: router, experts, and the forward that wires them.

A layer is called as ``layer(x)`` with x [batch, seq, d_model] and returns [batch, seq, d_model]. A
family implements ``route`` (which experts, with which weights: a :class:`~diffmoe.moe.routing.Routing`)
and declares what generic code reads of it: its auxiliary losses (:meth:`MoELayer.losses`, each scaled
by the layer attribute :attr:`MoELayer.loss_coefs` names), the statistics worth logging
(:attr:`MoELayer.logged_stats`), its :class:`~diffmoe.moe.routing.Capabilities` and, optionally, an
update after every optimizer step (:meth:`MoELayer.post_step`). The base class runs the experts and records,
after each forward:

- ``layer.aux_losses``: dict name -> unscaled scalar loss, with graph;
- ``layer.aux_loss``: the scaled sum to add to the LM loss (a zero tensor when there is none);
- ``layer.stats``: dict name -> detached tensor for logging and analysis
  (:func:`~diffmoe.moe.routing.routing_stats`).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
from torch import nn

from ..schema import check, positive_int
from .experts import Experts
from .router import Router
from .routing import Capabilities, Routing, RoutingContext, routing_stats


class MoELayer(nn.Module, abc.ABC):
    """Base class: ``router`` (:class:`Router`, d_model -> E), ``experts`` (:class:`Experts`).

    balance_coef, z_loss_coef: weights of the balance and router z losses, for families that train with
    them; global_balance: all-reduce the balance loss's counts over the data-parallel ranks;
    dispatch_impl: how dispatched tokens run (:func:`diffmoe.moe.dispatch.resolve_impl`). A family's
    constructor takes its config dataclass as it is, or that dataclass's fields as keywords
    (:func:`family_config`).
    """

    shared_options: ClassVar[tuple[str, ...]] = ()
    """The options of the shared ``moe`` config the layer takes (``balance_coef``, ``z_loss_coef``,
    ``global_balance``, ``dispatch_impl``), passed by :meth:`from_config`."""

    loss_coefs: ClassVar[dict[str, str]] = {}
    """Auxiliary loss name -> the layer attribute holding its coefficient (a float, or a tensor a
    :meth:`post_step` updates): ``aux_loss`` = sum of coefficient x :meth:`losses` [name]."""

    logged_stats: ClassVar[dict[str, tuple[str, ...] | None]] = {}
    """The family's own ``stats`` worth logging in training (besides the shared load, entropy and experts
    in use): name -> None for a scalar, or the labels of a vector's entries (logged as ``name_label``)."""

    expert_sharding: ClassVar[str | None] = None
    """How the experts of this family may be sharded across ranks besides FSDP (read by
    ``train.parallel`` validation and :func:`diffmoe.parallel.parallelize`): ``"ep"`` (whole experts
    per rank, tokens exchanged: families that dispatch tokens independently of the batch), ``"etp"``
    (every rank holds a d_ff slice of every expert, activations exchanged: families that merge
    experts) or None (data parallel only)."""

    merges_experts: ClassVar[bool] = False
    """True for a family whose ``route`` returns ``segment_weights``: each routing segment runs one
    expert merged in parameter space from all E (no token leaves its rank, the experts' gradients are
    dense); False (the default) for one that dispatches tokens to experts (``token_idx`` /
    ``expert_idx``). Read by generic code that models a layer's cost without running it (the planner,
    :mod:`diffmoe.parallel.plan`)."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        balance_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        global_balance: bool = False,
        dispatch_impl: str = "auto",
    ):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts)):
            check(positive_int(value), name, value, "must be a positive integer")
        self.d_model, self.d_ff, self.num_experts = d_model, d_ff, num_experts
        self.router = Router(d_model, num_experts)
        self.experts = Experts(num_experts, d_model, d_ff)
        self.balance_coef, self.z_loss_coef, self.global_balance = balance_coef, z_loss_coef, global_balance
        self.dispatch_impl = dispatch_impl
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.stats: dict[str, torch.Tensor] = {}
        self.experts_per_token = 1.0  # experts whose FLOPs a token costs on average; set by each family
        nn.init.normal_(self.router.weight, std=0.02)

    @classmethod
    def from_config(cls, d_model: int, d_ff: int, moe, config) -> "MoELayer":
        """The registry's constructor: the family's ``config`` as it is, the shared ``moe`` config's
        ``num_experts`` and ``d_ff`` (default: the model's ``d_ff``) and the options in
        :attr:`shared_options`."""
        shared = {
            "balance_coef": moe.balance_coef,
            "z_loss_coef": moe.z_loss_coef,
            "global_balance": moe.global_balance,
            "dispatch_impl": moe.dispatch,
        }
        return cls(
            d_model,
            moe.d_ff or d_ff,
            moe.num_experts,
            config=config,
            **{name: shared[name] for name in cls.shared_options},
        )

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    def reset_parameters(
        self, std: float = 0.02, out_std: float | None = None, router_std: float | None = None
    ) -> None:
        """Experts ~ N(0, std) (w2: out_std), router ~ N(0, router_std or std)."""
        self.experts.reset_parameters(std, out_std)
        nn.init.normal_(self.router.weight, std=router_std or std)

    # ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def route(self, x: torch.Tensor, ctx: RoutingContext) -> Routing:
        """Which experts, with which weights, for x [B, L, d]: what each family implements."""

    def losses(self, routing: Routing) -> dict[str, torch.Tensor]:
        """The unscaled auxiliary losses of one call's routing, one per name of :attr:`loss_coefs` (none
        by default)."""
        return {}

    @classmethod
    def post_step(cls, layers: list["MoELayer"], reduce) -> None:
        """Called by the trainer after every optimizer step (applied or skipped for a non-finite loss or
        gradient), on every rank, once per layer class with all of
        the model's layers of the class: the place for state that changes once per step (a loss coefficient
        steered by the step's statistics, shared by the layers). ``reduce(tensor) -> tensor`` sums a tensor
        over the ranks, so that every rank updates alike; every rank must call it the same number of times.
        Nothing by default."""

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        """x [B, L, d] -> [B, L, d]; the auxiliary losses go to ``ctx.aux`` when it is set."""
        B, L, d = x.shape
        ctx = ctx or RoutingContext()
        routing = self.route(x, ctx)
        if routing.segment_weights is not None:
            y = self.experts.forward_merged(routing.inputs, routing.segment_weights)
        else:
            y = self.experts(routing.inputs, routing.token_idx, routing.expert_idx, routing.gate, self.dispatch_impl)
        self.record(routing)
        if ctx.aux is not None:
            ctx.aux.add(self.aux_loss, self.aux_losses)
        return y.reshape(B, -1, d)[:, :L]

    def record(self, routing: Routing) -> None:
        """Set ``aux_losses``, ``aux_loss`` and ``stats`` from one call's routing."""
        self.aux_losses = self.losses(routing)
        total = routing.inputs.new_zeros((), dtype=torch.float32)
        for name, value in self.aux_losses.items():
            coef = getattr(self, self.loss_coefs[name])
            if isinstance(coef, torch.Tensor) or coef:
                total = total + coef * value
        self.aux_loss = total
        self.stats = routing_stats(routing, self.num_experts)


def family_config(cls: type, config: Any, options: dict[str, Any], num_experts: int) -> Any:
    """A family layer's config: ``config`` as given, or ``cls(**options)`` built from keywords (not both),
    validated against ``num_experts``."""
    if config is None:
        config = cls(**options)
    elif options:
        raise TypeError(f"pass a {cls.__name__} or its fields as keywords, not both (got {', '.join(options)})")
    config.validate(num_experts)
    return config
