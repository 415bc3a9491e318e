"""The dense SwiGLU FFN: the baseline family, and what Lory's dense warm-up trains."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .family import Family, Native
from .remote import RemoteSwiGLU
from .routing import Capabilities, RoutingContext


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN: ``w2(silu(w1 x) * w3 x)``. x [..., d_model] -> [..., d_model]."""

    capabilities = Capabilities()

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.d_model, self.d_ff = d_model, d_ff
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.reset_parameters()

    @classmethod
    def from_config(cls, d_model: int, d_ff: int, moe, config: None) -> "SwiGLU":
        """The registry's constructor: the model's d_ff (``moe.d_ff`` sizes experts, not this)."""
        return cls(d_model, d_ff)

    def reset_parameters(
        self, std: float = 0.02, out_std: float | None = None, router_std: float | None = None
    ) -> None:
        nn.init.normal_(self.w1.weight, std=std)
        nn.init.normal_(self.w3.weight, std=std)
        nn.init.normal_(self.w2.weight, std=std if out_std is None else out_std)

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


FAMILY = Family("dense", SwiGLU, remote=RemoteSwiGLU, native=Native(lambda config: {"llama": {}, "qwen2_moe": {}}))
