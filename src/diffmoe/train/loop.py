"""The training loop behind ``diffmoe train``.

One step = ``grad_accum`` micro-batches -> clip -> AdamW update. The data order is a pure function of
(seed, micro-batch index, rank), and checkpoints hold weights, optimizer and RNG state and the data
position, and the random state of step s on rank r is seeded from (seed, r, s), so a resumed run
reproduces the uninterrupted run's losses exactly, under torchrun too.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ..config import ConfigError, RunConfig, save_config
from ..eval.perplexity import evaluate
from ..model import Decoder
from ..report import progress, say
from . import distributed
from .checkpoint import latest_checkpoint, load_checkpoint, read_trainer_state, save_checkpoint
from .metrics import RunLogger, is_finite, routing_metrics, truncate_metrics
from .optim import build_optimizer, lr_at, transfer_state


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the message says why."""


class BatchStream:
    """Micro-batch ``k`` of a deterministic, endless pass over a dataset in seeded epoch permutations.

    batch(k) -> (input_ids [B, C], labels [B, C]) int64, where rank r of W takes the B sequences at
    positions (k * W + r) * B ... + B - 1 of the concatenated permutations.
    """

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if len(dataset) == 0:
            raise ConfigError(f"invalid config: data.path={str(dataset.path)!r}: the train split has no rows")
        self.dataset, self.batch_size, self.seed, self.rank, self.world = dataset, batch_size, seed, rank, world
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))}
        return self._perms[epoch]

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.dataset)
        start = (k * self.world + self.rank) * self.batch_size
        rows = [int(self._perm(p // n)[p % n]) for p in range(start, start + self.batch_size)]
        items = [self.dataset[i] for i in rows]
        return torch.stack([it["input_ids"] for it in items]), torch.stack([it["labels"] for it in items])


def build_model(cfg: RunConfig, dense: bool) -> Decoder:
    """The run's model, or its all-dense twin for Lory's dense warm-up phase."""
    model_cfg = cfg.model
    if dense:
        model_cfg = dataclasses.replace(cfg.model, ffn="dense")
    return Decoder(model_cfg)


def _check_data(cfg: RunConfig, dataset) -> None:
    if dataset.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"invalid config: model.vocab_size={cfg.model.vocab_size}: the dataset's tokenizer "
                          f"has {dataset.vocab_size} tokens")
    if dataset.context_len > cfg.model.max_seq_len:
        raise ConfigError(f"invalid config: model.max_seq_len={cfg.model.max_seq_len}: the dataset's "
                          f"sequences have {dataset.context_len} positions")


def train(cfg: RunConfig, run_dir: str | Path, resume: bool = False, show_progress: bool = True) -> dict:
    """Train ``cfg`` into ``run_dir`` (config.yaml, metrics.jsonl, tensorboard/, checkpoints/).

    Returns a summary: final step, last training loss, held-out evaluation, skipped steps, tokens, seconds.
    """
    from ..data import PackedDataset

    env = distributed.setup()
    run_dir = Path(run_dir)
    tc = cfg.train
    verbose = show_progress and env.is_main
    train_set = PackedDataset(cfg.data.path, "train")
    heldout = PackedDataset(cfg.data.path, "heldout")
    _check_data(cfg, train_set)
    stream = BatchStream(train_set, cfg.data.batch_size, tc.seed, env.rank, env.world)
    switch_step = int(round(tc.dense_warmup_frac * tc.steps)) if cfg.model.ffn != "dense" else 0

    start_step, state = 0, {"skipped_steps": 0, "bad_in_a_row": 0, "tokens": 0}
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        raise ConfigError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
    if not resume and latest_checkpoint(run_dir) is not None:
        raise ConfigError(f"{run_dir} already holds checkpoints: pass --resume to continue it, or choose a new run directory")
    phase_dense = switch_step > 0
    if ckpt is not None:
        meta = read_trainer_state(ckpt)
        phase_dense = meta["phase"] == "dense"
    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    model = build_model(cfg, dense=phase_dense).to(env.device)
    optimizer = build_optimizer(model, tc)
    if ckpt is not None:
        meta = load_checkpoint(ckpt, model, optimizer)
        start_step = meta["step"]
        state = {k: meta[k] for k in state}
        say(f"resumed from {ckpt} at step {start_step}", verbose)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, str(run_dir / "config.yaml"))
        truncate_metrics(run_dir, start_step)
    logger = RunLogger(run_dir, tc.tensorboard) if env.is_main else None
    counts = model.parameter_counts()
    say(f"model: {counts['total'] / 1e6:.2f}M parameters, {counts['active'] / 1e6:.2f}M active; "
        f"{len(train_set)} training sequences of {train_set.context_len} tokens", verbose and start_step == 0)

    ddp = _wrap(model, cfg, env)
    tokens_per_step = cfg.data.batch_size * train_set.context_len * tc.grad_accum * env.world
    bar = progress(tc.steps, f"train {run_dir.name}", verbose, initial=start_step)
    t_log, tok_log, last_loss = time.perf_counter(), 0, float("nan")
    t_start = time.perf_counter()
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=tc.bf16)

    def checkpoint(step: int) -> None:
        if env.is_main:
            save_checkpoint(run_dir, step, model, optimizer,
                            dict(state, phase="dense" if phase_dense else "moe"), tc.keep_checkpoints)

    for step in range(start_step, tc.steps):
        torch.manual_seed(_step_seed(tc.seed, env.rank, step))  # all randomness of step s: from (seed, rank, s)
        if phase_dense and step >= switch_step:  # Lory's dense warm-up ends: copy the FFN into every expert
            moe = build_model(cfg, dense=False).to(env.device)
            moe.dense_to_moe(model)
            new_opt = build_optimizer(moe, tc)
            transfer_state(optimizer, model, new_opt, moe)
            model, optimizer, phase_dense = moe, new_opt, False
            ddp = _wrap(model, cfg, env)
            say(f"step {step}: dense warm-up done, FFN copied into every expert", verbose)
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        lm_total, aux_total = torch.zeros(()), torch.zeros(())
        for micro in range(tc.grad_accum):
            ids, labels = (t.to(env.device) for t in stream.batch(step * tc.grad_accum + micro))
            with autocast:
                logits = ddp(ids)
            lm = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
            aux = model.aux_loss()
            ((lm + aux) / tc.grad_accum).backward()
            lm_total += lm.detach().cpu() / tc.grad_accum
            aux_total += aux.detach().cpu() / tc.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        loss = distributed.all_reduce_mean(lm_total.to(env.device), env).item()
        if is_finite(loss) and is_finite(grad_norm):
            optimizer.step()
            state["bad_in_a_row"] = 0
        else:
            state["skipped_steps"] += 1
            state["bad_in_a_row"] += 1
            if state["bad_in_a_row"] >= tc.max_bad_steps:
                optimizer.zero_grad(set_to_none=True)
                checkpoint(step)
                raise TrainingError(f"{tc.max_bad_steps} steps in a row had a non-finite loss or gradient "
                                    f"(last at step {step}); stopped. The last usable weights are in "
                                    f"{latest_checkpoint(run_dir)}. Lower train.lr or enable train.grad_clip.")
        optimizer.zero_grad(set_to_none=True)
        state["tokens"] += tokens_per_step
        tok_log += tokens_per_step
        last_loss = loss
        done = step + 1
        bar.update(1)
        if done % tc.log_every == 0 or done == tc.steps:
            now = time.perf_counter()
            record = {"kind": "train", "step": done, "loss": loss, "aux_loss": aux_total.item(),
                      "lr": lr, "grad_norm": float(grad_norm), "tokens": state["tokens"],
                      "tokens_per_s": tok_log / (now - t_log), "skipped_steps": state["skipped_steps"]}
            for _, layer in model.moe_layers():
                for name, value in layer.aux_losses.items():
                    record[f"aux_{name}_unscaled"] = record.get(f"aux_{name}_unscaled", 0.0) + float(value.detach())
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
            if logger:
                logger.log(record)
            t_log, tok_log = now, 0
        if logger and (done % tc.routing_log_every == 0 or done == tc.steps):
            routing = routing_metrics(model)
            if routing:
                logger.log({"kind": "routing", "step": done, **routing})
        if done % tc.eval_every == 0 or done == tc.steps:
            ev = final = evaluate(model, heldout, cfg.data.batch_size, cfg.data.eval_batches)
            if logger:
                logger.log({"kind": "eval", "step": done, **{f"{d}.loss": v["loss"] for d, v in ev.items()},
                            **{f"{d}.ppl": v["ppl"] for d, v in ev.items()}})
        if done % tc.checkpoint_every == 0 or done == tc.steps:
            checkpoint(done)
    bar.close()
    if logger:
        logger.close()
    if start_step == tc.steps:  # resumed a finished run: nothing was evaluated above
        final = evaluate(model, heldout, cfg.data.batch_size, cfg.data.eval_batches)
    distributed.teardown(env)
    return {"step": tc.steps, "loss": last_loss, "heldout": final, "skipped_steps": state["skipped_steps"],
            "tokens": state["tokens"], "seconds": time.perf_counter() - t_start,
            "parameters": model.parameter_counts()}


def _step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def _wrap(model: Decoder, cfg: RunConfig, env) -> torch.nn.Module:
    """DDP under torchrun (token-choice layers may leave experts without gradient in a step), then
    ``torch.compile`` when ``train.compile``."""
    wrapped: torch.nn.Module = model
    if env.world > 1:
        kinds = {cfg.model.layer_ffn(i) for i in range(cfg.model.n_layers)}
        sparse = bool(kinds - {"dense", "lory"})
        wrapped = DistributedDataParallel(model, find_unused_parameters=sparse)
    return torch.compile(wrapped) if cfg.train.compile else wrapped
