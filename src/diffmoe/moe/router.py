"""The router every MoE family shares: a linear map d_model -> E whose logits are float32 or wider."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Router(nn.Linear):
    """Router logits ``x W^T`` (no bias), W [E, d_model]. x [..., d_model] -> [..., E].

    Routing decisions are precision-sensitive (a top-k between close logits flips in bfloat16), so the
    logits are computed in float32 (float64 for float64 inputs) with autocast disabled: under bf16
    autocast a layer routes exactly as it does in float32 on the same input.
    """

    def __init__(self, d_model: int, num_experts: int):
        super().__init__(d_model, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), self.weight.to(dtype))
