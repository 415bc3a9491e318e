"""Dropless dispatch: run (token, expert, gate) assignments through the shared experts.

Every sparse routing family (top-k, SparseMixer-v2, expert choice) reduces its decision to flat
assignment lists and calls :func:`dispatch`. Tokens are permuted once so that each expert's tokens
are contiguous, the three SwiGLU projections run as grouped GEMMs over the jagged groups (or as a loop
over experts), and the gated results are scattered back with one ``index_add``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .experts import Experts

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_impl(impl: str, x: torch.Tensor) -> str:
    """Pick the dispatch implementation.

    ``auto`` uses ``grouped_mm`` on CUDA (2x faster than the loop there at the standard benchmark
    shape) and the per-expert loop on CPU, where torch 2.13's grouped_mm measured about 10 % slower
    than the loop at 8 experts (``diffmoe bench layers``, docs/benchmarks.md). float64 always
    takes the loop (grouped_mm has no float64 kernel).
    """
    if x.dtype not in _GROUPED_MM_DTYPES:
        return "loop"
    if impl == "auto":
        return "grouped_mm" if x.is_cuda else "loop"
    return impl


def dispatch(
    x: torch.Tensor,
    experts: Experts,
    token_idx: torch.Tensor,
    expert_idx: torch.Tensor,
    gate: torch.Tensor,
    impl: str = "auto",
) -> torch.Tensor:
    """Apply gated experts to tokens.

    Args:
        x: [N, d_model] tokens.
        token_idx, expert_idx: [A] int64, assignment a sends token ``token_idx[a]`` to expert
            ``expert_idx[a]``; a token may appear any number of times (including zero).
        gate: [A] weight of each assignment (any float dtype; cast to x's).
        impl: ``auto`` | ``grouped_mm`` | ``loop``.
    Returns:
        y: [N, d_model] with y[n] = sum over a with token_idx[a] = n of gate[a] * expert(x[n]).
    """
    N, d = x.shape
    order = torch.argsort(expert_idx, stable=True)
    counts = torch.bincount(expert_idx, minlength=experts.num_experts)
    tok = token_idx[order]
    xs = x.index_select(0, tok)  # [A, d] grouped by expert
    if resolve_impl(impl, x) == "grouped_mm":
        h = _grouped_swiglu(xs, experts, counts)
    else:
        h = _loop_swiglu(xs, experts, counts)
    h = h * gate[order].to(h.dtype).unsqueeze(-1)
    return x.new_zeros(N, d).index_add_(0, tok, h)


def _grouped_swiglu(xs: torch.Tensor, experts: Experts, counts: torch.Tensor) -> torch.Tensor:
    """xs [A, d] sorted by expert, counts [E] -> [A, d] via three grouped GEMMs."""
    offs = torch.cumsum(counts, 0).to(torch.int32)
    w1, w3, w2 = (w.to(xs.dtype) for w in (experts.w1, experts.w3, experts.w2))
    g = F.grouped_mm(xs, w1.transpose(-2, -1), offs=offs)
    u = F.grouped_mm(xs, w3.transpose(-2, -1), offs=offs)
    return F.grouped_mm(F.silu(g) * u, w2.transpose(-2, -1), offs=offs)


def _loop_swiglu(xs: torch.Tensor, experts: Experts, counts: torch.Tensor) -> torch.Tensor:
    """Reference path: one plain GEMM chain per non-empty expert. xs [A, d] -> [A, d].

    The stacks are unbound once, so backward stacks the per-expert gradients once instead of adding
    E full-size zero-padded gradients.
    """
    w1, w3, w2 = experts.w1.unbind(0), experts.w3.unbind(0), experts.w2.unbind(0)
    outs = []
    for i, chunk in enumerate(torch.split(xs, counts.tolist())):
        if chunk.shape[0]:
            outs.append(F.linear(F.silu(F.linear(chunk, w1[i])) * F.linear(chunk, w3[i]), w2[i]))
    return torch.cat(outs) if outs else xs.new_zeros(xs.shape)
