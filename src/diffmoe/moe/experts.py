"""The experts container shared by every routing family.

Weights are stacked with the expert index first, in ``nn.Linear`` layout (out_features, in_features):

    w1: [E, d_ff, d_model]   gate projection
    w3: [E, d_ff, d_model]   up projection
    w2: [E, d_model, d_ff]   down projection

so expert i computes ``w2[i] @ (silu(w1[i] @ x) * (w3[i] @ x))``, a SwiGLU FFN. The same tensors feed
Lory's merge (one GEMM of routing weights with the flattened stack) and the grouped GEMM of token
choice, and ``SwiGLU.weight`` of a dense layer copies into any expert unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Experts(nn.Module):
    """E SwiGLU experts as three stacked parameters (see module docstring for shapes)."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int):
        super().__init__()
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.w1 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.w3 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        nn.init.normal_(self.w1, std=std)
        nn.init.normal_(self.w3, std=std)
        nn.init.normal_(self.w2, std=std if out_std is None else out_std)

    @torch.no_grad()
    def copy_from_dense(self, dense: "SwiGLU") -> None:
        """Set every expert to the weights of a dense SwiGLU (Lory's dense warm-up)."""
        self.w1.copy_(dense.w1.weight.expand_as(self.w1))
        self.w3.copy_(dense.w3.weight.expand_as(self.w3))
        self.w2.copy_(dense.w2.weight.expand_as(self.w2))

    def expert_forward(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Expert ``i`` on ``x`` [n, d_model] -> [n, d_model]."""
        return F.linear(F.silu(F.linear(x, self.w1[i])) * F.linear(x, self.w3[i]), self.w2[i])

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}"


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN: ``w2(silu(w1 x) * w3 x)``. x [..., d_model] -> [..., d_model]."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.d_model, self.d_ff = d_model, d_ff
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        nn.init.normal_(self.w1.weight, std=std)
        nn.init.normal_(self.w3.weight, std=std)
        nn.init.normal_(self.w2.weight, std=std if out_std is None else out_std)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:  # ctx: see diffmoe.moe.base
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def default_out_std(std: float, n_layers: int) -> float:
    """GPT-2 / OLMo scaled init for projections that write into the residual stream."""
    return std / math.sqrt(2 * n_layers)
