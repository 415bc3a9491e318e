"""The experts container shared by every routing family, and the one module parallelism wraps.

Weights are stacked with the expert index first, in ``nn.Linear`` layout (out_features, in_features):

    w1: [E, d_ff, d_model]   gate projection
    w3: [E, d_ff, d_model]   up projection
    w2: [E, d_model, d_ff]   down projection

so expert i computes ``w2[i] @ (silu(w1[i] @ x) * (w3[i] @ x))``, a SwiGLU FFN. The same tensors feed
Lory's merge (one GEMM of routing weights with the flattened stack) and the grouped GEMM of token
choice, and the weights of a dense SwiGLU copy into any expert unchanged.

Layers never read the stacks themselves: they call one of the three ways experts run —
``forward`` (dispatched tokens), ``forward_merged`` (one merged expert per segment) and ``merge``
(merged weights, for decoding) — so FSDP hooks (``register_fsdp_forward_method`` for the two that are
not ``forward``), ``distribute_module`` or ``local_map`` attach to this module alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import dispatch
from .merge import Merged, merge_experts, segment_merged_swiglu


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

    def forward(
        self, x: torch.Tensor, token_idx: torch.Tensor, expert_idx: torch.Tensor, gate: torch.Tensor, impl: str = "auto"
    ) -> torch.Tensor:
        """Dispatched tokens: x [N, d_model] -> y [N, d_model], y[n] = sum over the assignments a of
        token n of gate[a] * expert(expert_idx[a])(x[n]). See :func:`diffmoe.moe.dispatch.dispatch`."""
        return dispatch(x, self, token_idx, expert_idx, gate, impl)

    def forward_merged(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One merged expert per segment: x [S, T, d_model], weights [S, E] -> [S, T, d_model], merged
        weights recomputed in backward (:func:`diffmoe.moe.merge.segment_merged_swiglu`)."""
        return segment_merged_swiglu(x, weights, self)

    def merge(self, weights: torch.Tensor) -> Merged:
        """Merged weights per row of weights [S, E]: (w1 [S, d_ff, d], w3 [S, d_ff, d], w2 [S, d, d_ff])."""
        return merge_experts(weights, self)

    @torch.no_grad()
    def copy_from_dense(self, dense: nn.Module) -> None:
        """Set every expert to the weights of a dense SwiGLU (Lory's dense warm-up)."""
        self.w1.copy_(dense.w1.weight.expand_as(self.w1))
        self.w3.copy_(dense.w3.weight.expand_as(self.w3))
        self.w2.copy_(dense.w2.weight.expand_as(self.w2))

    def expert_forward(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Expert ``i`` on ``x`` [n, d_model] -> [n, d_model] (the plain reference)."""
        return F.linear(F.silu(F.linear(x, self.w1[i])) * F.linear(x, self.w3[i]), self.w2[i])

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}"
