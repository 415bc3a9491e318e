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
    return _merge_chunk(weights, experts.w1, experts.w3, experts.w2, experts.w1.dtype)


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
    only x and the two pre-activations h1 = x W1^T, h3 = x W3^T (less than a dense SwiGLU keeps) instead
    of S merged copies of the experts. Merged weights exist ``chunk`` segments at a time, in forward and
    again in backward, so the extra memory is at most ``chunk`` merged experts. Backward per chunk:
    dW = dh^T x for the merged weights, then dweights = dW W^T and dw_experts += weights^T dW, the two
    GEMMs of the merge's backward.
    """

    @staticmethod
    def forward(ctx, x, weights, w1, w3, w2, chunk):
        S = x.shape[0]
        h1 = x.new_empty(*x.shape[:2], w1.shape[1])
        h3 = torch.empty_like(h1)
        y = torch.empty_like(x)
        for s in range(0, S, chunk):
            m1, m3, m2 = _merge_chunk(weights[s:s + chunk], w1, w3, w2, x.dtype)
            xs = x[s:s + chunk]
            torch.bmm(xs, m1.transpose(1, 2), out=h1[s:s + chunk])
            torch.bmm(xs, m3.transpose(1, 2), out=h3[s:s + chunk])
            torch.bmm(F.silu(h1[s:s + chunk]) * h3[s:s + chunk], m2.transpose(1, 2), out=y[s:s + chunk])
        ctx.save_for_backward(x, weights, w1, w3, w2, h1, h3)
        ctx.chunk = chunk
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weights, w1, w3, w2, h1, h3 = ctx.saved_tensors
        S, E = weights.shape
        chunk = ctx.chunk
        dx = torch.empty_like(x)
        dweights = torch.empty(S, E, dtype=weights.dtype, device=weights.device)
        stacks = [w.reshape(E, -1) for w in (w1, w3, w2)]
        acc_dtype = torch.promote_types(w1.dtype, torch.float32)
        dstacks = [torch.zeros(E, st.shape[1], dtype=acc_dtype, device=st.device) for st in stacks]
        dy = dy.contiguous()
        for s in range(0, S, chunk):
            sl = slice(s, s + chunk)
            m1, m3, m2 = _merge_chunk(weights[sl], w1, w3, w2, x.dtype)
            g1, u = h1[sl], h3[sl]
            sig = torch.sigmoid(g1)
            act = g1 * sig  # silu(h1), recomputed
            a = act * u
            dys = dy[sl]
            dm2 = torch.bmm(dys.transpose(1, 2), a)  # [c, d, f]
            da = torch.bmm(dys, m2)  # [c, T, f]
            dh3 = da * act
            dh1 = da * u * (sig * (1 + g1 * (1 - sig)))
            xs = x[sl]
            dm1 = torch.bmm(dh1.transpose(1, 2), xs)  # [c, f, d]
            dm3 = torch.bmm(dh3.transpose(1, 2), xs)
            torch.baddbmm(torch.bmm(dh1, m1), dh3, m3, out=dx[sl])
            c = dm1.shape[0]
            dws = [dm.reshape(c, -1).to(st.dtype) for dm, st in zip((dm1, dm3, dm2), stacks)]
            dweights[sl] = sum(dw @ st.t() for dw, st in zip(dws, stacks)).to(weights.dtype)
            wc = weights[sl].to(acc_dtype)
            for acc, dw in zip(dstacks, dws):
                acc.addmm_(wc.t(), dw.to(acc_dtype))
        dw1, dw3, dw2 = (acc.view(w.shape).to(w.dtype) for acc, w in zip(dstacks, (w1, w3, w2)))
        return dx, dweights, dw1, dw3, dw2, None


def _merge_chunk(weights: torch.Tensor, w1, w3, w2, dtype) -> Merged:
    """Merged (w1, w3, w2) for rows of ``weights`` [c, E], in ``dtype``: one GEMM per stack."""
    c, E = weights.shape
    return tuple((weights.to(w.dtype) @ w.reshape(E, -1)).view(c, *w.shape[1:]).to(dtype)  # type: ignore
                 for w in (w1, w3, w2))


def segment_merged_swiglu(x: torch.Tensor, weights: torch.Tensor, experts: Experts,
                          chunk: int | None = None) -> torch.Tensor:
    """x [S, T, d], weights [S, E] -> [S, T, d] through :class:`SegmentMergedSwiGLU`.

    chunk: segments merged at a time (default: E, so the transient merged weights never exceed the
    size of the expert stack).
    """
    chunk = chunk or experts.num_experts
    args = (weights, experts.w1, experts.w3, experts.w2, chunk)
    device = x.device.type
    if torch.is_autocast_enabled(device):  # run in the autocast dtype, merging in the weights' dtype
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return SegmentMergedSwiGLU.apply(x.to(dtype), *args)
    return SegmentMergedSwiGLU.apply(x, *args)
