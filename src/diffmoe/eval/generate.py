"""Autoregressive generation with the KV cache; layers with ``prompt`` routing route once on the prompt.

Prompts of different lengths are one batch: a list of token-id lists (left-padded here), or a tensor
with an ``attention_mask``. Every row then generates what it generates alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..model import Decoder


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
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


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id lists into (ids [B, P] int64, attention_mask [B, P] bool, False at padding)."""
    if not prompts or not all(len(p) for p in prompts):
        raise ValueError("every prompt needs at least one token")
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, P - len(p) :] = torch.as_tensor(p, dtype=torch.long)
        mask[row, P - len(p) :] = True
    return ids, mask


@torch.no_grad()
def generate_stream(
    model: Decoder,
    prompt: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    routing: str = "prompt",
    attention_mask: torch.Tensor | None = None,
    prefill_chunk: int | None = None,
    **sampling,
) -> Iterator[torch.Tensor]:
    """Yield generated tokens [B] one step at a time (on the model's device). prompt: [B, P] int64 on any
    device, with an optional ``attention_mask`` [B, P] (False at padding, which must be on the left), or
    a list of B token-id lists (padded here). A sampling ``generator`` must be on the model's device.

    The prompt is processed in one call (prefill) that fills the KV cache; ``prefill_chunk`` runs its
    attention that many positions at a time. ``routing`` is the mode of layers that have routing modes:
    in ``prompt`` routing they route once on the mean of the prompt's real tokens (a merged expert then
    decodes as a dense model). Padding takes no part in attention or routing, and positions count from
    each row's first real token. A model with a layer that cannot decode token by token as it was
    trained (``capabilities.incremental_decoding``) is refused with a ValueError.
    """
    unable = [
        f"layer {i} ({type(ffn).__name__})"
        for i, ffn in enumerate(model.ffns())
        if not ffn.capabilities.incremental_decoding
    ]
    if unable:
        from ..schema import ConfigError  # a ValueError: the model's config cannot decode

        raise ConfigError(
            f"cannot generate token by token: {', '.join(unable)} routes a token on tokens after "
            "it or on the rest of the batch, so cached decoding would not compute what was trained"
        )
    if not isinstance(prompt, torch.Tensor):
        if attention_mask is not None:
            raise ValueError("attention_mask goes with a prompt tensor; a list of prompts is padded here")
        prompt, attention_mask = pad_prompts(prompt)
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device, torch.bool)
        if attention_mask.shape == prompt.shape and not bool(attention_mask[:, -1].all()):
            raise ValueError(
                "attention_mask must pad on the left: the last prompt position of every row must be a real token"
            )
    with model.inference(routing):
        cache = model.new_cache(prompt.shape[0], prompt.shape[1] + max_new_tokens)
        logits = model(prompt, cache=cache, attention_mask=attention_mask, chunk_size=prefill_chunk)[:, -1]
        for step in range(max_new_tokens):
            token = sample_next(logits, **sampling)
            yield token
            if step + 1 < max_new_tokens:
                logits = model(token.unsqueeze(1), cache=cache)[:, -1]


def generate(
    model: Decoder, prompt: torch.Tensor | Sequence[Sequence[int]], max_new_tokens: int, **kwargs
) -> torch.Tensor | list[list[int]]:
    """prompt [B, P] -> the prompt (padding included) followed by the generated tokens [B, P + max_new_tokens];
    a list of token-id lists -> a list of lists, each prompt followed by its generated tokens.
    kwargs: those of :func:`generate_stream`."""
    new = list(generate_stream(model, prompt, max_new_tokens, **kwargs))
    if not isinstance(prompt, torch.Tensor):
        tokens = torch.stack(new, 1).tolist() if new else [[] for _ in prompt]
        return [list(p) + t for p, t in zip(prompt, tokens)]
    return torch.cat([prompt.to(new[0].device) if new else prompt] + [t.unsqueeze(1) for t in new], 1)


def print_generation(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    routing: str = "prompt",
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    out=None,
) -> list[int]:
    """Print ``prompt`` and its continuation to ``out`` (default stdout) as the tokens arrive (a character
    split over several tokens is printed once complete). Returns the new token ids."""
    import sys

    from ..schema import ConfigError

    out = out or sys.stdout
    ids = tokenizer.encode(prompt).ids
    if not ids:
        raise ConfigError("--prompt encodes to no tokens")
    limit = model.cfg.max_seq_len - len(ids)
    if max_new_tokens > limit:
        raise ConfigError(
            f"--max-new-tokens={max_new_tokens}: the prompt leaves room for {limit} "
            f"(max_seq_len={model.cfg.max_seq_len})"
        )
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    out.write(prompt)
    new: list[int] = []
    shown = ""
    for token in generate_stream(
        model,
        torch.tensor([ids]),
        max_new_tokens,
        routing=routing,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
    ):
        new.append(int(token[0]))
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):  # wait for multi-byte characters to complete
            out.write(text[len(shown) :])
            out.flush()
            shown = text
    out.write(tokenizer.decode(new)[len(shown) :] + "\n")
    return new
