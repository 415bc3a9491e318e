"""A diffmoe ``Decoder`` as a transformers causal LM (custom code, ``trust_remote_code=True``).

A reference re-implementation of diffmoe's eval-mode forward with diffmoe's own parameter names, so
diffmoe's ``model.safetensors`` loads unchanged. Self-contained: imports only torch and transformers
(transformers copies this file to its module cache). No training paths.

This is the model's skeleton. :func:`diffmoe.hf.export.export_custom` appends the shared FFN building
blocks (``diffmoe/moe/remote.py``) and the export class of every routing family the model uses, and
ends the file with ``FFN_CLASSES`` (FFN kind -> that class): each layer's FFN is built from it. A layer
whose class routes once on the prompt (``routes_on_prompt``) keeps that routing on the cache object, so
a forward *with* a cache (``use_cache=True``, or a cache given) is what generation computes and a forward
without one is what scoring computes; ``generate(use_cache=False)`` is refused for such a model. A layer
that cannot decode token by token (``decodes`` False: it selects over the whole batch) makes cached
generation refused (``generate(use_cache=False)`` recomputes everything).
"""

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_diffmoe import DiffMoEConfig

_V5 = int(transformers.__version__.split(".")[0]) >= 5
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope(x, cos, sin):
    """Rotary embedding, "rotate half" layout. x [B, h, L, hd], cos/sin [B, 1, L, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_heads, self.n_kv = c["n_heads"], c["n_kv_heads"] or c["n_heads"]
        self.hd = c["d_model"] // self.n_heads
        self.wq = nn.Linear(c["d_model"], self.n_heads * self.hd, bias=False)
        self.wk = nn.Linear(c["d_model"], self.n_kv * self.hd, bias=False)
        self.wv = nn.Linear(c["d_model"], self.n_kv * self.hd, bias=False)
        self.wo = nn.Linear(self.n_heads * self.hd, c["d_model"], bias=False)

    def forward(self, x, cos, sin, mask, cache, layer):
        B, L, _ = x.shape
        q = self.wq(x).view(B, L, self.n_heads, self.hd).transpose(1, 2)
        k = self.wk(x).view(B, L, self.n_kv, self.hd).transpose(1, 2)
        v = self.wv(x).view(B, L, self.n_kv, self.hd).transpose(1, 2)
        q, k = rope(q, cos.to(x.dtype), sin.to(x.dtype)), rope(k, cos.to(x.dtype), sin.to(x.dtype))
        if cache is not None:
            k, v = cache.update(k, v, layer)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(B, L, -1))


class Block(nn.Module):
    def __init__(self, c, kind):
        super().__init__()
        d, f = c["d_model"], c["d_ff"]
        self.attn_norm, self.ffn_norm = RMSNorm(d, c["norm_eps"]), RMSNorm(d, c["norm_eps"])
        self.attn = Attention(c)
        self.ffn = FFN_CLASSES[kind](d, f, c["moe"], c["moe"].get(kind, {}))  # noqa: F821 (appended by the export)

    def forward(self, x, cos, sin, mask, ctx):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, ctx["cache"], ctx["layer"])
        return x + self.ffn(self.ffn_norm(x), ctx)


def layer_kinds(c):
    return [c["ffn"]] * c["n_layers"] if isinstance(c["ffn"], str) else list(c["ffn"])


class DiffMoEForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = DiffMoEConfig
    base_model_prefix = "diffmoe"
    _tied_weights_keys = {"lm_head.weight": "embed.weight"} if _V5 else ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        c = config.diffmoe
        self.kinds = layer_kinds(c)
        self.embed = nn.Embedding(c["vocab_size"], c["d_model"])
        self.blocks = nn.ModuleList(Block(c, kind) for kind in self.kinds)
        self.norm = RMSNorm(c["d_model"], c["norm_eps"])
        self.lm_head = nn.Linear(c["d_model"], c["vocab_size"], bias=False)
        hd = c["d_model"] // c["n_heads"]
        self.rope_theta, self.head_dim = float(c["rope_theta"]), hd
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def generate(self, *args, **kwargs):
        config = kwargs.get("generation_config") or self.generation_config
        use_cache = kwargs.get("use_cache", getattr(config, "use_cache", True))
        on_prompt = [
            f"layer {i} ({k})" for i, (k, b) in enumerate(zip(self.kinds, self.blocks)) if b.ffn.routes_on_prompt
        ]
        if use_cache is False and on_prompt:
            raise ValueError(
                f"generate(use_cache=False) is refused: {', '.join(on_prompt)} routes once on the prompt "
                "and keeps that routing in the cache; without a cache the forward routes otherwise"
            )
        unable = [f"layer {i} ({k})" for i, (k, b) in enumerate(zip(self.kinds, self.blocks)) if not b.ffn.decodes]
        if use_cache is not False and unable:
            raise ValueError(
                f"cannot generate token by token: {', '.join(unable)} does not decode as its full forward "
                "computes (it selects over the whole batch, future tokens included); "
                "generate(use_cache=False) recomputes every step"
            )
        return super().generate(*args, **kwargs)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        past_key_values=None,
        use_cache=None,
        labels=None,
        inputs_embeds=None,
        **kwargs,
    ):
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:  # explicit only: never derived from config.use_cache
            cache = DynamicCache(config=self.config) if _V5 else DynamicCache()
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, L, _ = x.shape
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + L, dtype=torch.bool, device=x.device)
        keys = attention_mask[:, : past + L].bool()  # [B, past + L]
        if position_ids is None:
            position_ids = (keys.long().cumsum(-1) - 1).clamp(min=0)[:, past : past + L]
        inv_freq = 1.0 / self.rope_theta ** (
            torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=x.device) / self.head_dim
        )
        angles = (position_ids.double().unsqueeze(-1) * inv_freq).repeat(1, 1, 2).unsqueeze(1)  # [B, 1, L, hd]
        cos, sin = angles.cos().float(), angles.sin().float()
        q = torch.arange(L, device=x.device).view(L, 1) + past
        j = torch.arange(past + L, device=x.device).view(1, -1)
        mask = ((j <= q) & keys[:, None, None, :]) | (j == q)  # causal, padding excluded, never empty
        ctx = {"cache": cache, "past": past, "valid": keys[:, past : past + L]}
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, dict(ctx, layer=i))
        logits = self.lm_head(self.norm(x)).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
