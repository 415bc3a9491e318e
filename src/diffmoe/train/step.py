"""One optimizer step: ``accum`` micro-batches forward and backward, clipping, AdamW update (skipped,
and reported, when the loss or the gradient is not finite).

Scaling (the same for every layout, see :mod:`diffmoe.parallel.parallelize`): each rank's LM loss is
its token sum over the global token count of the step (all-reduced once, before the first forward),
its auxiliary losses are divided by micro-batches x ranks, and gradients are summed over the ranks,
so the update is that of one process on the whole global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..parallel.grads import clip_grad_norm_
from ..parallel.parallelize import ParallelPlan, gradient_sync
from ..parallel import distributed


@dataclass
class StepResult:
    loss: float
    """LM loss (nats per token) of the global batch."""
    aux_loss: float
    """The scaled auxiliary losses, mean over micro-batches and ranks."""
    grad_norm: float
    """Total gradient norm before clipping."""
    applied: bool
    """False when the update was skipped because the loss or the gradient was not finite."""


def train_step(model: nn.Module, wrapped: nn.Module, optimizer: torch.optim.Optimizer,
               batches: Iterator[tuple[torch.Tensor, torch.Tensor]], accum: int, grad_clip: float, bf16: bool,
               plan: ParallelPlan, env: distributed.DistEnv) -> StepResult:
    """Run ``accum`` micro-batches from ``batches`` through ``wrapped`` (``model`` parallelized by
    ``plan``), clip at ``grad_clip`` (0: no clipping) and update ``optimizer``; gradients are zeroed
    afterwards either way."""
    micro_batches = [next(batches) for _ in range(accum)]
    local_tokens = torch.tensor([float(sum(labels.numel() for _, labels in micro_batches))], dtype=torch.float64)
    tokens = float(distributed.all_reduce_sum(local_tokens, env)[0])
    ranks = env.world
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=bf16 and plan.autocast)
    sums = torch.zeros(2, dtype=torch.float64, device=env.device)  # LM token sum, scaled auxiliary losses
    for i, (ids, labels) in enumerate(micro_batches):
        ids, labels = ids.to(env.device), labels.to(env.device)
        with gradient_sync(wrapped, enabled=i == accum - 1):
            with autocast:  # the LM loss in chunks of tokens: the full logits never exist
                lm = wrapped(ids, labels=labels).sum()
            aux = model.aux_loss() / (accum * ranks)
            (lm / tokens + aux).backward()
        sums += torch.stack([lm.detach(), aux.detach()]).double()  # stays on the device: no sync
    grad_norm = clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    sums = distributed.all_reduce_sum(sums, env)
    loss = float(sums[0] / tokens)
    applied = is_finite(loss) and is_finite(grad_norm)
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, float(sums[1]), grad_norm, applied)


def is_finite(value: torch.Tensor | float) -> bool:
    return bool(torch.isfinite(torch.as_tensor(value)).all())
