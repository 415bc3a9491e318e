"""The training loop behind ``diffmoe train``, composed of parts with one job each: the data loader
(:mod:`diffmoe.data.loader`), the step (:mod:`.step`), the checkpointer (:mod:`.checkpoint`), the
evaluator (:mod:`.evaluator`), the metrics logger (:mod:`.metrics`) and ``parallelize``
(:mod:`diffmoe.parallel.parallelize`).

One step = one global batch of ``data.batch_size`` sequences = ``accum`` micro-batches of
``data.micro_batch_size`` on each of the ranks -> clip -> AdamW update. Step s reads the sequences at
positions s*G .. (s+1)*G - 1 of the seeded data order (G the global batch) whatever the world size, so
a config means the same training on any number of ranks. Checkpoints hold weights, optimizer state and
the data position and load into any layout; the random state of step s on rank r is seeded from
(seed, r, s), so a resumed run reproduces the uninterrupted run's losses exactly (under torchrun too,
and across world sizes for layers without sampling).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, RunConfig, load_config, save_config
from ..data.dataset import PackedDataset
from ..data.loader import BatchStream
from ..data.mixture import MixtureStream, open_datasets, sources_of
from ..model import Decoder
from ..report import progress, say
from ..parallel import distributed
from ..parallel.dcp import model_state
from ..parallel.parallelize import ParallelPlan, parallelize
from .callbacks import Callback, MoEPostStep
from .checkpoint import CheckpointError, Checkpointer, list_checkpoints, load_checkpoint, read_trainer_state
from .evaluator import Evaluator
from .init import build_model, initial_model
from .metrics import MetricsLogger, truncate_metrics
from .optim import build_optimizer, lr_at, transfer_state
from .resume import config_changes, describe
from .step import train_step


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the message says why."""


def train(cfg: RunConfig, run_dir: str | Path, resume: bool = False, show_progress: bool = True,
          device: str | None = None, accept_config_change: bool = False) -> dict:
    """Train ``cfg`` into ``run_dir`` (config.yaml, metrics.jsonl, tensorboard/, checkpoints/) on
    ``device`` (default: CUDA when available), as one process or one rank of a torchrun job.

    ``resume`` continues from the newest checkpoint that verifies. A resume whose config changes the
    training (:mod:`diffmoe.train.resume`) is refused unless ``accept_config_change``; then the previous
    config is kept as ``config.before-step-N.yaml`` and the change is logged in ``metrics.jsonl``.

    Returns a summary: final step, last training loss, held-out evaluation, skipped steps, tokens, seconds.
    """
    pc = cfg.train.parallel
    env = distributed.setup(device, pc.timeout_s, need_group=pc.mode == "fsdp")
    ok = False
    try:
        summary = Trainer(cfg, Path(run_dir), env, show_progress, accept_config_change).run(resume)
        ok = True
        return summary
    finally:
        distributed.teardown(env, ok)


def batch_split(cfg: RunConfig, ranks: int) -> tuple[int, int]:
    """(micro-batch size per rank, micro-batches per step) for the global batch over ``ranks``."""
    d = cfg.data
    micro = d.micro_batch_size or d.batch_size // ranks
    if micro < 1 or d.batch_size % (micro * ranks):
        field, value = ("data.micro_batch_size", d.micro_batch_size) if d.micro_batch_size else \
            ("data.batch_size", d.batch_size)
        raise ConfigError.invalid(field, value, f"the global batch data.batch_size={d.batch_size} must be a "
                                  f"multiple of micro_batch_size={max(micro, 1)} x {ranks} ranks")
    return micro, d.batch_size // (micro * ranks)


