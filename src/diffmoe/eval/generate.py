"""Autoregressive generation with the KV cache; layers with ``prompt`` routing route once on the prompt."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..model import Decoder


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token from logits [B, V]: greedy when temperature == 0, else sampling from the
    temperature-scaled distribution restricted to the top_k tokens and the top_p nucleus. -> [B]."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_stream(model: Decoder, prompt: torch.Tensor, max_new_tokens: int, routing: str = "prompt",
                    **sampling) -> Iterator[torch.Tensor]:
    """Yield generated tokens [B] one step at a time (on the model's device). prompt [B, P] int64, on any
    device. A sampling ``generator`` must be on the model's device.

    The prompt is processed in one call (prefill) that fills the KV cache. ``routing`` is the mode of
    layers that have routing modes: in ``prompt`` routing they route once on the prompt's mean (a merged
    expert then decodes as a dense model). A model with a layer that cannot decode token by token as it
    was trained (``capabilities.incremental_decoding``) is refused with a ValueError.
    """
    unable = [f"layer {i} ({type(ffn).__name__})" for i, ffn in enumerate(model.ffns())
              if not ffn.capabilities.incremental_decoding]
    if unable:
        raise ValueError(f"cannot generate token by token: {', '.join(unable)} routes a token on tokens after "
                         "it or on the rest of the batch, so cached decoding would not compute what was trained")
    prompt = prompt.to(next(model.parameters()).device)
    with model.inference(routing):
        cache = model.new_cache(prompt.shape[0], prompt.shape[1] + max_new_tokens)
        logits = model(prompt, cache=cache)[:, -1]
        for step in range(max_new_tokens):
            token = sample_next(logits, **sampling)
            yield token
            if step + 1 < max_new_tokens:
                logits = model(token.unsqueeze(1), cache=cache)[:, -1]


def generate(model: Decoder, prompt: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """prompt [B, P] -> prompt followed by the generated tokens [B, P + max_new_tokens]."""
    new = list(generate_stream(model, prompt, max_new_tokens, **kwargs))
    return torch.cat([prompt.to(new[0].device) if new else prompt] + [t.unsqueeze(1) for t in new], 1)
