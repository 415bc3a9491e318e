"""MoE layers. Each routing family decides which experts run with which weights (``route``); the
router, the experts container and the dispatch and merge ops are shared, and so are the auxiliary
losses and statistics computed from what a family returns.

    LoryMoE          expert merging with causal segment routing (Lory)
    TopKMoE          top-k token choice (Switch, GShard, Mixtral)
    SparseMixerMoE   top-2 with the SparseMixer-v2 gradient estimator (GRIN)
    ExpertChoiceMoE  expert choice, token or segment level
    SwiGLU           the dense FFN baseline

``FAMILIES`` maps each config ``ffn`` kind to its :class:`Family` (layer, config, export);
``register`` adds one.
"""

from __future__ import annotations

from .base import MoELayer
from .config import MoEConfig
from .dense import SwiGLU
from .expert_choice import ExpertChoiceConfig, ExpertChoiceMoE
from .experts import Experts
from .family import Family, Native
from .lory import LoryConfig, LoryMoE
from .registry import FAMILIES, build_ffn, register
from .router import Router
from .routing import AuxLosses, Capabilities, Routing, RoutingContext, balance_and_z, balance_loss, z_loss
from .sparsemixer import HeunMultiplier, SparseMixerConfig, SparseMixerMoE, sparsemixer_route
from .topk import TopKConfig, TopKMoE

__all__ = [
    "AuxLosses",
    "Capabilities",
    "Experts",
    "ExpertChoiceConfig",
    "ExpertChoiceMoE",
    "FAMILIES",
    "Family",
    "HeunMultiplier",
    "LoryConfig",
    "LoryMoE",
    "MoEConfig",
    "MoELayer",
    "Native",
    "Router",
    "Routing",
    "RoutingContext",
    "SparseMixerConfig",
    "SparseMixerMoE",
    "SwiGLU",
    "TopKConfig",
    "TopKMoE",
    "balance_and_z",
    "balance_loss",
    "build_ffn",
    "register",
    "sparsemixer_route",
    "z_loss",
]
