"""Gradient-norm clipping over parameters that may be DTensors on different meshes (dense parameters
on the dense mesh, experts on the expert mesh), where ``torch.nn.utils.clip_grad_norm_`` refuses to mix
them: the squared norm of the local shards is summed over the mesh dimensions they are split on,
with plain all-reduces (counted by :class:`~diffmoe.parallel.comm_count.CommCounter`, as every collective
is), per mesh layout, and the squares are added."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """Scale the gradients in place so that their global L2 norm is at most ``max_norm`` (``inf``: no
    clipping), as ``torch.nn.utils.clip_grad_norm_`` does; returns the norm before clipping (``nan`` or
    ``inf`` when a gradient is not finite)."""
    groups: dict[object, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            groups.setdefault(_layout_key(p.grad), []).append(p.grad)
    squares = 0.0
    for key, grads in groups.items():
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        norms = torch.stack([torch.linalg.vector_norm(g) for g in local])  # as torch's on CPU (no foreach)
        square = torch.linalg.vector_norm(norms.float()).square()
        if key is not None:  # sum over the mesh dimensions the gradients are split on
            mesh, replicated = key
            for dim, rep in enumerate(replicated):
                if not rep:
                    dist.all_reduce(square, group=mesh.get_group(dim))
        squares += float(square)
    total = math.sqrt(squares)
    coef = max_norm / (total + 1e-6)
    if math.isfinite(total) and coef < 1.0:
        for grads in groups.values():
            torch._foreach_mul_(grads, coef)
    return total


def _layout_key(grad: torch.Tensor):
    """None for a plain tensor; (mesh, which mesh dimensions hold replicas) for a DTensor."""
    if not isinstance(grad, DTensor):
        return None
    return grad.device_mesh, tuple(p.is_replicate() for p in grad.placements)
