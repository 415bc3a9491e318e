"""A short end-to-end check that the installed library works: a small byte-level Lory model trains
on Python standard-library source for a few steps, its held-out loss is reported before and after,
and it generates a continuation with the KV cache and prompt-only routing.

This is the README's main job until the full ``diffmoe demo`` (training, evaluation, analysis) lands.
"""

from __future__ import annotations

import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import ModelConfig, MoEConfig, LoryConfig
from .eval.generate import generate
from .model import Decoder


def stdlib_bytes(limit: int) -> torch.Tensor:
    """Up to ``limit`` bytes of the running interpreter's standard library sources, as uint8 ids."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes() + b"\n"
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def lm_loss(model: Decoder, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def run(steps: int = 120, seq_len: int = 256, batch: int = 8, seed: int = 0, log=print) -> dict:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=256, d_model=128, n_layers=4, n_heads=4, d_ff=352, max_seq_len=seq_len,
                      ffn="lory", moe=MoEConfig(num_experts=8, lory=LoryConfig(segment_len=64)))
    model = Decoder(cfg)
    data = stdlib_bytes(2_000_000)
    n_seq = data.numel() // (seq_len + 1)
    seqs = data[: n_seq * (seq_len + 1)].view(n_seq, seq_len + 1)
    train, heldout = seqs[:-16], seqs[-16:]
    counts = model.parameter_counts()
    log(f"Lory-8E (T=64): {counts['total'] / 1e6:.2f}M parameters, {counts['active'] / 1e6:.2f}M active; "
        f"{train.numel() / 1e6:.1f}M training bytes of Python stdlib source")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    with torch.no_grad():
        model.eval()
        before = lm_loss(model, heldout).item()
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, train.shape[0], (batch,))
        loss = lm_loss(model, train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0 or step == steps - 1:
            log(f"step {step:4d}  loss {loss.item():.3f}")
    elapsed = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        after = lm_loss(model, heldout).item()
    log(f"held-out loss {before:.3f} -> {after:.3f} (nats/byte); {steps * batch * seq_len / elapsed:,.0f} tokens/s")
    prompt = torch.tensor([list(b"def ")])
    out = generate(model, prompt, 60, temperature=0.8, top_p=0.95, generator=torch.Generator().manual_seed(seed))
    text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
    log(f"sample (temperature 0.8, top-p 0.95, prompt-only routing): {text!r}")
    return {"heldout_before": before, "heldout_after": after, "sample": text}
