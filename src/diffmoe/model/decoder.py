"""A LLaMA-style decoder: RMSNorm, rotary embeddings, causal (grouped-query) attention via
``scaled_dot_product_attention``, and one FFN per layer that is dense SwiGLU or any MoE layer.

    ids [B, L] -> embed [B, L, d] -> n_layers x (x + attn(norm(x)); x + ffn(norm(x))) -> norm -> logits [B, L, V]
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, ModelConfig
from ..moe import AuxLosses, MoELayer, RoutingContext, SwiGLU, build_ffn
from .cache import KVCache
from .loss import linear_cross_entropy


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

    def forward(self, x: torch.Tensor, positions: int | torch.Tensor) -> torch.Tensor:
        """x [B, h, L, hd] at ``positions``: an int p (every row at p .. p+L-1) or [B, L] int64 per row."""
        if isinstance(positions, int):
            cos, sin = self.cos[positions : positions + x.shape[2]], self.sin[positions : positions + x.shape[2]]
        else:  # [B, L, hd/2] -> [B, 1, L, hd/2], broadcast over the heads
            cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        cos, sin = torch.cat((cos, cos), -1).to(x.dtype), torch.cat((sin, sin), -1).to(x.dtype)  # [..., L, hd]
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

    def forward(self, x: torch.Tensor, rope: Rotary, span: "Span", cache: KVCache | None, layer: int):
        """x [B, L, d] at the cache positions span.start .. span.start+L-1 -> [B, L, d]."""
        B, L, _ = x.shape
        q = self.wq(x).view(B, L, self.n_heads, self.hd).transpose(1, 2)  # [B, h, L, hd]
        k = self.wk(x).view(B, L, self.n_kv, self.hd).transpose(1, 2)  # [B, h_kv, L, hd]
        v = self.wv(x).view(B, L, self.n_kv, self.hd).transpose(1, 2)
        q, k = rope(q, span.positions), rope(k, span.positions)
        if cache is not None:
            k, v = cache.update(layer, k, v, span.start)  # [B, h_kv, start+L, hd]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=span.mask, is_causal=span.mask is None and L > 1, enable_gqa=self.n_kv != self.n_heads
        )
        return self.wo(out.transpose(1, 2).reshape(B, L, -1))


class Span(NamedTuple):
    """Where one attention call's queries sit. start: cache position of the first of its ``length``
    queries; positions: rotary positions (an int, or [B, L] counted from each row's first real token);
    mask: None (causal from position 0) or the keys each query sees, [L, start+L] or [B, 1, L, start+L] bool."""

    start: int
    length: int
    positions: int | torch.Tensor
    mask: torch.Tensor | None

    @staticmethod
    def of(start: int, L: int, real: torch.Tensor | None, device: torch.device) -> "Span":
        """The span of L queries from ``start``; real [B, start+L] bool is False at padding (None: none).
        With padding, a query sees the real keys up to itself, and always itself (no empty row)."""
        if real is None and start == 0:
            return Span(start, L, start, None)
        q = torch.arange(start, start + L, device=device).view(L, 1)
        j = torch.arange(start + L, device=device).view(1, -1)
        if real is None:
            return Span(start, L, start, j <= q)
        positions = (real.long().cumsum(1) - 1)[:, start:].clamp(min=0)  # [B, L]
        return Span(start, L, positions, ((j <= q) & real[:, None, None, :]) | (j == q))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = build_ffn(cfg.layer_ffn(layer), cfg.d_model, cfg.d_ff, cfg.moe)

    def forward(self, x, rope, spans: list[Span], cache, prompt_len, mask=None, aux=None):
        """x [B, L, d]; spans cut L into consecutive attention calls (chunked prefill); the FFN then sees
        all L positions at once, so routing on the prompt routes on all of it. mask [B, L] bool or None;
        aux: the forward's :class:`~diffmoe.moe.AuxLosses`, or None."""
        h, first = self.attn_norm(x), spans[0].start
        attn = [
            self.attn(h[:, s.start - first : s.start - first + s.length], rope, s, cache, self.layer) for s in spans
        ]
        x = x + (attn[0] if len(attn) == 1 else torch.cat(attn, 1))
        ctx = RoutingContext(prompt_len, None if cache is None else cache.ffn_state[self.layer], mask, aux)
        return x + self.ffn(self.ffn_norm(x), ctx)


class Decoder(nn.Module):
    """The language model. ``forward(ids [B, L]) -> logits [B, L, vocab]``.

    A forward given an :class:`~diffmoe.moe.AuxLosses` collects the MoE layers' auxiliary losses in it
    (training adds its ``total`` to the LM loss); after a forward each layer's ``stats`` hold its routing
    statistics (and ``aux_loss()`` sums the layers' last scaled auxiliary losses, for analysis). What a layer can do (routing
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
    def forward(
        self,
        ids: torch.Tensor,
        cache: KVCache | None = None,
        prompt_len: int | None = None,
        attention_mask: torch.Tensor | None = None,
        chunk_size: int | None = None,
        labels: torch.Tensor | None = None,
        aux: AuxLosses | None = None,
    ):
        """ids [B, L] int64 -> logits [B, L, V] (float32); with labels [B, L] int64, the per-token
        cross-entropy [B, L] (float32, nats) instead, computed in chunks of tokens so that the logits
        never exist whole (:func:`~diffmoe.model.loss.linear_cross_entropy`; what training and
        evaluation call).

        cache: continue the sequence held by the cache (incremental decoding); it is advanced by L. Layers
            in ``prompt`` routing route on the first cached call (the prompt) and keep that routing.
        prompt_len: layers in ``prompt`` routing route on the first ``prompt_len`` positions (default all).
        attention_mask: [B, L] bool (or 0/1), False at padding (a batch of prompts padded on the left):
            padding is no key of attention and no part of routing means, and rotary positions count from
            each row's first real token, so a real token computes what it computes in its row alone. The
            cache remembers it for later calls.
        chunk_size: with a cache, attention runs on at most this many queries at a time (bounding a long
            prompt's memory); each layer's FFN still sees all L positions, so prompt routing routes on all.
        aux: an :class:`~diffmoe.moe.AuxLosses` that collects every MoE layer's auxiliary losses (what
            training adds to the LM loss).
        """
        B, L = ids.shape
        start = 0 if cache is None else cache.length
        if start + L > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + L} positions exceeds max_seq_len={self.cfg.max_seq_len}")
        if cache is not None and start + L > cache.max_len:
            raise ValueError(f"sequence of {start + L} positions exceeds the KV cache size {cache.max_len}")
        if attention_mask is not None:
            if attention_mask.shape != ids.shape:
                raise ValueError(
                    f"attention_mask of shape {tuple(attention_mask.shape)} must have the shape of "
                    f"ids {tuple(ids.shape)}"
                )
            attention_mask = attention_mask.to(ids.device, torch.bool)
        if chunk_size is not None and (cache is None or chunk_size < 1):
            raise ValueError(f"chunk_size={chunk_size} needs a KV cache and must be >= 1")
        if cache is not None:
            real = cache.mark(start, L, attention_mask)  # [B, start+L] bool, or None: no padding so far
        else:
            real = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
        step = chunk_size or L
        spans = [
            Span.of(
                s, min(step, start + L - s), None if real is None else real[:, : min(start + L, s + step)], ids.device
            )
            for s in range(start, start + L, step)
        ]
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, self.rope, spans, cache, prompt_len, None if real is None else real[:, start:], aux)
        if cache is not None:
            cache.length += L
        if labels is not None:  # the head's weight read here, where FSDP has unsharded it
            return linear_cross_entropy(self.norm(x), self.lm_head.weight, labels)
        return self.lm_head(self.norm(x)).float()

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        p = self.embed.weight
        return KVCache(
            self.cfg.n_layers,
            batch,
            max_len or self.cfg.max_seq_len,
            self.cfg.kv_heads,
            self.cfg.head_dim,
            dtype=p.dtype,
            device=p.device,
        )

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
