"""A diffmoe ``Decoder`` as a transformers causal LM (custom code, ``trust_remote_code=True``).

A reference re-implementation of diffmoe's eval-mode forward, for every FFN kind (``dense``,
``lory``, ``topk``, ``sparsemixer``, ``expert_choice``, mixed per layer), with diffmoe's own
parameter names, so diffmoe's ``model.safetensors`` loads unchanged. Self-contained: imports only
torch and transformers (transformers copies this file to its module cache). No training paths.

Lory: a forward *with* a cache (``cache`` / ``past_key_values`` given, or ``use_cache=True``) routes
each Lory layer once on the mean of the prompt's real tokens (``attention_mask`` excludes padding),
merges once and keeps the merged weights on the cache object for the decode steps (diffmoe's
``prompt`` routing, what ``diffmoe.eval.generate`` does). A forward *without* a cache (scoring,
perplexity) uses the config's routing, causal ``segment`` routing as trained. ``generate(use_cache=False)``
is refused for a model with a Lory layer (it would silently route by segments).

Expert choice (and top-k with an evaluation capacity, ``eval_capacity_factor``; top-k trained with a
``capacity_factor`` evaluates dropless as in diffmoe's eval mode): selection is over the whole batch
(padding excluded), so a token's output depends on later tokens and on the other rows: scores leak the
future, and cached token-by-token generation is refused (``generate(use_cache=False)`` recomputes everything).
"""

import math

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


class SwiGLU(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False), nn.Linear(f, d, bias=False)

    def forward(self, x, ctx):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Experts(nn.Module):
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


def merged_swiglu(x, merged):
    """x [S, T, d] through merged experts [S, ...] -> [S, T, d]."""
    w1, w3, w2 = (w.to(x.dtype) for w in merged)
    h = F.silu(torch.bmm(x, w1.transpose(1, 2))) * torch.bmm(x, w3.transpose(1, 2))
    return torch.bmm(h, w2.transpose(1, 2))


def segments(x, T):
    """x [B, L, d] -> (segments [B, N, T, d] zero-padded, means over each segment's real tokens [B, N, d] float32+)."""
    B, L, d = x.shape
    N = math.ceil(L / T)
    xp = F.pad(x, (0, 0, 0, N * T - L)).view(B, N, T, d)
    counts = (L - torch.arange(N, device=x.device) * T).clamp(max=T)
    return xp, xp.to(torch.promote_types(x.dtype, torch.float32)).sum(2) / counts.view(1, N, 1)


class MoE(nn.Module):
    """Router (d -> E, logits in float32) and experts; ``kind`` and its options pick the routing."""

    def __init__(self, kind, d, f, moe):
        super().__init__()
        self.kind, self.E, self.opt = kind, moe["num_experts"], moe.get(kind, {})
        self.router = nn.Linear(d, self.E, bias=False)
        self.experts = Experts(self.E, d, moe.get("d_ff") or f)

    def probs(self, x):
        dtype = torch.promote_types(x.dtype, torch.float32)
        return F.linear(x.to(dtype), self.router.weight.to(dtype)).softmax(-1)

    def forward(self, x, ctx):
        B, L, d = x.shape
        if self.kind == "lory":
            return self.lory(x, ctx)
        if self.kind == "expert_choice":
            return self.expert_choice(x, ctx)
        xf, valid = x.reshape(-1, d), ctx["valid"].reshape(-1)
        N = xf.shape[0]
        if self.kind == "topk":
            k = self.opt["top_k"]
            gate, idx = self.probs(xf).topk(k, dim=-1)  # [N, k]
            if self.opt["renormalize"]:
                gate = gate / gate.sum(-1, keepdim=True)
            keep = valid.unsqueeze(1).expand(N, k)
            if self.opt.get("eval_capacity_factor") is not None:  # GShard order: every slot 1 before any slot 2
                if ctx["cache"] is not None:
                    raise ValueError("top-k with an evaluation capacity cannot decode token by token")
                capacity = math.ceil(self.opt["eval_capacity_factor"] * int(valid.sum()) * k / self.E)
                onehot = F.one_hot(idx.t().reshape(-1), self.E) * keep.t().reshape(-1, 1)
                position = (onehot.cumsum(0) * onehot).sum(-1) - 1
                keep = keep & (position < capacity).view(k, N).t()
        else:  # sparsemixer, eval: deterministic top-2, gate = the slot's masked-softmax probability
            dtype = torch.promote_types(x.dtype, torch.float32)
            logits = F.linear(xf.to(dtype), self.router.weight.to(dtype))
            scores, gates, picks = logits, [], []
            for _ in range(2):
                top = scores.max(-1, keepdim=True).values
                band = ~(((top - scores) / logits.abs().clamp(min=top)) > 2 * self.opt["jitter_eps"])
                sel = scores.masked_fill(~band, float("-inf")).argmax(-1, keepdim=True)
                gates.append(logits.masked_fill(~band, float("-inf")).softmax(-1).gather(-1, sel))
                picks.append(sel)
                scores = scores.scatter(-1, sel, float("-inf"))
            gate, idx = torch.cat(gates, -1), torch.cat(picks, -1)
            keep = valid.unsqueeze(1).expand(N, 2)
        tokens = torch.arange(N, device=x.device).unsqueeze(1).expand_as(idx)
        return self.experts.dispatch(xf, idx[keep], tokens[keep], gate[keep]).view(B, L, d)

    def expert_choice(self, x, ctx):
        """Each expert takes its capacity of the batch's highest-scoring tokens (or segments)."""
        if ctx["cache"] is not None:
            raise ValueError("expert choice routing cannot decode token by token (it selects over the whole batch)")
        B, L, d = x.shape
        T = self.opt["segment_len"] if self.opt["granularity"] == "segment" else 1
        valid = ctx["valid"]
        if T > 1 and not bool(valid.all()):
            raise ValueError("segment-level expert choice does not support padded batches")
        xp, means = segments(x, T)
        items = means.shape[0] * means.shape[1]
        scores = self.probs(means.reshape(items, d))  # [items, E]
        cand = valid.reshape(-1) if T == 1 else torch.ones(items, dtype=torch.bool, device=x.device)
        n = int(cand.sum())
        cap = max(1, min(n, round(n * self.opt["capacity_factor"] / self.E)))
        item = scores.masked_fill(~cand.unsqueeze(1), float("-inf")).t().topk(cap, dim=-1).indices  # [E, cap]
        gate = scores.t().gather(1, item)
        tokens = (item.reshape(-1, 1) * T + torch.arange(T, device=x.device)).reshape(-1)
        experts = torch.arange(self.E, device=x.device).repeat_interleave(cap * T)
        y = self.experts.dispatch(xp.reshape(-1, d), experts, tokens, gate.reshape(-1).repeat_interleave(T))
        return y.view(B, -1, d)[:, :L]

    def lory(self, x, ctx):
        cache, layer, valid = ctx["cache"], ctx["layer"], ctx["valid"]
        B, L, d = x.shape
        if cache is not None or self.opt["routing"] == "prompt":  # one merged expert per row
            store = getattr(cache, "diffmoe_lory", None)  # layer -> merged experts, set at prefill
            if ctx["past"] > 0:
                if store is None or layer not in store:
                    raise ValueError("Lory decoding needs the cache of its prefill (the merged experts)")
                return merged_swiglu(x, store[layer])
            w = valid.to(torch.promote_types(x.dtype, torch.float32)).unsqueeze(-1)
            mean = (x.to(w.dtype) * w).sum(1) / w.sum(1).clamp(min=1)  # over the prompt's real tokens
            merged = self.experts.merge(self.probs(mean))
            if cache is not None:
                if store is None:
                    store = cache.diffmoe_lory = {}
                store[layer] = [m.detach() for m in merged]
            return merged_swiglu(x, merged)
        T, E = self.opt["segment_len"], self.E
        xp, means = segments(x, T)
        N = xp.shape[1]
        probs = self.probs(means)  # [B, N, E]
        source = probs[:, :-1] if self.opt["routing"] == "segment" else probs[:, :1].expand(B, N - 1, E)
        first = torch.full_like(probs[:, 0], 1.0 / E) if self.opt["first_segment"] == "uniform" else probs[:, 0]
        weights = torch.cat([first.unsqueeze(1), source], 1).reshape(B * N, E)
        xs, out = xp.reshape(B * N, T, d), []
        for s in range(0, B * N, E):  # at most E merged experts at a time
            out.append(merged_swiglu(xs[s:s + E], self.experts.merge(weights[s:s + E])))
        return torch.cat(out).view(B, N * T, d)[:, :L]


