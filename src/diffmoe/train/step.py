"""One optimizer step: ``grad_accum`` micro-batches forward and backward, clipping, AdamW update
(skipped, and reported, when the loss or the gradient is not finite)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from . import distributed
from .parallel import gradient_sync


@dataclass
class StepResult:
    loss: float
    """LM loss (nats per token), the mean over micro-batches and ranks."""
    aux_loss: float
    """The scaled auxiliary losses of this rank, mean over micro-batches."""
    grad_norm: float
    """Total gradient norm before clipping."""
    applied: bool
    """False when the update was skipped because the loss or the gradient was not finite."""


def train_step(model: nn.Module, wrapped: nn.Module, optimizer: torch.optim.Optimizer,
               batches: Iterator[tuple[torch.Tensor, torch.Tensor]], tc: TrainConfig, env: distributed.DistEnv,
               ) -> StepResult:
    """Run ``tc.grad_accum`` micro-batches from ``batches`` through ``wrapped`` (``model`` parallelized),
    clip and update ``optimizer``; gradients are zeroed afterwards either way."""
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=tc.bf16)
    lm_total, aux_total = torch.zeros(()), torch.zeros(())
    for micro in range(tc.grad_accum):
        ids, labels = (t.to(env.device) for t in next(batches))
        with gradient_sync(wrapped, enabled=micro == tc.grad_accum - 1):
            with autocast:
                logits = wrapped(ids)
            lm = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
            aux = model.aux_loss()
            ((lm + aux) / tc.grad_accum).backward()
        lm_total += lm.detach().cpu() / tc.grad_accum
        aux_total += aux.detach().cpu() / tc.grad_accum
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
    loss = distributed.all_reduce_mean(lm_total.to(env.device), env).item()
    applied = is_finite(loss) and is_finite(grad_norm)
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, aux_total.item(), float(grad_norm), applied)


def is_finite(value: torch.Tensor | float) -> bool:
    return bool(torch.isfinite(torch.as_tensor(value)).all())
