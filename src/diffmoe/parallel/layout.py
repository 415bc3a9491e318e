"""The process layout of a run: ``train.parallel`` resolved against the world size, and its device mesh.

One world mesh of shape (dp_replicate, efsdp, x) with x the expert-sharding dimension (``ep`` or
``etp``, 1 when neither), as torchtitan builds it, and two views of it:

    dense  (dp_replicate, dp_shard)  where dp_shard = efsdp * x   attention, norms, embeddings, routers
    expert (dp_replicate, efsdp, x)                               the experts of MoE layers

Every rank reads distinct data, so the data-parallel ranks are the whole world whatever the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config import ConfigError, ParallelConfig


class ShardingError(RuntimeError):
    """An operation that a sharded module cannot run by construction (e.g. merging all experts when
    each rank holds only some of them); the message names the alternative layout."""


@dataclass(frozen=True)
class Layout:
    """``train.parallel`` for a given world size, every size resolved (no -1)."""

    world: int
    mode: str = "ddp"
    dp_replicate: int = 1
    dp_shard: int = 1
    ep: int = 1
    etp: int = 1

    @classmethod
    def resolve(cls, pc: ParallelConfig, world: int) -> "Layout":
        """Check the sizes multiply to the world; errors name the field (``train.parallel.*``)."""
        if pc.mode == "ddp":
            return cls(world, "ddp", dp_replicate=world)
        if world % pc.dp_replicate:
            raise ConfigError.invalid(
                "train.parallel.dp_replicate", pc.dp_replicate, f"must divide the world size {world}"
            )
        shard = world // pc.dp_replicate if pc.dp_shard == -1 else pc.dp_shard
        if pc.dp_replicate * shard != world:
            raise ConfigError.invalid(
                "train.parallel.dp_shard",
                pc.dp_shard,
                f"dp_replicate x dp_shard = {pc.dp_replicate * shard} must equal the world size {world}",
            )
        for name in ("ep", "etp"):
            size = getattr(pc, name)
            if shard % size:
                raise ConfigError.invalid(f"train.parallel.{name}", size, f"must divide dp_shard={shard}")
        return cls(world, "fsdp", pc.dp_replicate, shard, pc.ep, pc.etp)

    @property
    def expert_dim(self) -> str:
        """Name of the expert-sharding mesh dimension."""
        return "etp" if self.etp > 1 else "ep"

    @property
    def expert_size(self) -> int:
        return max(self.ep, self.etp)

    @property
    def efsdp(self) -> int:
        """Ranks the experts are FSDP-sharded over, within a replica."""
        return self.dp_shard // self.expert_size

    def describe(self) -> str:
        if self.mode == "ddp":
            return f"ddp x {self.world}"
        parts = [f"fsdp {self.dp_shard}"]
        if self.dp_replicate > 1:
            parts.insert(0, f"replicate {self.dp_replicate}")
        if self.expert_size > 1:
            parts.append(f"{self.expert_dim} {self.expert_size} (experts fsdp {self.efsdp})")
        return " x ".join(parts)


@dataclass(frozen=True)
class Meshes:
    """The world mesh and its views (see module docstring): ``dense`` is (dp_replicate, dp_shard) with
    dp_shard the flattened (efsdp, ep|etp); the expert views are properties."""

    world: DeviceMesh
    dense: DeviceMesh
    layout: Layout

    @property
    def expert_shard(self) -> DeviceMesh:
        """1-D mesh of the expert-sharding dimension (ep or etp)."""
        return self.world[self.layout.expert_dim]

    @property
    def expert_fsdp(self) -> DeviceMesh:
        """The mesh FSDP shards experts over: (dp_replicate, efsdp) for HSDP, else efsdp."""
        if self.layout.dp_replicate > 1:
            return self.world["dp_replicate", "efsdp"]
        return self.world["efsdp"]


def build_meshes(layout: Layout, device_type: str) -> Meshes:
    """One world mesh (dp_replicate, efsdp, ep|etp) and its dense/expert views."""
    x = layout.expert_dim
    world = init_device_mesh(
        device_type,
        (layout.dp_replicate, layout.efsdp, layout.expert_size),
        mesh_dim_names=("dp_replicate", "efsdp", x),
    )
    shard = world["efsdp", x]._flatten("dp_shard")
    dense = world["dp_replicate", "dp_shard"] if layout.dp_replicate > 1 else shard
    return Meshes(world, dense, layout)
