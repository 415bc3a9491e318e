"""Parallelism applied from outside the model: ``parallelize(model, plan)`` wraps a built model for
the run's process layout (today: data parallel with DDP, then ``torch.compile``); the model itself
never knows how it is distributed."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class ParallelPlan:
    """How a model runs: ``world`` data-parallel processes, and whether its forward is compiled."""

    world: int = 1
    compile: bool = False


def parallelize(model: nn.Module, plan: ParallelPlan) -> nn.Module:
    """The module to call for training steps (``model`` keeps its parameters and state).

    With a world > 1, DDP; it searches for parameters without gradient only when some layer may leave
    parameters unused in a step (``capabilities.dense_gradients`` of its FFNs). Then ``torch.compile``
    when the plan asks for it.
    """
    wrapped = model
    if plan.world > 1:
        dense = all(ffn.capabilities.dense_gradients for ffn in model.ffns())
        wrapped = DistributedDataParallel(model, find_unused_parameters=not dense)
    return torch.compile(wrapped) if plan.compile else wrapped


def data_parallel(wrapped: nn.Module) -> DistributedDataParallel | None:
    """The DDP module inside a (possibly compiled) wrapped model, or None."""
    inner = getattr(wrapped, "_orig_mod", wrapped)
    return inner if isinstance(inner, DistributedDataParallel) else None


@contextmanager
def gradient_sync(wrapped: nn.Module, enabled: bool):
    """Forward and backward inside the block reduce gradients over the ranks only when ``enabled``:
    gradient accumulation syncs on its last micro-batch alone (DDP's ``no_sync`` for the others)."""
    ddp = data_parallel(wrapped)
    with ddp.no_sync() if ddp is not None and not enabled else nullcontext():
        yield
