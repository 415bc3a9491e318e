"""MoE layers. Each routing family decides which experts run with which weights; the experts
container (:class:`Experts`) and the dispatch path are shared.

    LoryMoE          expert merging with causal segment routing (Lory)
    TopKMoE          top-k token choice (Switch, GShard, Mixtral)
    SparseMixerMoE   top-2 with the SparseMixer-v2 gradient estimator (GRIN)
    ExpertChoiceMoE  expert choice, token or segment level
    SwiGLU           the dense FFN baseline
"""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from .base import MoELayer, RoutingContext, balance_loss, z_loss
from .experts import Experts, SwiGLU
from .expert_choice import ExpertChoiceMoE
from .lory import LoryMoE
from .sparsemixer import HeunMultiplier, SparseMixerMoE, sparsemixer_route
from .topk import TopKMoE

__all__ = [
    "Experts", "SwiGLU", "MoELayer", "RoutingContext", "LoryMoE", "TopKMoE", "SparseMixerMoE",
    "ExpertChoiceMoE", "HeunMultiplier", "sparsemixer_route", "balance_loss", "z_loss", "build_ffn",
]


def build_ffn(kind: str, cfg: ModelConfig) -> nn.Module:
    """The FFN of one decoder layer, from the model config (``kind`` is one of ``FFN_KINDS``)."""
    moe = cfg.moe
    d_ff = moe.d_ff or cfg.d_ff
    E = moe.num_experts
    if kind == "dense":
        return SwiGLU(cfg.d_model, cfg.d_ff)
    if kind == "lory":
        return LoryMoE(cfg.d_model, d_ff, E, moe.lory.segment_len, moe.lory.first_segment, moe.lory.routing)
    if kind == "topk":
        return TopKMoE(cfg.d_model, d_ff, E, moe.topk.top_k, moe.topk.renormalize, moe.topk.capacity_factor,
                       moe.balance_coef, moe.z_loss_coef, moe.global_balance, moe.dispatch)
    if kind == "sparsemixer":
        return SparseMixerMoE(cfg.d_model, d_ff, E, moe.sparsemixer.jitter_eps, moe.sparsemixer.input_jitter_eps,
                              moe.balance_coef, moe.z_loss_coef, moe.global_balance, moe.dispatch)
    if kind == "expert_choice":
        ec = moe.expert_choice
        return ExpertChoiceMoE(cfg.d_model, d_ff, E, ec.capacity_factor, ec.granularity, ec.segment_len,
                               moe.dispatch)
    raise ValueError(f"invalid config: ffn={kind!r}: unknown FFN kind")
