"""Models whose every layer PhiMoE's routing computes (the family that declares ``phimoe`` in its
``Family.native``) to transformers' ``PhimoeForCausalLM``, through the exact widened stream.

PhiMoE's norms are ``nn.LayerNorm`` (mean-centred, eps = ``rms_norm_eps``); diffmoe's are RMSNorm. At
equal width no weights make them agree, but in a residual stream widened from d to D > d they do:

    Q            D x d, orthonormal columns, each orthogonal to the all-ones vector (:func:`basis`)
    residual     H = Q h, so mean(H) = 0 and LayerNorm(H) with weight 1, bias 0, eps' = eps * d / D
                 equals sqrt(D / d) * Q * rmsnorm_without_gain(h)
    writers      embed -> embed Q^T (rows), o_proj -> Q wo, experts' w2 -> Q w2
    readers      W -> sqrt(d / D) W diag(g) Q^T for q, k, v, router, w1, w3 (g: the gain of the RMSNorm
                 before them) and lm_head (g: the final norm's gain)

so every reader sees exactly what it saw in diffmoe and the logits are unchanged (up to float rounding).
The embeddings are untied in the export (the reader lm_head differs from the writer embed).
D is the next multiple of 8 above d (transformers' default CPU ``grouped_mm`` expert path needs
16-byte strides in fp32); an expert hidden size f that is not a multiple of 8 is padded with zero units
(silu(0) * 0 = 0), for the same reason.

The config sets ``head_dim`` explicitly (hidden_size / heads no longer gives it). transformers 4.x
ignores that field for PhiMoE and derives head_dim = hidden_size / heads, so these exports need
transformers >= 5 (the config says so in ``note``); ``--format custom`` serves older versions.
Eval routing matches (``router_jitter_noise`` = ``jitter_eps``; ``input_jitter_noise`` 0).
"""

from __future__ import annotations

import math

import torch

from ..config import ModelConfig

ALIGN = 8
NOTE = (
    "diffmoe export in a widened residual stream (hidden_size = d_model + k, LayerNorm "
    "weight 1 / bias 0 acting as RMSNorm): needs transformers >= 5, because 4.x derives head_dim as "
    "hidden_size / num_attention_heads instead of reading head_dim"
)


def widened_width(d: int) -> int:
    """D: the smallest multiple of 8 strictly above ``d``."""
    return (d // ALIGN + 1) * ALIGN


def padded_ff(f: int) -> int:
    """The expert hidden size in the export: ``f`` rounded up to a multiple of 8."""
    return -(-f // ALIGN) * ALIGN


def basis(d: int, D: int | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Q [D, d]: orthonormal columns orthogonal to the all-ones vector. Deterministic (no random numbers):
    the QR of the first d columns of the identity with the ones direction projected out, signs fixed so
    that R has a positive diagonal."""
    D = widened_width(d) if D is None else D
    if D <= d:
        raise ValueError(f"the widened width D={D} must exceed d={d}")
    m = torch.eye(D, d, dtype=torch.float64)
    m = m - m.mean(0, keepdim=True)  # project out the all-ones direction
    q, r = torch.linalg.qr(m)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.to(dtype)


def to_phimoe(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """diffmoe ``state`` (``Decoder.state_dict()``, every layer a PhiMoE layer) -> the tensors of the widened
    ``PhimoeForCausalLM`` checkpoint (legacy per-expert names, fp32). Computed in float64."""
    d, n = cfg.d_model, cfg.n_layers
    D = widened_width(d)
    q = basis(d, D)
    s = math.sqrt(d / D)
    f = cfg.moe.d_ff or cfg.d_ff
    fp = padded_ff(f)

    def t(name):
        return state[name].detach().to("cpu", torch.float64)

    def reader(w, gain):  # [out, d] -> [out, D]
        return s * (w * gain) @ q.T

    out = {
        "model.embed_tokens.weight": t("embed.weight") @ q.T,
        "lm_head.weight": reader(t("lm_head.weight"), t("norm.weight")),
        "model.norm.weight": torch.ones(D, dtype=torch.float64),
        "model.norm.bias": torch.zeros(D, dtype=torch.float64),
    }
    for i in range(n):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        g_attn, g_ffn = t(src + "attn_norm.weight"), t(src + "ffn_norm.weight")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[dst + norm + ".weight"] = torch.ones(D, dtype=torch.float64)
            out[dst + norm + ".bias"] = torch.zeros(D, dtype=torch.float64)
        for x in "qkv":
            out[dst + f"self_attn.{x}_proj.weight"] = reader(t(src + f"attn.w{x}.weight"), g_attn)
        out[dst + "self_attn.o_proj.weight"] = q @ t(src + "attn.wo.weight")
        moe = dst + "block_sparse_moe."
        out[moe + "gate.weight"] = reader(t(src + "ffn.router.weight"), g_ffn)
        w1, w3, w2 = (t(src + f"ffn.experts.{x}") for x in ("w1", "w3", "w2"))  # [E,f,d] [E,f,d] [E,d,f]
        if fp != f:
            w1, w3 = (torch.nn.functional.pad(w, (0, 0, 0, fp - f)) for w in (w1, w3))
            w2 = torch.nn.functional.pad(w2, (0, fp - f))
        for j in range(w1.shape[0]):
            out[moe + f"experts.{j}.w1.weight"] = reader(w1[j], g_ffn)
            out[moe + f"experts.{j}.w3.weight"] = reader(w3[j], g_ffn)
            out[moe + f"experts.{j}.w2.weight"] = q @ w2[j]
    return {k: v.to(torch.float32).contiguous() for k, v in out.items()}


def config_fields(cfg: ModelConfig) -> dict:
    """The PhiMoE-specific ``config.json`` fields (they override the shared ones of the native export; the
    routing's own, ``num_experts_per_tok`` and the jitter, come from the family's ``Family.native``)."""
    d = cfg.d_model
    D = widened_width(d)
    moe = cfg.moe
    return {
        "hidden_size": D,
        "intermediate_size": padded_ff(moe.d_ff or cfg.d_ff),
        "rms_norm_eps": cfg.norm_eps * d / D,
        "head_dim": cfg.head_dim,
        "tie_word_embeddings": False,
        "num_local_experts": moe.num_experts,
        "output_router_logits": False,
        "attention_bias": False,
        "lm_head_bias": False,
        "sliding_window": None,
        "diffmoe_widened_from": d,
        "note": NOTE,
    }
