"""Dropless dispatch: run (token, expert, gate) assignments through the shared experts.

Every sparse routing family (top-k, SparseMixer-v2, expert choice) reduces its decision to flat
assignment lists and calls :func:`dispatch`. Assignments are sorted by expert once. ``grouped_mm``
then gathers the tokens into one expert-contiguous copy, runs the three SwiGLU projections as grouped
GEMMs over the jagged groups and scatters the gated results back with one ``index_add`` (the GPU
path). ``loop`` runs :class:`GatherSwiGLUScatter`: gather, GEMMs, gating and scatter fused expert by
expert, with a hand-written backward (the CPU path, where working in cache pays).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import compute_dtype

DISPATCH_IMPLS = ("auto", "grouped_mm", "loop")
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_impl(impl: str, x: torch.Tensor) -> str:
    """Pick the dispatch implementation.

    ``auto`` uses ``grouped_mm`` on CUDA (2x faster than a per-expert loop there at the standard
    benchmark shape) and the fused per-expert loop on CPU, where it runs as fast as torch 2.13's
    grouped_mm (within run-to-run noise) and keeps 2.4x less activation memory, about that of the
    dense FFN (``diffmoe bench layers``, docs/benchmarks.md). float64 always takes the loop
    (grouped_mm has no float64 kernel).
    """
    if x.dtype not in _GROUPED_MM_DTYPES:
        return "loop"
    if impl == "auto":
        return "grouped_mm" if x.is_cuda else "loop"
    return impl


def dispatch(
    x: torch.Tensor,
    experts: nn.Module,
    token_idx: torch.Tensor,
    expert_idx: torch.Tensor,
    gate: torch.Tensor,
    impl: str = "auto",
) -> torch.Tensor:
    """Apply gated experts to tokens.

    Args:
        x: [N, d_model] tokens.
        experts: the stacked weights ``w1``, ``w3``, ``w2`` and ``num_experts`` of an ``Experts``.
        token_idx, expert_idx: [A] int64, assignment a sends token ``token_idx[a]`` to expert
            ``expert_idx[a]``; a token may appear any number of times (including zero).
        gate: [A] weight of each assignment (any float dtype; cast to x's).
        impl: ``auto`` | ``grouped_mm`` | ``loop``.
    Returns:
        y: [N, d_model] with y[n] = sum over a with token_idx[a] = n of gate[a] * expert(x[n]).
    """
    order = torch.argsort(expert_idx, stable=True)
    counts = torch.bincount(expert_idx, minlength=experts.num_experts)
    tok = token_idx[order]
    device, dtype = x.device.type, compute_dtype(x)
    with torch.autocast(device, enabled=False):  # run in the autocast dtype, explicitly
        x = x.to(dtype)
        w1, w3, w2 = (w.to(dtype) for w in (experts.w1, experts.w3, experts.w2))
        g = gate[order].to(dtype)
        if resolve_impl(impl, x) == "grouped_mm":
            h = _grouped_swiglu(x.index_select(0, tok), w1, w3, w2, counts) * g.unsqueeze(-1)
            return x.new_zeros(x.shape).index_add_(0, tok, h)
        return GatherSwiGLUScatter.apply(x, tok, g, counts.tolist(), w1, w3, w2)


def _grouped_swiglu(xs: torch.Tensor, w1, w3, w2, counts: torch.Tensor) -> torch.Tensor:
    """xs [A, d] sorted by expert, counts [E] -> [A, d] via three grouped GEMMs."""
    offs = torch.cumsum(counts, 0).to(torch.int32)
    g = F.grouped_mm(xs, w1.transpose(-2, -1), offs=offs)
    u = F.grouped_mm(xs, w3.transpose(-2, -1), offs=offs)
    return F.grouped_mm(F.silu(g) * u, w2.transpose(-2, -1), offs=offs)


class GatherSwiGLUScatter(torch.autograd.Function):
    """Gather, expert SwiGLU, gating and scatter-add fused per expert, with a hand-written backward.

    forward(x [N, d], tok [A] (token of each assignment, sorted by expert), gate [A], counts (E ints,
    summing to A), w1 [E, f, d], w3 [E, f, d], w2 [E, d, f]) -> y [N, d],
    y[n] = sum over a with tok[a] = n of gate[a] * expert(a)(x[n]).

    Expert by expert: gather its tokens, three GEMMs, SiLU and gating, scatter-add into y, so every
    [n_i, .] block is used while in cache and no [A, d] gathered copy is ever materialised (nor its
    gradient). Saves x, tok, gate and the pre-activations h1 = x W1^T, h3 = x W3^T [A, f].
    Backward per expert: da = dy W2 gives the gate's gradient sum(da * a) before it is scaled by the
    gate; dW2 = (g dy)^T a; dh1, dh3 through the SiLU product; dW1 = dh1^T x, dW3 = dh3^T x; and
    dx += dh1 W1 + dh3 W3 scattered back to the tokens.
    """

    @staticmethod
    def forward(ctx, x, tok, gate, counts, w1, w3, w2):
        A, f = tok.shape[0], w1.shape[1]
        rows = _row_slices(counts)
        h1, h3 = x.new_empty(A, f), x.new_empty(A, f)
        y = torch.zeros_like(x)
        for i, r in rows:
            t = tok[r]
            xr = x.index_select(0, t)
            g, u = torch.mm(xr, w1[i].t(), out=h1[r]), torch.mm(xr, w3[i].t(), out=h3[r])
            out = torch.mm(F.silu(g) * u, w2[i].t())
            y.index_add_(0, t, out.mul_(gate[r].unsqueeze(-1)))
        ctx.save_for_backward(x, tok, gate, w1, w3, w2, h1, h3)
        ctx.rows = rows
        return y

    @staticmethod
    def backward(ctx, dy):
        x, tok, gate, w1, w3, w2, h1, h3 = ctx.saved_tensors
        rows = ctx.rows
        dw1, dw3, dw2 = (torch.zeros_like(w) if len(rows) < w.shape[0] else torch.empty_like(w) for w in (w1, w3, w2))
        dx = torch.zeros_like(x)
        dgate = torch.zeros_like(gate)
        for i, r in rows:
            t = tok[r]
            xr, dyr = x.index_select(0, t), dy.index_select(0, t)
            g, u, gr = h1[r], h3[r], gate[r].unsqueeze(-1)
            act = F.silu(g)
            a = act * u
            da = dyr @ w2[i]  # before gating
            torch.sum(da * a, -1, out=dgate[r])
            torch.mm(dyr.mul_(gr).t(), a, out=dw2[i])
            da.mul_(gr)
            dh3 = da * act
            dh1 = torch.ops.aten.silu_backward(da * u, g)
            torch.mm(dh1.t(), xr, out=dw1[i])
            torch.mm(dh3.t(), xr, out=dw3[i])
            dx.index_add_(0, t, torch.mm(dh1, w1[i]).addmm_(dh3, w3[i]))
        return dx, None, dgate, None, dw1, dw3, dw2


def _row_slices(counts: list[int]) -> list[tuple[int, slice]]:
    """(expert, its rows) for every expert with at least one row."""
    out, start = [], 0
    for i, n in enumerate(counts):
        if n:
            out.append((i, slice(start, start + n)))
        start += n
    return out
