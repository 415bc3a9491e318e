"""One optimizer step: ``accum`` micro-batches forward and backward, clipping, AdamW update (skipped,
and reported, when the loss or the gradient is not finite).

Scaling (the same for every layout, see :mod:`diffmoe.parallel.parallelize`): each rank's LM loss is
its token sum over the global token count of the step (all-reduced once, before the first forward),
its auxiliary losses (collected by the forward in an :class:`~diffmoe.moe.AuxLosses`) are divided by
micro-batches x ranks, and gradients are summed over the ranks, so the update is that of one process on
the whole global batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..moe import AuxLosses
from ..parallel import distributed
from ..parallel.grads import clip_grad_norm_
from ..parallel.parallelize import ParallelPlan, gradient_sync


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
    aux_unscaled: dict[str, torch.Tensor] = field(default_factory=dict)
    """Each auxiliary loss unscaled, summed over the layers, mean over this rank's micro-batches (scalars
    on the device: read them when logging)."""
    data_wait_s: float = 0.0
    """Seconds this rank waited for its micro-batches."""


class StepHooks:
    """The points inside a step where the trainer's callbacks run (nothing by default)."""

    def post_backward(self, micro: int) -> None:
        """After micro-batch ``micro``'s backward (gradients accumulated; synchronised after the last)."""

    def pre_optimizer_step(self) -> None:
        """After clipping, before the optimizer's update (only when the update is applied)."""


@dataclass
class Stepper:
    """What a step needs besides its batches: ``wrapped`` (the model parallelized by ``plan``), its
    optimizer, the clipping norm (0: none), bfloat16 autocast and the distributed environment."""

    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    plan: ParallelPlan
    env: distributed.DistEnv
    grad_clip: float = 0.0
    bf16: bool = False

    def step(
        self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], accum: int, hooks: StepHooks = StepHooks()
    ) -> StepResult:
        """Run ``accum`` micro-batches from ``batches``, clip and update; gradients are zeroed afterwards
        either way."""
        env, wrapped = self.env, self.wrapped
        start = time.perf_counter()
        micro_batches = [next(batches) for _ in range(accum)]
        data_wait = time.perf_counter() - start
        local_tokens = torch.tensor([float(sum(labels.numel() for _, labels in micro_batches))], dtype=torch.float64)
        tokens = float(distributed.all_reduce_sum(local_tokens, env)[0])
        ranks = env.world
        autocast = torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=self.bf16 and self.plan.autocast)
        sums = torch.zeros(2, dtype=torch.float64, device=env.device)  # LM token sum, scaled auxiliary losses
        unscaled: dict[str, torch.Tensor] = {}
        for i, (ids, labels) in enumerate(micro_batches):
            ids, labels = ids.to(env.device), labels.to(env.device)
            aux = AuxLosses()
            with gradient_sync(wrapped, enabled=i == accum - 1):
                with autocast:  # the LM loss in chunks of tokens: the full logits never exist
                    lm = wrapped(ids, labels=labels, aux=aux).sum()
                scaled = aux.sum(lm) / (accum * ranks)
                for name, value in aux.unscaled.items():  # read before backward (recomputation adds again)
                    unscaled[name] = unscaled.get(name, 0) + value / accum
                (lm / tokens + scaled).backward()
            hooks.post_backward(i)
            sums += torch.stack([lm.detach(), scaled.detach()]).double()  # stays on the device: no sync
        grad_norm = clip_grad_norm_(wrapped.parameters(), self.grad_clip if self.grad_clip > 0 else float("inf"))
        sums = distributed.all_reduce_sum(sums, env)
        loss = float(sums[0] / tokens)
        applied = is_finite(loss) and is_finite(grad_norm)
        if applied:
            hooks.pre_optimizer_step()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, float(sums[1]), grad_norm, applied, unscaled, data_wait)


def is_finite(value: torch.Tensor | float) -> bool:
    return bool(torch.isfinite(torch.as_tensor(value)).all())
