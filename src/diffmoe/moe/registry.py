"""The one map from an FFN kind (the config's ``ffn``) to everything generic code needs of its family.

A routing family is one file in ``moe/`` that ends with a :class:`Family` (its config dataclass, its layer
class, the eval-mode class a custom-code transformers export ships, and optionally how native
transformers classes hold its layers) and one line in :data:`BUILT_IN` below. The layer class itself
declares its auxiliary losses, logged statistics, capabilities and per-step update (see
:class:`~diffmoe.moe.base.MoELayer`). docs/architecture.md walks through adding one.
"""

from __future__ import annotations

from torch import nn

from . import dense, expert_choice, lory, remoe, sparsemixer, topk
from .family import Family

FAMILIES: dict[str, Family] = {}
"""kind -> Family, in registration order (the order error messages list them in)."""


def register(family: Family) -> None:
    """Make ``family.kind`` a valid ``ffn`` value."""
    kind = family.kind
    if not kind.isidentifier():
        raise ValueError(f"FFN kind {kind!r} must be a Python identifier (it names the config section moe.{kind})")
    if kind in FAMILIES:
        raise ValueError(f"FFN kind {kind!r} is already registered (to {FAMILIES[kind].layer.__name__})")
    FAMILIES[kind] = family


def build_ffn(kind: str, d_model: int, d_ff: int, moe) -> nn.Module:
    """The FFN of one decoder layer: ``kind`` with the shared MoE config ``moe`` (a ``MoEConfig``)."""
    if kind not in FAMILIES:
        from ..schema import ConfigError

        raise ConfigError(f"invalid config: ffn={kind!r}: unknown FFN kind; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[kind].layer.from_config(d_model, d_ff, moe, moe.family(kind))


BUILT_IN = (dense.FAMILY, lory.FAMILY, topk.FAMILY, sparsemixer.FAMILY, expert_choice.FAMILY, remoe.FAMILY)
for _family in BUILT_IN:
    register(_family)
