"""The eval-mode building blocks a custom-code transformers export ships (``trust_remote_code=True``).

:func:`diffmoe.hf.export.export_custom` writes ``modeling_diffmoe.py`` from the model skeleton of
``diffmoe/hf/remote``, this file, and the ``remote`` class of every family the model uses
(:class:`~diffmoe.moe.registry.Family`). A family's remote class subclasses :class:`RemoteFFN` (or
:class:`RemoteMoE`), keeps diffmoe's parameter names, and may use only ``math``, ``torch``, ``F``, ``nn``
and the names defined here: its source is copied into the export, where nothing else exists. No
``from __future__`` import here either: this file is pasted into the middle of another.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class RemoteFFN(nn.Module):
    """One layer's FFN in an export: ``forward(x [B, L, d], ctx) -> [B, L, d]`` in eval mode, where ctx is
    a dict: ``cache`` (the transformers cache, or None), ``past`` (positions already in it), ``valid`` [B, L]
    bool (False at padding) and ``layer`` (the layer's index)."""

    decodes = True
    """Decoding token by token with the cache computes what the full forward computes."""
    routes_on_prompt = False
    """Generation routes once on the prompt and keeps that routing in the cache (a forward without a
    cache routes otherwise, so ``generate(use_cache=False)`` is refused)."""
    note = None
    """A warning the export's ``config.json`` carries (``note``) for a model with such a layer."""


class RemoteSwiGLU(RemoteFFN):
    """The dense FFN: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, d, f, moe, opt):
        super().__init__()
        self.w1, self.w3, self.w2 = (
            nn.Linear(d, f, bias=False),
            nn.Linear(d, f, bias=False),
            nn.Linear(f, d, bias=False),
        )

    def forward(self, x, ctx):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RemoteExperts(nn.Module):
    """E SwiGLU experts stacked: w1, w3 [E, f, d], w2 [E, d, f]."""

    def __init__(self, E, d, f):
        super().__init__()
        self.w1, self.w3 = nn.Parameter(torch.empty(E, f, d)), nn.Parameter(torch.empty(E, f, d))
        self.w2 = nn.Parameter(torch.empty(E, d, f))

    def dispatch(self, x, expert_idx, token_idx, gate):
        """y[n] = sum over assignments a with token_idx[a] = n of gate[a] * expert(expert_idx[a])(x[n])."""
        y = torch.zeros_like(x)
        for e in range(self.w1.shape[0]):
            sel = expert_idx == e
            if sel.any():
                t = token_idx[sel]
                xr = x.index_select(0, t)
                h = F.silu(xr @ self.w1[e].t()) * (xr @ self.w3[e].t())
                y.index_add_(0, t, (h @ self.w2[e].t()) * gate[sel].to(x.dtype).unsqueeze(-1))
        return y

    def merge(self, weights):
        """Merged (w1, w3, w2) per row of weights [S, E]: [S, f, d], [S, f, d], [S, d, f]."""
        S, E = weights.shape
        return [(weights.to(w.dtype) @ w.reshape(E, -1)).view(S, *w.shape[1:]) for w in (self.w1, self.w3, self.w2)]


class RemoteMoE(RemoteFFN):
    """Router (d -> E, applied in float32) and experts; ``opt`` is the family's config section."""

    def __init__(self, d, f, moe, opt):
        super().__init__()
        self.E, self.opt = moe["num_experts"], opt
        self.router = nn.Linear(d, self.E, bias=False)
        self.experts = RemoteExperts(self.E, d, moe.get("d_ff") or f)

    def logits(self, x):
        """Router logits of x [..., d] in at least float32."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        return F.linear(x.to(dtype), self.router.weight.to(dtype))

    def probs(self, x):
        return self.logits(x).softmax(-1)


def remote_merged_swiglu(x, merged):
    """x [S, T, d] through merged experts [S, ...] -> [S, T, d]."""
    w1, w3, w2 = (w.to(x.dtype) for w in merged)
    h = F.silu(torch.bmm(x, w1.transpose(1, 2))) * torch.bmm(x, w3.transpose(1, 2))
    return torch.bmm(h, w2.transpose(1, 2))


def remote_segments(x, T):
    """x [B, L, d] -> (segments [B, N, T, d] zero-padded, means over each segment's real tokens [B, N, d] float32+)."""
    B, L, d = x.shape
    N = math.ceil(L / T)
    xp = F.pad(x, (0, 0, 0, N * T - L)).view(B, N, T, d)
    counts = (L - torch.arange(N, device=x.device) * T).clamp(max=T)
    return xp, xp.to(torch.promote_types(x.dtype, torch.float32)).sum(2) / counts.view(1, N, 1)


def dispatch_top(moe, x, gate, idx, keep):
    """Run a token-choice selection of x [B, L, d] (tokens flattened): gate, idx [N, k], only where keep [N, k]."""
    B, L, d = x.shape
    tokens = torch.arange(B * L, device=x.device).unsqueeze(1).expand_as(idx)
    return moe.experts.dispatch(x.reshape(-1, d), idx[keep], tokens[keep], gate[keep]).view(B, L, d)
