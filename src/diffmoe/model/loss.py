"""Cross-entropy of the LM head computed a chunk of tokens at a time, so that the full logits
[tokens, vocab] never exist: memory grows with tokens x d_model, not tokens x vocabulary.

At the paper configs (8 x 4096 tokens, vocabulary 50,304) full float32 logits are 6.6 GB per
micro-batch, and their gradient as much again; here a chunk holds at most ``CHUNK_LOGITS`` logits.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..runtime import compute_dtype

CHUNK_LOGITS = 2**25
"""Logits per chunk (128 MiB in float32): a chunk has max(1, CHUNK_LOGITS // vocab) tokens."""


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """Per-token loss of the head ``weight``: h [..., d], weight [V, d], labels [...] int64 -> [...] float32
    (float64 for float64 inputs), equal to ``F.cross_entropy(F.linear(h, weight).float(), labels, reduction="none")``.

    Under autocast h and weight are cast to the autocast dtype (as ``F.linear`` is); the logits are
    upcast to float32 for the log-sum-exp and the loss. chunk: tokens per chunk (default
    :data:`CHUNK_LOGITS` // V). ``weight`` is taken as passed: read it from the module inside the
    module's forward so that FSDP has unsharded it.
    """
    chunk = chunk or max(1, CHUNK_LOGITS // weight.shape[0])
    device = h.device.type
    if torch.is_autocast_enabled(device):
        dtype = compute_dtype(h)
        with torch.autocast(device, enabled=False):
            return linear_cross_entropy(h.to(dtype), weight.to(dtype), labels, chunk)
    flat = LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, labels.reshape(-1), chunk)
    return flat.view(labels.shape)


class LinearCrossEntropy(torch.autograd.Function):
    """forward(h [N, d], weight [V, d], labels [N], chunk) -> loss [N], chunk tokens at a time, in
    float32 (float64 for float64 inputs).

    z = h weight^T per chunk, upcast to the loss dtype; loss = logsumexp(z) - z[label]. Saves h, weight, labels and the
    log-sum-exp [N]; backward recomputes each chunk's logits (unless all N tokens fit in one chunk: then
    its logits, at most one chunk's memory, are kept for backward), forms dz = (softmax(z) -
    onehot(label)) x dloss (cast to h's dtype, as the gradient of the upcast is) and accumulates
    dh = dz weight and dweight = dz^T h, the latter in at least float32 across chunks.
    """

    @staticmethod
    def forward(ctx, h, weight, labels, chunk):
        up = torch.promote_types(h.dtype, torch.float32)
        loss = torch.empty(h.shape[0], dtype=up, device=h.device)
        lse = torch.empty_like(loss)
        for s in range(0, h.shape[0], chunk):
            sl = slice(s, s + chunk)
            z = (h[sl] @ weight.t()).to(up)  # [c, V]
            torch.logsumexp(z, -1, out=lse[sl])
            torch.sub(lse[sl], z.gather(1, labels[sl, None]).squeeze(1), out=loss[sl])
        kept = z if h.shape[0] <= chunk else None  # one chunk: keep its logits rather than recompute them
        ctx.save_for_backward(h, weight, labels, lse, kept)
        ctx.chunk = chunk
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, dloss):
        h, weight, labels, lse, kept = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        dh = torch.empty_like(h) if need_h else None
        acc = torch.promote_types(weight.dtype, torch.float32)
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for s in range(0, h.shape[0], ctx.chunk):
            sl = slice(s, s + ctx.chunk)
            z = kept if kept is not None else (h[sl] @ weight.t()).to(lse.dtype)
            dz = z.sub(lse[sl, None]).exp_()  # softmax [c, V]
            dz.scatter_add_(1, labels[sl, None], dz.new_full((dz.shape[0], 1), -1.0))
            dz = dz.mul_(dloss[sl, None]).to(h.dtype)
            if need_h:
                torch.mm(dz, weight, out=dh[sl])
            if need_w and dz.dtype == acc:
                dw.addmm_(dz.t(), h[sl])
            elif need_w:  # low precision: each chunk's product rounded once, the sum kept in float32
                dw.add_(dz.t() @ h[sl])
        return dh, None if dw is None else dw.to(weight.dtype), None, None