class Trainer:
    """One run: its data, model phases (dense warm-up, then MoE), and the parts that train it."""

    def __init__(self, cfg: RunConfig, run_dir: Path, env: distributed.DistEnv, show_progress: bool = True,
                 accept_config_change: bool = False):
        self.cfg, self.run_dir, self.env = cfg, run_dir, env
        self.accept_config_change = accept_config_change
        self.config_change: dict | None = None
        self.verbose = show_progress and env.is_main
        sources = sources_of(cfg.data)
        train_sets = open_datasets(sources, "train")
        self.train_set = train_sets[0]
        self.config_warnings = _check_data(cfg, self.train_set)
        tc = cfg.train
        self.micro, self.accum = batch_split(cfg, env.world)
        if cfg.data.mixture:
            self.stream = MixtureStream(train_sets, [s.weight for s in sources], self.micro, tc.seed,
                                        cfg.data.batch_size, env.rank, env.world)
            heldout = dict(zip((s.name for s in sources), open_datasets(sources, "heldout")))
        else:
            self.stream = BatchStream(self.train_set, self.micro, tc.seed, env.rank, env.world)
            heldout = PackedDataset(cfg.data.path, "heldout")
        self.evaluator = Evaluator(heldout, self.micro, eval_batches(cfg, self.micro), env.rank, env.world)
        self.checkpointer = Checkpointer(run_dir, tc.keep_checkpoints, env.rank, env.world, cfg.to_dict())
        self.plan = ParallelPlan.build(tc.parallel, env.world, env.device.type, tc.compile, tc.bf16)
        self.switch_step = int(round(tc.dense_warmup_frac * tc.steps)) if cfg.model.has_moe else 0
        self.callbacks: list[Callback] = [MoEPostStep()]
        self.tokens_per_step = cfg.data.batch_size * self.train_set.context_len

    # ------------------------------------------------------------------------------------------
    def run(self, resume: bool) -> dict:
        tc, env = self.cfg.train, self.env
        start_step, state = self._restore(resume)
        counts = self.model.parameter_counts()
        say(f"model: {counts['total'] / 1e6:.2f}M parameters, {counts['active'] / 1e6:.2f}M active; "
            f"{_describe_data(self.cfg, self.train_set)}; "
            f"{self.plan.layout.describe()}, {self.accum} micro-batch(es) of {self.micro} per rank and step",
            self.verbose and start_step == 0)
        # a resume rewrites the records after start_step: metrics.jsonl was truncated, TensorBoard purges them
        logger = MetricsLogger(self.run_dir, tc.tensorboard, env.is_main, purge_step=start_step + 1)
        if self.config_change is not None:
            logger.event({"kind": "config_change", "step": start_step, **self.config_change})
        for message in self.config_warnings:  # allowed for experiments, but loud: in the log and metrics.jsonl
            say(f"warning: {message}", env.is_main)
            logger.event({"kind": "warning", "step": start_step, "message": message})
        bar = progress(tc.steps, f"train {self.run_dir.name}", self.verbose, initial=start_step)
        t_start, last_loss, final = time.perf_counter(), float("nan"), None
        with self.stream.prefetch(start_step * self.accum) as batches:
            for step in range(start_step, tc.steps):
                torch.manual_seed(_step_seed(tc.seed, env.rank, step))  # all randomness of step s: (seed, rank, s)
                if state["phase"] == "dense" and step >= self.switch_step:
                    self._switch_to_moe(step)
                    state["phase"] = "moe"
                lr = lr_at(step, tc)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                result = train_step(self.model, self.wrapped, self.optimizer, batches, self.accum, tc.grad_clip,
                                    tc.bf16, self.plan, env)
                for callback in self.callbacks:
                    callback.post_step(self, step, result)
                self._count(step, result, state)
                state["tokens"] += self.tokens_per_step
                logger.count(self.tokens_per_step)
                last_loss, done = result.loss, step + 1
                bar.update(1)
                if _due(done, tc.log_every, tc.steps):
                    record = logger.train(done, result, lr, state, self.model)
                    bar.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
                if _due(done, tc.routing_log_every, tc.steps):
                    logger.routing(done, self.model)
                if _due(done, tc.eval_every, tc.steps):
                    final = self.evaluator(self.model)
                    logger.eval(done, final)
                if _due(done, tc.checkpoint_every, tc.steps):
                    self.checkpointer.save(done, self.model, self.optimizer, state)
        bar.close()
        logger.close()
        if final is None:  # resumed a finished run: nothing was evaluated above
            final = self.evaluator(self.model)
        return {"step": tc.steps, "loss": last_loss, "heldout": final, "skipped_steps": state["skipped_steps"],
                "tokens": state["tokens"], "seconds": time.perf_counter() - t_start,
                "parameters": self.model.parameter_counts()}

    # ------------------------------------------------------------------------------------------
    def _restore(self, resume: bool) -> tuple[int, dict]:
        """Build model and optimizer, from the newest checkpoint when resuming. Returns (first step,
        trainer state: phase, skipped_steps, bad_in_a_row, tokens)."""
        for line in self.checkpointer.recover():
            say(f"checkpoints: {line}", self.verbose)
        ckpt = self._resumable() if resume else None
        if not resume and list_checkpoints(self.run_dir):
            raise ConfigError(f"{self.run_dir} already holds checkpoints: pass --resume to continue it, or choose "
                              "a new run directory")
        state = {"phase": "dense" if self.switch_step > 0 else "moe", "skipped_steps": 0, "bad_in_a_row": 0,
                 "tokens": 0, "world": self.env.world, "layout": self.plan.layout.describe()}
        if ckpt is not None:
            meta = read_trainer_state(ckpt)
            state["phase"] = meta.get("phase", "moe")
            self._check_config(meta, ckpt)
        torch.manual_seed(self.cfg.train.seed)  # identical initial weights on every rank
        dense = state["phase"] == "dense"
        self._set_model(build_model(self.cfg, dense) if ckpt is not None else initial_model(self.cfg, dense))
        start_step = 0
        if ckpt is not None:
            meta = load_checkpoint(ckpt, self.model, self.optimizer)
            start_step = meta["step"]
            state.update({k: meta.get(k, 0) for k in ("skipped_steps", "bad_in_a_row", "tokens")})
            say(f"resumed from {ckpt} at step {start_step}", self.verbose)
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if ckpt is None or self.config_change is not None:  # a resume keeps the config it trained with
                save_config(self.cfg, str(self.run_dir / "config.yaml"))
            truncate_metrics(self.run_dir, start_step)
        return start_step, state

    def _resumable(self) -> Path:
        """The newest checkpoint that verifies; a damaged newer one is named in a warning."""
        ckpt, damaged = self.checkpointer.resumable()
        for message in damaged:
            say(f"warning: not resuming from a damaged checkpoint: {message}", self.env.is_main)
            warnings.warn(f"not resuming from a damaged checkpoint: {message}", stacklevel=3)
        if ckpt is None:
            where = self.run_dir / "checkpoints"
            raise ConfigError(f"--resume: no checkpoint in {where}" + (f" verifies ({'; '.join(damaged)})" if damaged else ""))
        return ckpt

    def _check_config(self, meta: dict, ckpt: Path) -> None:
        """Refuse a resume whose config changes the training, unless accepted (then keep both and log it)."""
        stored = meta.get("config")
        if stored is None:  # format 2 stored none: the config.yaml of the run's last start
            stored = load_config(str(self.run_dir / "config.yaml")).to_dict()
        try:  # with this version's defaults, so a field added since is no change
            stored = RunConfig.from_dict(stored).to_dict()
        except ConfigError as err:
            raise CheckpointError(f"{ckpt / 'trainer.json'}: the stored run config is invalid: {err}") from None
        changes = config_changes(stored, self.cfg.to_dict(), self.cfg.model.kinds)
        if not changes:
            return
        if not self.accept_config_change:
            raise ConfigError(f"--resume from {ckpt} with a config that changes the training: {describe(changes)}. "
                              "Resume with the run's config.yaml, or pass --accept-config-change to continue "
                              "with the new values (both configs are kept)")
        step = meta["step"]
        self.config_change = {"changes": {k: list(v) for k, v in changes.items()},
                              "previous_config": f"config.before-step-{step:08d}.yaml"}
        if self.env.is_main:
            save_config(RunConfig.from_dict(stored), str(self.run_dir / self.config_change["previous_config"]))
        say(f"warning: resuming at step {step} with a changed config: {describe(changes)}", self.env.is_main)

    def _set_model(self, model: Decoder) -> None:
        """Parallelize ``model`` for the run's layout on the device (sharded under fsdp) and build its
        optimizer."""
        self.model = model
        self.wrapped = parallelize(model, self.plan, self.env.device)
        self.optimizer = build_optimizer(self.model, self.cfg.train)

    def _switch_to_moe(self, step: int) -> None:
        """The dense warm-up ends: copy the dense FFN into every expert; shared weights keep their
        optimizer state."""
        dense = build_model(self.cfg, dense=True)
        dense.load_state_dict(full_state(self.model), strict=False)  # tied names are absent
        with torch.random.fork_rng(devices=[]):  # the routers' new weights: the same on every rank
            torch.manual_seed(_step_seed(self.cfg.train.seed, -1, step))
            moe = build_model(self.cfg, dense=False)
        moe.dense_to_moe(dense)
        old_model, old_optimizer = self.model, self.optimizer
        self._set_model(moe)
        transfer_state(old_optimizer, old_model, self.optimizer, self.model)
        say(f"step {step}: dense warm-up done, FFN copied into every expert", self.verbose)

    def _count(self, step: int, result, state: dict) -> None:
        """Count a skipped step; stop the run after ``max_bad_steps`` in a row."""
        if result.applied:
            state["bad_in_a_row"] = 0
            return
        state["skipped_steps"] += 1
        state["bad_in_a_row"] += 1
        limit = self.cfg.train.max_bad_steps
        if state["bad_in_a_row"] >= limit:
            self.checkpointer.save(step, self.model, self.optimizer, state)
            raise TrainingError(f"{limit} steps in a row had a non-finite loss or gradient (last at step {step}); "
                                f"stopped. The last usable weights are in {self.checkpointer.latest()}. Lower "
                                "train.lr or enable train.grad_clip.")


