"""What the layer benchmark measures: the shapes and sweeps, the dense FLOP model, and every layer
(diffmoe's MoE layers and transformers' reference blocks) to build at a shape: curated rows for the
built-in families, and every other registered family at its defaults (its ``top_k`` and
``segment_len``, where its config has them, set from the shape)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, replace
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hub-kernel implementations must not download anything

import torch
from torch import nn

from ..moe import FAMILIES, ExpertChoiceMoE, LoryMoE, MoEConfig, SparseMixerMoE, SwiGLU, TopKMoE
from ..moe.dispatch import resolve_impl

HF_INIT_STD = 0.02


@dataclass(frozen=True)
class Shape:
    tokens: int  # total tokens = batch * seq_len
    seq_len: int
    d_model: int
    d_ff: int
    experts: int
    segment_len: int
    top_k: int = 2
    ec_capacity: float = 2.0

    @property
    def batch(self) -> int:
        return self.tokens // self.seq_len

    def dense_flops(self) -> float:
        """Forward+backward FLOPs of the dense SwiGLU: 3 matmuls x 2 N d d_ff, x3 with backward."""
        return 3 * (3 * 2 * self.tokens * self.d_model * self.d_ff)


@dataclass
class LayerSpec:
    name: str
    family: str  # an FFN kind (dense, lory, topk, ...), or hf (sweeps pick families)
    build: Callable[[], nn.Module]
    flop_factor: float  # FLOPs as a multiple of the dense FFN's
    note: str = ""
    known_bytes: int = 0  # a large allocation known in advance (checked against free memory)
    column: str = ""  # the name without shape parameters (a sweep's column); default: name


@dataclass(frozen=True)
class Sweep:
    name: str
    title: str
    shapes: Callable[[Shape], list[Shape]]
    families: tuple[str, ...] | None
    """The families it measures; None: every registered one (:func:`all_families`)."""
    hf_impls: tuple[str, ...] = ("eager", "grouped_mm")


CURATED = ("dense", "lory", "topk", "sparsemixer", "expert_choice")
"""The families :func:`layer_specs` builds rows of its own for (several dispatches, the benchmark's options)."""


def all_families() -> tuple[str, ...]:
    """Every registered FFN kind and ``hf`` (transformers' blocks), as registered now."""
    return (*FAMILIES, "hf")


SWEEPS = {
    "experts": Sweep("experts", "experts E", lambda s: [replace(s, experts=e) for e in (4, 8, 16, 32, 64)], None),
    "segment": Sweep(
        "segment",
        "Lory segment length T",
        lambda s: [replace(s, segment_len=t) for t in (64, 128, 256, 512)],
        ("dense", "lory"),
    ),
    "tokens": Sweep(
        "tokens",
        "tokens per batch",
        lambda s: [replace(s, tokens=n, seq_len=min(s.seq_len, n)) for n in (1024, 2048, 4096, 8192, 16384)],
        None,
    ),
    "fine": Sweep(
        "fine",
        "fine-grained: 64 experts, top-8, d_ff 176",
        lambda s: [replace(s, experts=64, top_k=8, d_ff=176, ec_capacity=8.0)],
        ("dense", "topk", "expert_choice", "hf"),
    ),
}


def hf_implementations() -> list[str]:
    """transformers' experts implementations: ``eager`` plus every registered one (none without
    transformers)."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return []

    return ["eager"] + sorted(ALL_EXPERTS_FUNCTIONS.keys())


def build_hf_block(family: str, impl: str, shape: Shape) -> nn.Module:
    """A transformers Mixtral / Phimoe sparse MoE block with weights ~ N(0, 0.02) (they are torch.empty)."""
    if family == "mixtral":
        from transformers import MixtralConfig as Config
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
    else:
        from transformers import PhimoeConfig as Config
        from transformers.models.phimoe.modeling_phimoe import PhimoeSparseMoeBlock as Block
    cfg = Config(
        hidden_size=shape.d_model,
        intermediate_size=shape.d_ff,
        num_local_experts=shape.experts,
        num_experts_per_tok=shape.top_k,
    )
    cfg._experts_implementation = impl
    block = Block(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, HF_INIT_STD)
    return block


def layer_specs(
    shape: Shape, device: torch.device, dtype: torch.dtype, hf_impls: tuple[str, ...] | None = None
) -> list[LayerSpec]:
    """Every layer of the benchmark, dense first. SparseMixer-v2 and transformers' PhiMoE are top-2
    only; top-k != 2 leaves them out."""
    d, f, E, T, k = shape.d_model, shape.d_ff, shape.experts, shape.segment_len, shape.top_k
    probe = torch.empty(0, device=device, dtype=dtype)
    auto = resolve_impl("auto", probe)
    c = shape.ec_capacity
    specs = [
        LayerSpec("dense SwiGLU", "dense", lambda: SwiGLU(d, f), 1.0),
        LayerSpec(
            f"LoryMoE (T={T}, segment)",
            "lory",
            lambda: LoryMoE(d, f, E, segment_len=T, routing="segment"),
            1.0 + E / T,
            "merge adds E/T",
            column="LoryMoE",
        ),
        LayerSpec(
            f"TopKMoE top-{k} [loop]",
            "topk",
            lambda: TopKMoE(d, f, E, top_k=k, dispatch_impl="loop"),
            float(k),
            column="TopKMoE [loop]",
        ),
        LayerSpec(
            f"TopKMoE top-{k} [grouped_mm]",
            "topk",
            lambda: TopKMoE(d, f, E, top_k=k, dispatch_impl="grouped_mm"),
            float(k),
            column="TopKMoE [grouped_mm]",
        ),
        LayerSpec(
            f"ExpertChoiceMoE c={c:g} [auto={auto}]",
            "expert_choice",
            lambda: ExpertChoiceMoE(d, f, E, capacity_factor=c),
            c,
            f"c={c:g}: FLOPs of top-{c:g}",
            column="ExpertChoiceMoE",
        ),
    ]
    if k == 2:
        specs.insert(
            4,
            LayerSpec(
                f"SparseMixerMoE top-2 [auto={auto}]",
                "sparsemixer",
                lambda: SparseMixerMoE(d, f, E),
                2.0,
                column="SparseMixerMoE",
            ),
        )
    for kind, family in FAMILIES.items():
        if kind not in CURATED:
            with torch.device("meta"):  # the FLOPs of its experts per token, without allocating it
                factor = registered_layer(kind, shape).experts_per_token
            specs.append(
                LayerSpec(
                    f"{family.layer.__name__} [auto={auto}]",
                    kind,
                    (lambda kind=kind: registered_layer(kind, shape)),
                    factor,
                    "registered family, defaults",
                    column=family.layer.__name__,
                )
            )
    elem = torch.finfo(dtype).bits // 8
    impls = [i for i in hf_implementations() if hf_impls is None or i in hf_impls]
    for family, label in (("mixtral", "Mixtral"), ("phimoe", "Phimoe")):
        if family == "phimoe" and k != 2:
            continue
        for impl in impls:
            # batched_mm gathers the expert weights of every (token, slot): forward copy + its gradient
            known = 2 * shape.tokens * k * 3 * d * f * elem if impl == "batched_mm" else 0
            specs.append(
                LayerSpec(
                    f"HF {label}SparseMoeBlock [{impl}]",
                    "hf",
                    (lambda fam=family, im=impl: build_hf_block(fam, im, shape)),
                    float(k),
                    "transformers",
                    known,
                    f"HF {label} [{impl}]",
                )
            )
    return specs


def registered_layer(kind: str, shape: Shape) -> nn.Module:
    """A registered family's layer at ``shape``: its config's defaults, with ``top_k`` and ``segment_len``
    from the shape where the config has those fields."""
    family = FAMILIES[kind]
    config = family.config() if family.config is not None else None
    if config is not None:
        names = {f.name for f in dataclasses.fields(config)}
        config = replace(
            config, **{k: v for k, v in (("top_k", shape.top_k), ("segment_len", shape.segment_len)) if k in names}
        )
    return family.layer.from_config(shape.d_model, shape.d_ff, MoEConfig(num_experts=shape.experts), config)
