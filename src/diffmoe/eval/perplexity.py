"""Held-out loss and perplexity per domain."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..model import Decoder
from ..parallel.distributed import DistEnv, all_reduce_sum
from ..schema import ConfigError


def prompt_segment_len(model: Decoder) -> int | None:
    """The segment length of the first layer with ``prompt`` routing (None when no layer has it)."""
    caps = [ffn.capabilities for ffn in model.ffns()]
    return next((c.segment_len for c in caps if "prompt" in c.routing_modes), None)


@torch.no_grad()
def evaluate(
    model: Decoder,
    dataset,
    batch_size: int = 8,
    max_batches: int | None = None,
    routing: str | None = None,
    prompt_len: int | None = None,
    rank: int = 0,
    world: int = 1,
    score_from: int = 0,
    score_to: int | None = None,
) -> dict[str, dict]:
    """Mean next-token loss (nats) and perplexity per domain and over all rows.

    dataset: a :class:`diffmoe.data.PackedDataset` split; each row is attributed to its majority
    domain (held-out rows are almost all single-domain). Every label position of a row counts once,
    so ``tokens`` = rows x context_len, whatever the batch size. ``max_batches`` limits the rows to
    max_batches * batch_size, evenly spaced over the split (so every domain is represented).
    routing: the routing mode of layers that have modes (:meth:`Decoder.set_routing`; None: the modes
    they are configured with, i.e. trained with). ``segment`` and ``prefix`` score every position. ``prompt`` routes each row once on its first ``prompt_len``
    positions (default: the routing segment length) and scores only the positions after them, since
    positions inside the prompt would see the prompt's later tokens.
    score_from, score_to: score only positions score_from .. score_to - 1 (None: to the end), e.g. to
    compare routing modes on the positions that prompt routing scores, or a first routing segment with
    the rest; score_from is at least ``prompt_len`` with ``prompt`` routing.
    rank, world: under torchrun, rank r scores batches r, r + world, ... and the sums are all-reduced;
    every rank runs the same number of forward passes of ``batch_size`` rows (a short last batch is
    padded with repeated rows, a rank without a batch repeats the first one; neither is scored), as
    FSDP and expert sharding need.
    Returns {domain: {"tokens", "loss", "ppl"}} plus "all".
    """
    skip, prompt, end = score_from, 0, dataset.context_len if score_to is None else score_to
    if routing is None and any(f.routing == "prompt" for f in model.ffns() if f.capabilities.routing_modes):
        routing = "prompt"  # configured for prompt routing: score it as such, never on the whole sequence
    if routing == "prompt":
        prompt = prompt_len or prompt_segment_len(model) or 0
        if not 0 < prompt < dataset.context_len:
            raise ConfigError(f"prompt_len={prompt} must be between 1 and the context length {dataset.context_len} - 1")
        skip = max(skip, prompt)
    if not 0 <= skip < end <= dataset.context_len:
        raise ConfigError(
            f"scoring positions {skip} to {end}: need 0 <= score_from < score_to <= the context length "
            f"{dataset.context_len} (prompt routing scores from prompt_len on)"
        )
    rows = np.arange(len(dataset))
    if max_batches is not None and max_batches * batch_size < len(rows):
        # held-out rows are grouped by domain: evenly spaced rows cover every domain proportionally
        rows = np.unique(np.linspace(0, len(rows) - 1, max_batches * batch_size).round().astype(np.int64))
    majority = np.argmax(dataset.domain_tokens[rows], axis=1)
    sums = np.zeros(len(dataset.domains))
    counts = np.zeros(len(dataset.domains), dtype=np.int64)
    device = next(model.parameters()).device
    starts = list(range(0, len(rows), batch_size))
    rounds = -(-len(starts) // world)
    with model.inference(routing):
        for k in range(rounds):
            index = k * world + rank
            mine = index < len(starts)  # the last round: ranks without a batch repeat the first one
            start = starts[index] if mine else 0
            items = [dataset[int(i)] for i in rows[start : start + batch_size]]
            n = len(items)
            if world > 1:  # same shapes on every rank
                items += items[:1] * (batch_size - n)
            ids = torch.stack([it["input_ids"] for it in items]).to(device)
            labels = torch.stack([it["labels"] for it in items]).to(device)
            loss = model(ids, prompt_len=prompt or None, labels=labels)[:n]  # [n, L], no full logits
            if not mine:
                continue
            per_row = loss[:, skip:end].double().sum(1).cpu().numpy()
            np.add.at(sums, majority[start : start + n], per_row)
            np.add.at(counts, majority[start : start + n], max(0, end - skip))
    if world > 1:
        env = DistEnv(rank, world, device)
        sums = all_reduce_sum(torch.from_numpy(sums), env).numpy()
        counts = all_reduce_sum(torch.from_numpy(counts), env).numpy()
    out = {}
    for d, name in enumerate(dataset.domains):
        if counts[d]:
            out[name] = _summary(sums[d], counts[d])
    out["all"] = _summary(sums.sum(), counts.sum())
    return out


def _summary(total: float, tokens: int) -> dict:
    loss = total / max(tokens, 1)
    return {"tokens": int(tokens), "loss": loss, "ppl": math.exp(min(loss, 50.0))}


def format_eval(result: dict) -> str:
    """A table of :func:`evaluate`'s result: domain, tokens, loss, perplexity."""
    lines = [f"{'domain':<16}{'tokens':>10}{'loss':>9}{'ppl':>10}"]
    for name, r in result.items():
        lines.append(f"{name:<16}{r['tokens']:>10}{r['loss']:>9.4f}{r['ppl']:>10.2f}")
    return "\n".join(lines)