def eval_batches(cfg: RunConfig, micro: int) -> int | None:
    """Held-out batches of ``micro`` rows that score ``data.eval_batches`` x (micro_batch_size, else
    batch_size) rows: the same held-out rows whatever the number of ranks."""
    d = cfg.data
    if d.eval_batches is None:
        return None
    return d.eval_batches * (d.micro_batch_size or d.batch_size) // micro


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's full tensors on the CPU of every rank, gathered from their shards."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in model_state(model).items()}


def _check_data(cfg: RunConfig, dataset) -> list[str]:
    """Refuse a config that does not fit the data or cannot train on its sequences; return the config's
    warnings (:meth:`RunConfig.check_training`)."""
    if dataset.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"invalid config: model.vocab_size={cfg.model.vocab_size}: the dataset's tokenizer "
                          f"has {dataset.vocab_size} tokens")
    if dataset.context_len > cfg.model.max_seq_len:
        raise ConfigError(f"invalid config: model.max_seq_len={cfg.model.max_seq_len}: the dataset's "
                          f"sequences have {dataset.context_len} positions")
    return cfg.check_training(dataset.context_len)


def _describe_data(cfg: RunConfig, train_set) -> str:
    if not cfg.data.mixture:
        return f"{len(train_set)} training sequences of {train_set.context_len} tokens"
    parts = ", ".join(f"{s.name} {s.weight:.0%}" for s in sources_of(cfg.data))
    return f"a mixture of {len(cfg.data.mixture)} datasets ({parts}) of {train_set.context_len}-token sequences"


def _due(done: int, every: int, last: int) -> bool:
    """Whether a periodic job runs after ``done`` steps: every ``every`` steps, and after the last."""
    return done % every == 0 or done == last


def _step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of step ``step`` on ``rank`` (rank -1: draws that must agree on every rank)."""
    return int(np.random.SeedSequence([seed, rank + 1, step]).generate_state(1)[0])
