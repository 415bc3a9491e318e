"""Process-group set-up for torchrun (gloo on CPU, nccl on CUDA); a no-op for a single process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False
    """Whether :func:`setup` created the process group (and :func:`teardown` destroys it)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> DistEnv:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and initialise the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world == 1:
        return DistEnv(0, 1, device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistEnv(dist.get_rank(), world, device, owns)


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= env.world
    return value


def teardown(env: DistEnv) -> None:
    """Destroy the process group if :func:`setup` created it (a caller's own group stays)."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()
