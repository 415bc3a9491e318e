"""Lory's expert merge as small ops: merge by one GEMM, then a per-segment SwiGLU.

For routing weights e [S, E] (one row per segment), the merged expert of segment s is
sum_i e[s, i] * W_i for each of w1, w3, w2. It is computed as one GEMM of e with the flattened stack
[E, d_ff * d_model], never as a broadcast multiply-and-sum; autograd then gives the two GEMMs of the
backward (e^T G for the experts, G W^T for the weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .experts import Experts

Merged = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def merge_experts(weights: torch.Tensor, experts: Experts) -> Merged:
    """Merge the experts per row of ``weights``.

    weights: [S, E] (cast to the experts' dtype).
    Returns (w1 [S, d_ff, d], w3 [S, d_ff, d], w2 [S, d, d_ff]).
    """
    S, E = weights.shape
    out = []
    for w in (experts.w1, experts.w3, experts.w2):
        out.append((weights.to(w.dtype) @ w.reshape(E, -1)).view(S, *w.shape[1:]))
    return out[0], out[1], out[2]


def merged_swiglu(x: torch.Tensor, merged: Merged) -> torch.Tensor:
    """Run segment s's merged SwiGLU on its tokens. x [S, T, d] -> [S, T, d].

    With S == 1 the merged weights are used as plain linear layers (the dense-model path).
    """
    w1, w3, w2 = (w.to(x.dtype) for w in merged)
    if x.shape[0] == 1:
        return F.linear(F.silu(F.linear(x, w1[0])) * F.linear(x, w3[0]), w2[0])
    h = F.silu(torch.bmm(x, w1.transpose(1, 2))) * torch.bmm(x, w3.transpose(1, 2))
    return torch.bmm(h, w2.transpose(1, 2))
