"""The one map from an FFN kind (the config's ``ffn``) to its layer class and its config dataclass.

Adding a routing family takes one new file in ``moe/`` (a config dataclass with ``validate`` and an
:class:`~diffmoe.moe.base.MoELayer` subclass with ``route``) and one :func:`register` line below;
CONTRIBUTING in the README walks through it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .dense import SwiGLU
from .expert_choice import ExpertChoiceConfig, ExpertChoiceMoE
from .lory import LoryConfig, LoryMoE
from .sparsemixer import SparseMixerConfig, SparseMixerMoE
from .topk import TopKConfig, TopKMoE


@dataclass(frozen=True)
class Family:
    """layer: an ``nn.Module`` class with ``from_config(d_model, d_ff, moe, config)``; config: its
    dataclass (``moe.<kind>`` in a model config, with ``validate(num_experts | None)``), or None."""

    layer: type[nn.Module]
    config: type | None = None


FAMILIES: dict[str, Family] = {}
"""kind -> Family, in registration order (the order error messages list them in)."""


def register(kind: str, layer: type[nn.Module], config: type | None = None) -> None:
    """Make ``kind`` a valid ``ffn`` value built as ``layer``, configured by ``moe.<kind>`` (``config``)."""
    if not kind.isidentifier():
        raise ValueError(f"FFN kind {kind!r} must be a Python identifier (it names the config section moe.{kind})")
    if kind in FAMILIES:
        raise ValueError(f"FFN kind {kind!r} is already registered (to {FAMILIES[kind].layer.__name__})")
    FAMILIES[kind] = Family(layer, config)


def build_ffn(kind: str, d_model: int, d_ff: int, moe) -> nn.Module:
    """The FFN of one decoder layer: ``kind`` with the shared MoE config ``moe`` (a ``MoEConfig``)."""
    if kind not in FAMILIES:
        from ..schema import ConfigError

        raise ConfigError(f"invalid config: ffn={kind!r}: unknown FFN kind; choose one of {', '.join(FAMILIES)}")
    family = FAMILIES[kind]
    return family.layer.from_config(d_model, d_ff, moe, getattr(moe, kind) if family.config else None)


register("dense", SwiGLU)
register("lory", LoryMoE, LoryConfig)
register("topk", TopKMoE, TopKConfig)
register("sparsemixer", SparseMixerMoE, SparseMixerConfig)
register("expert_choice", ExpertChoiceMoE, ExpertChoiceConfig)
