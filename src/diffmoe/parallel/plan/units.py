"""The process groups of a layout's mesh and its FSDP2 units: which parameters each rank holds, how
many elements unsharded and in its shard."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...config import ModelConfig
from ..layout import Layout
from .model import ParamSpec, model_params


@dataclass(frozen=True)
class Group:
    """A process group of the world mesh: ``size`` ranks ``stride`` apart (consecutive ranks on a node)."""

    name: str
    size: int
    stride: int = 1

    def intra_fraction(self, gpus_per_node: int, all_to_all: bool = False) -> float:
        """Share of this group's traffic that stays inside a node: 1 or 0 for ring collectives (a ring
        spanning nodes runs at the inter-node bandwidth), the share of peers on the node for all-to-all."""
        if self.size <= 1 or self.size * self.stride <= gpus_per_node:
            return 1.0
        if not all_to_all or self.stride >= gpus_per_node:
            return 0.0
        peers = min(self.size, gpus_per_node // self.stride)
        return (peers - 1) / (self.size - 1)


def groups(layout: Layout) -> dict[str, Group]:
    """The groups of ``layout``'s mesh (dp_replicate, efsdp, x), x = ep or etp, row-major."""
    N, X = layout.world, layout.expert_size
    if layout.mode == "ddp":
        return {"world": Group("world", N)}
    S, R = layout.dp_shard, layout.dp_replicate
    return {
        "world": Group("world", N),
        "dp_shard": Group("dp_shard", S),
        "dp_replicate": Group("dp_replicate", R, S),
        "efsdp": Group("efsdp", S // X, X),
        layout.expert_dim: Group(layout.expert_dim, X),
    }


def local_shape(spec: ParamSpec, layout: Layout) -> tuple[int, ...]:
    """The shape this rank's ep/etp group member holds before FSDP sharding (experts only)."""
    shape = list(spec.shape)
    if spec.expert and layout.ep > 1:
        shape[0] //= layout.ep
    if spec.expert and layout.etp > 1:
        shape[2 if spec.name.endswith("w2") else 1] //= layout.etp
    return tuple(shape)


def shard_numel(shape: tuple[int, ...], g: int) -> int:
    """Elements of one rank's FSDP2 shard: Shard(0), dim 0 padded to a multiple of ``g``."""
    return math.ceil(shape[0] / g) * math.prod(shape[1:])


@dataclass
class Unit:
    """One FSDP2 unit (DDP: the whole model as one "unit" of group size 1).

    kind: ``root``, ``block`` or ``experts``; group: the mesh group it is sharded over; numel: the
    elements it holds unsharded on this rank (after ep/etp); shard: the elements of this rank's padded
    shard; layer: the block index (None for the root).
    """

    name: str
    kind: str
    group: Group
    numel: int = 0
    shard: int = 0
    layer: int | None = None


def fsdp_units(mc: ModelConfig, layout: Layout) -> list[Unit]:
    """The FSDP2 units of ``layout``: root, one per block, and one experts unit per MoE block when
    ep/etp > 1 (on efsdp). For DDP, one unit holding everything (group of 1)."""
    if layout.mode == "ddp":
        unit = Unit("model", "model", Group("none", 1))
        for spec in model_params(mc):
            unit.numel += spec.numel
            unit.shard += spec.numel
        return [unit]
    g = groups(layout)
    units: dict[str, Unit] = {"root": Unit("root", "root", g["dp_shard"])}
    for spec in model_params(mc):
        if spec.layer is None:
            unit = units["root"]
        elif spec.expert and layout.expert_size > 1:
            name = f"blocks.{spec.layer}.ffn.experts"
            unit = units.setdefault(name, Unit(name, "experts", g["efsdp"], layer=spec.layer))
        else:
            name = f"blocks.{spec.layer}"
            unit = units.setdefault(name, Unit(name, "block", g["dp_shard"], layer=spec.layer))
        shape = local_shape(spec, layout)
        unit.numel += math.prod(shape)
        unit.shard += shard_numel(shape, unit.group.size)
    return list(units.values())
