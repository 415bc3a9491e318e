"""Key/value cache for incremental decoding, plus the routing state each FFN may keep across calls."""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated keys and values for every layer.

    k[i], v[i]: [B, n_kv_heads, max_len, head_dim]. ``length`` is the number of positions already
    written (the position of the next token). ``ffn_state[i]`` is a dict the FFN of layer i may keep
    across calls (e.g. merged expert weights and segment sums). ``real`` [B, max_len] bool is False at
    the padding positions of a padded batch, None while there has been none.
    """

    def __init__(
        self,
        n_layers: int,
        batch: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.ffn_state: list[dict] = [{} for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0
        self.real: torch.Tensor | None = None

    def mark(self, start: int, length: int, mask: torch.Tensor | None) -> torch.Tensor | None:
        """Record which of the positions start .. start+length-1 are real (mask [B, length] bool; None:
        all of them). Returns ``real`` up to them, [B, start+length], or None when none so far is padding."""
        if mask is not None and self.real is None and not bool(mask.all()):
            self.real = torch.ones(mask.shape[0], self.max_len, dtype=torch.bool, device=mask.device)
        if self.real is None:
            return None
        self.real[:, start : start + length] = True if mask is None else mask
        return self.real[:, : start + length]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, h_kv, L, hd] at positions start .. start+L-1; return all keys and values up to them."""
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
