"""Parts of training that run at fixed points of the loop (OLMo-core's callbacks, torchtitan's hooks).

A :class:`Callback` overrides the points it needs; the trainer calls every callback, in order, on every
rank (a callback that runs a collective runs it on all of them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .loop import Trainer
    from .step import StepResult


class Callback:
    """Does nothing at every point; subclasses override what they need."""

    def post_step(self, trainer: "Trainer", step: int, result: "StepResult") -> None:
        """After the optimizer step of ``step`` (0-based), whether or not the update was applied."""


class MoEPostStep(Callback):
    """Each MoE layer class's once-per-step update (:meth:`diffmoe.moe.MoELayer.post_step`) with all of the
    model's layers of the class, the same on every rank: the sums it asks for are all-reduced on the device."""

    def post_step(self, trainer: "Trainer", step: int, result: "StepResult") -> None:
        by_class: dict[type, list] = {}
        for _, layer in trainer.model.moe_layers():
            by_class.setdefault(type(layer), []).append(layer)
        world = trainer.env.world
        for cls, layers in by_class.items():
            cls.post_step(layers, lambda t: _sum_over_ranks(t, world))


def _sum_over_ranks(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values
