"""What the planner knows of the model: every parameter by name and shape, and the facts about each
FFN kind that memory and communication depend on, read from the layer class the registry holds and
from a tiny instance of it (never from the kind's name, so a newly registered family is planned
without edits here)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ...config import ModelConfig
from ...moe import FAMILIES, MoELayer, build_ffn


@dataclass(frozen=True)
class ParamSpec:
    """One parameter tensor: its ``named_parameters`` name and shape, the block it belongs to (None:
    the root unit) and whether it is an expert stack (``w1``, ``w3``, ``w2`` of an MoE layer)."""

    name: str
    shape: tuple[int, ...]
    layer: int | None = None
    expert: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def ffn_class(kind: str) -> str:
    """``dense`` (not an :class:`~diffmoe.moe.base.MoELayer`: a SwiGLU), ``merged`` (experts merged per
    segment: the layer class sets ``merges_experts``) or ``dispatched`` (tokens sent to experts)."""
    layer = FAMILIES[kind].layer
    if not issubclass(layer, MoELayer):
        return "dense"
    return "merged" if layer.merges_experts else "dispatched"


def expert_d_ff(mc: ModelConfig) -> int:
    return mc.moe.d_ff or mc.d_ff


def model_params(mc: ModelConfig) -> list[ParamSpec]:
    """Every parameter of ``Decoder(mc)``, by name and shape, without building it."""
    d, V, E, f = mc.d_model, mc.vocab_size, mc.moe.num_experts, expert_d_ff(mc)
    q, kv = mc.n_heads * mc.head_dim, mc.kv_heads * mc.head_dim
    specs = [ParamSpec("embed.weight", (V, d))]
    for i in range(mc.n_layers):
        p = f"blocks.{i}."
        specs += [
            ParamSpec(p + "attn_norm.weight", (d,), i),
            ParamSpec(p + "attn.wq.weight", (q, d), i),
            ParamSpec(p + "attn.wk.weight", (kv, d), i),
            ParamSpec(p + "attn.wv.weight", (kv, d), i),
            ParamSpec(p + "attn.wo.weight", (d, q), i),
            ParamSpec(p + "ffn_norm.weight", (d,), i),
        ]
        if ffn_class(mc.layer_ffn(i)) == "dense":
            specs += [
                ParamSpec(p + "ffn.w1.weight", (mc.d_ff, d), i),
                ParamSpec(p + "ffn.w3.weight", (mc.d_ff, d), i),
                ParamSpec(p + "ffn.w2.weight", (d, mc.d_ff), i),
            ]
        else:
            specs += [
                ParamSpec(p + "ffn.router.weight", (E, d), i),
                ParamSpec(p + "ffn.experts.w1", (E, f, d), i, True),
                ParamSpec(p + "ffn.experts.w3", (E, f, d), i, True),
                ParamSpec(p + "ffn.experts.w2", (E, d, f), i, True),
            ]
    specs.append(ParamSpec("norm.weight", (d,)))
    if not mc.tie_embeddings:
        specs.append(ParamSpec("lm_head.weight", (V, d)))
    return specs


def expert_sharding(mc: ModelConfig) -> str | None:
    """``ep`` or ``etp`` when every MoE layer of the model can shard its experts that way, else None."""
    ways = {getattr(FAMILIES[k].layer, "expert_sharding", None) for k in mc.kinds if ffn_class(k) != "dense"}
    return ways.pop() if len(ways) == 1 else None


# ---------------------------------------------------------------------------------------------------
# per-kind facts
@dataclass(frozen=True)
class FFNFacts:
    """What one FFN kind of a model declares, as the plan uses it.

    ffn: :func:`ffn_class`; rows_per_token: the layer's ``experts_per_token``, the expert rows one token
    becomes in a dispatched layer (k for top-k routing, a capacity factor for capacity-based routing;
    1 for a dense or merged layer); segment_len: ``capabilities.segment_len`` (tokens per routing
    segment; None when the layer routes tokens); global_counts: ``capabilities.global_counts`` (routing
    counts all-reduced over the ranks every forward); dense_gradients: ``capabilities.dense_gradients``
    (False: DDP runs with ``find_unused_parameters``).
    """

    ffn: str
    rows_per_token: float
    segment_len: int | None
    global_counts: bool
    dense_gradients: bool

    def segment_tokens(self, seq_len: int) -> int:
        """T: tokens per routing segment; a layer without segments routes whole sequences."""
        return self.segment_len or seq_len


_FACTS: dict[tuple[str, str], FFNFacts] = {}
"""Cache of :func:`ffn_facts`, keyed by the kind and ``repr(mc.moe)`` (every field of the moe section,
family sub-configs included): planning one config asks thousands of times."""


def ffn_facts(mc: ModelConfig, kind: str) -> FFNFacts:
    """The facts of FFN ``kind`` as ``mc``'s moe section configures it, read from the layer the registry
    builds for it at width 8 (d_model = d_ff = 8, ``moe.d_ff`` unset: what is read here does not depend
    on the widths), with the global RNG state restored after its initialisation."""
    key = (kind, repr(mc.moe))
    facts = _FACTS.get(key)
    if facts is None:
        with torch.random.fork_rng(devices=[]):
            layer = build_ffn(kind, 8, 8, dataclasses.replace(mc.moe, d_ff=None))
        caps = layer.capabilities
        facts = FFNFacts(
            ffn_class(kind),
            getattr(layer, "experts_per_token", 1),
            caps.segment_len,
            caps.global_counts,
            caps.dense_gradients,
        )
        if len(_FACTS) >= 1024:
            _FACTS.clear()
        _FACTS[key] = facts
    return facts