class Block(nn.Module):
    def __init__(self, c, kind):
        super().__init__()
        d, f = c["d_model"], c["d_ff"]
        self.attn_norm, self.ffn_norm = RMSNorm(d, c["norm_eps"]), RMSNorm(d, c["norm_eps"])
        self.attn = Attention(c)
        self.ffn = SwiGLU(d, f) if kind == "dense" else MoE(kind, d, f, c["moe"])

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

    def _cannot_decode(self):
        moe = self.config.diffmoe["moe"]
        return [f"layer {i} ({k})" for i, k in enumerate(self.kinds)
                if k == "expert_choice" or (k == "topk" and moe["topk"].get("eval_capacity_factor") is not None)]

    def generate(self, *args, **kwargs):
        config = kwargs.get("generation_config") or self.generation_config
        use_cache = kwargs.get("use_cache", getattr(config, "use_cache", True))
        if use_cache is False and "lory" in self.kinds:
            raise ValueError("generate(use_cache=False) is refused for a model with Lory layers: without a cache "
                             "the forward uses segment routing, not the prompt routing generation needs")
        unable = self._cannot_decode()
        if use_cache is not False and unable:
            raise ValueError(f"cannot generate token by token: {', '.join(unable)} selects tokens over the whole "
                             "batch, future tokens included; generate(use_cache=False) recomputes every step")
        return super().generate(*args, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                use_cache=None, labels=None, inputs_embeds=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:  # explicit only: never derived from config.use_cache
            cache = DynamicCache(config=self.config) if _V5 else DynamicCache()
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, L, _ = x.shape
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + L, dtype=torch.bool, device=x.device)
        keys = attention_mask[:, :past + L].bool()  # [B, past + L]
        if position_ids is None:
            position_ids = (keys.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + L]
        inv_freq = 1.0 / self.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64,
                                                          device=x.device) / self.head_dim)
        angles = (position_ids.double().unsqueeze(-1) * inv_freq).repeat(1, 1, 2).unsqueeze(1)  # [B, 1, L, hd]
        cos, sin = angles.cos().float(), angles.sin().float()
        q = torch.arange(L, device=x.device).view(L, 1) + past
        j = torch.arange(past + L, device=x.device).view(1, -1)
        mask = ((j <= q) & keys[:, None, None, :]) | (j == q)  # causal, padding excluded, never empty
        ctx = {"cache": cache, "past": past, "valid": keys[:, past:past + L]}
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, dict(ctx, layer=i))
        logits = self.lm_head(self.norm(x)).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
