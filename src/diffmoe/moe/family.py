"""What a routing family declares about itself: :class:`Family` (and :class:`Native`), the value each
family module ends with and :mod:`diffmoe.moe.registry` registers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Native:
    """How native transformers classes (no remote code) hold a family's layers.

    archs: the family's config -> {architecture: the ``config.json`` fields its layers set} for every
        architecture that computes such a layer exactly (``llama``, ``mixtral``, ``qwen2_moe``, ``phimoe``),
        or a string saying why none does.
    imports: {architecture: its ``config.json`` dict -> the family's config} for the architectures whose
        MoE layers ``diffmoe import`` reads as this family.
    """

    archs: Callable[[Any], dict[str, dict] | str]
    imports: dict[str, Callable[[dict], Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    """kind: the ``ffn`` value (and the config section ``moe.<kind>``); layer: an ``nn.Module`` class with
    ``from_config(d_model, d_ff, moe, config)``; config: its dataclass (with ``validate(num_experts | None)``),
    or None; remote: the :class:`~diffmoe.moe.remote.RemoteFFN` subclass a custom-code export ships, or None
    (the model then cannot be exported with custom code); native: see :class:`Native`."""

    kind: str
    layer: type[nn.Module]
    config: type | None = None
    remote: type[nn.Module] | None = None
    native: Native | None = None
