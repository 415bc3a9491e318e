"""Gradient-norm clipping over parameters that may be DTensors on different meshes (dense parameters
on the dense mesh, experts on the expert mesh), where ``torch.nn.utils.clip_grad_norm_`` refuses to mix
them: the norm is taken per mesh, made global (``full_tensor``), and combined."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """Scale the gradients in place so that their global L2 norm is at most ``max_norm`` (``inf``: no
    clipping), as ``torch.nn.utils.clip_grad_norm_`` does; returns the norm before clipping (``nan`` or
    ``inf`` when a gradient is not finite)."""
    groups: dict[object, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            mesh = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            groups.setdefault(mesh, []).append(p.grad)
    squares = 0.0
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares += float(norm) ** 2
    total = math.sqrt(squares)
    coef = max_norm / (total + 1e-6)
    if math.isfinite(total) and coef < 1.0:
        for grads in groups.values():
            torch._foreach_mul_(grads, coef)
    return total
