"""Lory's expert merge as small ops: merge by one GEMM, then a per-segment SwiGLU.

For routing weights e [S, E] (one row per segment), the merged expert of segment s is
sum_i e[s, i] * W_i for each of w1, w3, w2. It is computed as one GEMM of e with the flattened stack
[E, d_ff * d_model], never as a broadcast multiply-and-sum; autograd then gives the two GEMMs of the
backward (e^T G for the experts, G W^T for the weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import compute_dtype, scratch

Merged = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def merge_experts(weights: torch.Tensor, experts: nn.Module) -> Merged:
    """Merge the experts (the stacked ``w1``, ``w3``, ``w2`` of an ``Experts``) per row of ``weights``.

    weights: [S, E] (cast to the experts' dtype).
    Returns (w1 [S, d_ff, d], w3 [S, d_ff, d], w2 [S, d, d_ff]).
    """
    return merge_stacks(weights, experts.w1, experts.w3, experts.w2, experts.w1.dtype)


def merged_swiglu(x: torch.Tensor, merged: Merged) -> torch.Tensor:
    """Run segment s's merged SwiGLU on its tokens. x [S, T, d] -> [S, T, d].

    With S == 1 the merged weights are used as plain linear layers (the dense-model path).
    """
    w1, w3, w2 = (w.to(x.dtype) for w in merged)
    if x.shape[0] == 1:
        return F.linear(F.silu(F.linear(x, w1[0])) * F.linear(x, w3[0]), w2[0])
    h = F.silu(torch.bmm(x, w1.transpose(1, 2))) * torch.bmm(x, w3.transpose(1, 2))
    return torch.bmm(h, w2.transpose(1, 2))


class SegmentMergedSwiGLU(torch.autograd.Function):
    """Per-segment merged SwiGLU that recomputes the merged weights in backward.

    forward(x [S, T, d], weights [S, E], w1 [E, f, d], w3 [E, f, d], w2 [E, d, f], chunk) -> y [S, T, d]

    Equal to ``merged_swiglu(x, merge_experts(weights, experts))`` in value and gradients, but it saves
    only x and the pre-activations [h1 | h3] = x [W1; W3]^T (less than a dense SwiGLU keeps) instead of
    S merged copies of the experts. Merged weights exist ``chunk`` segments at a time, in forward and
    again in backward, in scratch buffers (:func:`diffmoe.runtime.scratch`: on CPU the same memory at
    every call, so no fresh large allocation page-faults; in backward they receive the merged weights'
    gradients once the weights are used), so the extra memory is at most ``chunk`` merged experts. W1 and W3 are merged into one [c, 2f, d] buffer, so each of the up projection, its
    weight gradient and its input gradient is one batched GEMM of width 2f. Backward per chunk:
    dW = dh^T x for the merged weights, then dweights = dW W^T and dw_experts += weights^T dW, the two
    GEMMs of the merge's backward (accumulated in at least float32).
    """

    @staticmethod
    def forward(ctx, x, weights, w1, w3, w2, chunk):
        S, T, _ = x.shape
        f = w1.shape[1]
        m13, m2 = _merge_buffers(x, w1, min(chunk, S))
        h13 = x.new_empty(S, T, 2 * f)
        y = torch.empty_like(x)
        for s in range(0, S, chunk):
            sl = slice(s, s + chunk)
            c13, c2 = _merge_into(weights[sl], (w1, w3, w2), m13, m2)
            torch.bmm(x[sl], c13.transpose(1, 2), out=h13[sl])
            h1, h3 = h13[sl].split(f, -1)
            torch.bmm(F.silu(h1) * h3, c2.transpose(1, 2), out=y[sl])
        ctx.save_for_backward(x, weights, w1, w3, w2, h13)
        ctx.chunk = chunk
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weights, w1, w3, w2, h13 = ctx.saved_tensors
        S, T, _ = x.shape
        E, f = w1.shape[:2]
        chunk = min(ctx.chunk, S)
        experts = (w1, w3, w2)
        stacks = [w.reshape(E, -1) for w in experts]
        acc_dtype = torch.promote_types(w1.dtype, torch.float32)
        m13, m2 = _merge_buffers(x, w1, chunk)  # merged weights, then (once used) their gradients
        dh13 = scratch("merged_dh13", (chunk, T, 2 * f), x)
        dx = torch.empty_like(x)
        dweights = torch.empty(S, E, dtype=weights.dtype, device=weights.device)
        dstacks = [torch.empty(E, st.shape[1], dtype=acc_dtype, device=st.device) for st in stacks]
        dy = dy.contiguous()
        for s in range(0, S, chunk):
            sl = slice(s, s + chunk)
            c13, c2 = _merge_into(weights[sl], experts, m13, m2)
            c = c13.shape[0]
            h1, h3 = h13[sl].split(f, -1)
            act = F.silu(h1)  # recomputed
            dys, xs, dh = dy[sl], x[sl], dh13[:c]
            da = torch.bmm(dys, c2)  # [c, T, f]
            g2 = torch.bmm(dys.transpose(1, 2), act * h3, out=c2)  # dW2 [c, d, f], over merged W2
            dh1, dh3 = dh.split(f, -1)
            torch.mul(da, act, out=dh3)
            torch.ops.aten.silu_backward.grad_input(da * h3, h1, grad_input=dh1)
            torch.bmm(dh, c13, out=dx[sl])
            g13 = torch.bmm(dh.transpose(1, 2), xs, out=c13)  # [dW1; dW3] [c, 2f, d], over merged W13
            halves = g13.view(c, 2, -1)
            dws = [halves[:, 0], halves[:, 1], g2.view(c, -1)]
            dwts = torch.zeros(c, E, dtype=stacks[0].dtype, device=x.device)
            for dw, st in zip(dws, stacks):
                dwts.addmm_(dw.to(st.dtype), st.t())
            dweights[sl] = dwts.to(weights.dtype)
            wc = weights[sl].to(acc_dtype).t()
            for acc, dw in zip(dstacks, dws):
                if s == 0:
                    torch.mm(wc, dw.to(acc_dtype), out=acc)
                else:
                    acc.addmm_(wc, dw.to(acc_dtype))
        dw1, dw3, dw2 = (acc.view(w.shape).to(w.dtype) for acc, w in zip(dstacks, experts))
        return dx, dweights, dw1, dw3, dw2, None


def _merge_buffers(x: torch.Tensor, w1: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised (m13 [chunk, 2f, d], m2 [chunk, d, f]) in x's dtype, for :func:`_merge_into`:
    scratch buffers (:func:`diffmoe.runtime.scratch`), the same memory at every call."""
    f, d = w1.shape[1:]
    return scratch("merged_w13", (chunk, 2 * f, d), x), scratch("merged_w2", (chunk, d, f), x)


def _merge_into(weights: torch.Tensor, experts, m13: torch.Tensor, m2: torch.Tensor):
    """Merge (w1; w3) into m13[:c] and w2 into m2[:c] for weights [c, E]; returns those views.

    One GEMM per stack, written straight into the buffer when the dtypes agree (merged in the
    experts' dtype, then cast otherwise).
    """
    c, E = weights.shape
    e = weights.to(experts[0].dtype)
    c13, c2 = m13[:c], m2[:c]
    halves = c13.view(c, 2, -1)
    for w, out in zip(experts, (halves[:, 0], halves[:, 1], c2.view(c, -1))):
        if out.dtype == w.dtype:
            torch.mm(e, w.reshape(E, -1), out=out)
        else:
            out.copy_(e @ w.reshape(E, -1))
    return c13, c2


def merge_stacks(weights: torch.Tensor, w1, w3, w2, dtype) -> Merged:
    """Merged (w1, w3, w2) for rows of ``weights`` [c, E], in ``dtype``: one GEMM per stack."""
    c, E = weights.shape
    return tuple(
        (weights.to(w.dtype) @ w.reshape(E, -1)).view(c, *w.shape[1:]).to(dtype)  # type: ignore
        for w in (w1, w3, w2)
    )


def segment_merged_swiglu(
    x: torch.Tensor, weights: torch.Tensor, experts: nn.Module, chunk: int | None = None
) -> torch.Tensor:
    """x [S, T, d], weights [S, E] -> [S, T, d] through :class:`SegmentMergedSwiGLU`.

    chunk: segments merged at a time (default: E, so the transient merged weights never exceed the
    size of the expert stack).
    """
    chunk = chunk or experts.num_experts
    args = (weights, experts.w1, experts.w3, experts.w2, chunk)
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):  # run in the autocast dtype, merging in the weights' dtype
        return SegmentMergedSwiGLU.apply(x.to(dtype), *args)
