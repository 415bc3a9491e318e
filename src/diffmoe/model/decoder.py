"""A LLaMA-style decoder: RMSNorm, rotary embeddings, causal (grouped-query) attention via
``scaled_dot_product_attention``, and one FFN per layer that is dense SwiGLU or any MoE layer.

    ids [B, L] -> embed [B, L, d] -> n_layers x (x + attn(norm(x)); x + ffn(norm(x))) -> norm -> logits [B, L, V]
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, ModelConfig
from ..moe import MoELayer, RoutingContext, SwiGLU, build_ffn
from .cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Rotary(nn.Module):
    """Rotary position embeddings, "rotate half" layout (as LLaMA in transformers)."""

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # [max_len, hd/2]
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x [B, h, L, hd] at positions start .. start+L-1."""
        L = x.shape[2]
        cos = self.cos[start:start + L].repeat(1, 2).to(x.dtype)  # [L, hd]
        sin = self.sin[start:start + L].repeat(1, 2).to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, self.n_heads * self.hd, bias=False)
        self.wk = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=False)
        self.wv = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=False)
        self.wo = nn.Linear(self.n_heads * self.hd, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, rope: Rotary, start: int, cache: KVCache | None, layer: int):
        B, L, _ = x.shape
        q = self.wq(x).view(B, L, self.n_heads, self.hd).transpose(1, 2)  # [B, h, L, hd]
        k = self.wk(x).view(B, L, self.n_kv, self.hd).transpose(1, 2)  # [B, h_kv, L, hd]
        v = self.wv(x).view(B, L, self.n_kv, self.hd).transpose(1, 2)
        q, k = rope(q, start), rope(k, start)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # [B, h_kv, start+L, hd]
        gqa = self.n_kv != self.n_heads
        if start == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1, enable_gqa=gqa)
        else:  # continuing a cached sequence: query i sees keys 0 .. start+i
            mask = torch.ones(L, start + L, dtype=torch.bool, device=x.device).tril(start)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(B, L, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = build_ffn(cfg.layer_ffn(layer), cfg.d_model, cfg.d_ff, cfg.moe)

    def forward(self, x, rope, start, cache, prompt_len):
        x = x + self.attn(self.attn_norm(x), rope, start, cache, self.layer)
        ctx = RoutingContext(prompt_len, None if cache is None else cache.ffn_state[self.layer])
        return x + self.ffn(self.ffn_norm(x), ctx)


class Decoder(nn.Module):
    """The language model. ``forward(ids [B, L]) -> logits [B, L, vocab]``.

    After a forward, ``aux_loss()`` is the sum of the MoE layers' scaled auxiliary losses (add it to
    the LM loss) and each layer's ``stats`` hold its routing statistics. What a layer can do (routing
    modes, causality, decoding) is asked of its ``capabilities``, never of its class.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; residual-writing projections get init_std / sqrt(2 n_layers)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)  # GPT-2 / OLMo scaled init
        router_std = self.cfg.moe.router_init_std or std
        nn.init.normal_(self.embed.weight, std=std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.blocks:
            for lin in (block.attn.wq, block.attn.wk, block.attn.wv):
                nn.init.normal_(lin.weight, std=std)
            nn.init.normal_(block.attn.wo.weight, std=out_std)
            block.ffn.reset_parameters(std, out_std, router_std)

    # ------------------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, prompt_len: int | None = None):
        """ids [B, L] int64 -> logits [B, L, V] (float32).

        cache: continue the sequence held by the cache (incremental decoding); it is advanced by L.
        prompt_len: layers in ``prompt`` routing route on the first ``prompt_len`` positions (default all).
        """
        B, L = ids.shape
        start = 0 if cache is None else cache.length
        if start + L > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + L} positions exceeds max_seq_len={self.cfg.max_seq_len}")
        if cache is not None and start + L > cache.max_len:
            raise ValueError(f"sequence of {start + L} positions exceeds the KV cache size {cache.max_len}")
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, self.rope, start, cache, prompt_len)
        if cache is not None:
            cache.length += L
        return self.lm_head(self.norm(x)).float()

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        p = self.embed.weight
        return KVCache(self.cfg.n_layers, batch, max_len or self.cfg.max_seq_len, self.cfg.kv_heads,
                       self.cfg.head_dim, dtype=p.dtype, device=p.device)

    def moe_layers(self) -> list[tuple[int, MoELayer]]:
        return [(b.layer, b.ffn) for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def ffns(self) -> list[nn.Module]:
        """The FFN of every block, dense or MoE."""
        return [b.ffn for b in self.blocks]

    def aux_loss(self) -> torch.Tensor:
        total = self.embed.weight.new_zeros((), dtype=torch.float32)
        for _, layer in self.moe_layers():
            total = total + layer.aux_loss.to(total.device)
        return total

    def set_routing(self, mode: str) -> None:
        """Set the inference routing mode (e.g. ``segment | prefix | prompt``) of every layer that has
        routing modes; such a layer rejects a mode it does not know."""
        for ffn in self.ffns():
            if ffn.capabilities.routing_modes:
                ffn.routing = mode

    @contextmanager
    def inference(self, routing: str | None = None):
        """Eval mode, and optionally a routing mode (:meth:`set_routing`), inside the block; both
        restored after."""
        was_training = self.training
        previous = {ffn: ffn.routing for ffn in self.ffns() if ffn.capabilities.routing_modes}
        self.eval()
        if routing is not None:
            self.set_routing(routing)
        try:
            yield self
        finally:
            self.train(was_training)
            for ffn, mode in previous.items():
                ffn.routing = mode

    @torch.no_grad()
    def dense_to_moe(self, dense: "Decoder") -> None:
        """The dense warm-up's switch (and upcycling): copy a dense model of the same shape into this
        model, every FFN into every expert of the matching MoE layer (routers keep their random init)
        and into the matching dense layer."""
        own = {k: v for k, v in self.state_dict().items()}
        for name, value in dense.state_dict().items():
            if ".ffn." not in name and name in own:
                own[name].copy_(value)
        for block, dense_block in zip(self.blocks, dense.blocks):
            if not isinstance(dense_block.ffn, SwiGLU):
                raise ConfigError(f"invalid config: layer {block.layer} of the source model is not dense")
            if isinstance(block.ffn, MoELayer):
                block.ffn.experts.copy_from_dense(dense_block.ffn)
            else:
                block.ffn.load_state_dict(dense_block.ffn.state_dict())

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters and active parameters per token (each MoE layer counts
        ``experts_per_token`` of its experts: 1 for a merged expert, k for top-k)."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0.0
        for _, layer in self.moe_layers():
            n = sum(p.numel() for p in layer.experts.parameters())
            inactive += n * (1 - min(layer.experts_per_token, layer.num_experts) / layer.num_experts)
        return {"total": total, "active": int(total - inactive)}



