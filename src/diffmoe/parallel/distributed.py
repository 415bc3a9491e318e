"""Process-group set-up for torchrun (gloo on CPU, nccl on CUDA) and its teardown.

Hygiene (torchtitan #1342): the group gets the config's timeout, so a hung rank ends the
job at the timeout; on success the ranks meet at a barrier before the group is destroyed; after an
exception the group is left alone (destroying it would wait for ranks that never come), and the
launcher (``torchrun``) stops the other ranks.
"""

from __future__ import annotations

import datetime
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


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` (``cpu``, ``cuda``, ``cuda:1``), or CUDA when available; under torchrun the CUDA
    device of a rank is its LOCAL_RANK unless an index is given."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        from ..schema import ConfigError

        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine")
        if device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(
                f"--device {device}: under torchrun give --device cuda; each rank uses the GPU of its "
                "LOCAL_RANK (choose GPUs with CUDA_VISIBLE_DEVICES)"
            )
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def setup(device: str | torch.device | None = None, timeout_s: float = 600.0, need_group: bool = False) -> DistEnv:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and initialise the process group with
    ``timeout_s``. A single process gets a group only when ``need_group`` (FSDP2 on one device)."""
    device = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not need_group:
        return DistEnv(0, 1, device)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:  # one process outside torchrun
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistEnv(dist.get_rank(), dist.get_world_size(), device, owns)


def all_reduce_sum(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The sum over the ranks of a small tensor (any device; sent through ``env.device``, as NCCL
    needs), on the CPU."""
    if env.world == 1:
        return values.cpu()
    out = values.to(env.device)
    dist.all_reduce(out)
    return out.cpu()


def teardown(env: DistEnv, ok: bool = True) -> None:
    """After success: barrier, then destroy the group if :func:`setup` created it (a caller's own group
    stays). After a failure: nothing (the other ranks may never reach a barrier)."""
    if ok and env.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def add_device_arg(parser) -> None:
    """The ``--device`` option of the commands that run a model."""
    parser.add_argument(
        "--device", help="cpu, cuda or cuda:N (default: CUDA when available; under torchrun each rank's LOCAL_RANK)"
    )
