"""AdamW with decoupled weight decay on matrices only, and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import TrainConfig


def build_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW; parameters with two or more dimensions decay, norms (1-d) do not."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas))


def lr_at(step: int, tc: TrainConfig) -> float:
    """Learning rate of update ``step`` (0-based): linear warm-up to ``lr`` over ``warmup_frac`` of the
    steps, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    warmup = int(round(tc.warmup_frac * tc.steps))
    if step < warmup:
        return tc.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, tc.steps - 1 - warmup)
    floor = tc.lr * tc.min_lr_ratio
    return floor + (tc.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def transfer_state(
    old: torch.optim.Optimizer, old_model: nn.Module, new: torch.optim.Optimizer, new_model: nn.Module
) -> None:
    """Carry optimizer state over to a new model for parameters with the same name and shape
    (the dense warm-up's switch to MoE keeps attention and embedding moments; experts and routers start fresh)."""
    old_params = dict(old_model.named_parameters())
    for name, p in new_model.named_parameters():
        q = old_params.get(name)
        if q is not None and q.shape == p.shape and q in old.state:
            new.state[p] = {k: v.clone() if torch.is_tensor(v) else v for k, v in old.state[q].items()}
