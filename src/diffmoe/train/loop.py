"""The training loop behind ``diffmoe train``: the :class:`Trainer` builds the run's parts (the data
loader :mod:`diffmoe.data.loader`, the model parallelized by :mod:`diffmoe.parallel.parallelize`, the
step :mod:`.step`, the checkpointer :mod:`.checkpoint`, the evaluator :mod:`.evaluator`, the loggers
:mod:`.loggers`) and steps; logging, evaluation, checkpoints, the dense warm-up's switch and the MoE
layers' per-step updates are callbacks (:mod:`.callbacks`) called at fixed points of the loop.

One step = one global batch of ``data.batch_size`` sequences = ``accum`` micro-batches of
``data.micro_batch_size`` on each of the ranks -> clip -> AdamW update. Step s reads the sequences at
positions s*G .. (s+1)*G - 1 of the seeded data order (G the global batch) whatever the world size, so
a config means the same training on any number of ranks. Checkpoints hold weights, optimizer state and
the data position and load into any layout; the random state of step s on rank r is seeded from
(seed, r, s), so a resumed run reproduces the uninterrupted run's losses exactly (under torchrun too,
and across world sizes for layers without sampling).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, RunConfig, load_config, save_config
from ..console import say
from ..data.dataset import PackedDataset
from ..data.loader import BatchStream
from ..data.mixture import MixtureStream, open_datasets, sources_of
from ..model import Decoder
from ..parallel import distributed
from ..parallel.dcp import model_state
from ..parallel.parallelize import ParallelPlan, parallelize
from .callbacks import Callback, default_callbacks
from .checkpoint import Checkpointer, CheckpointError, list_checkpoints, load_checkpoint, read_trainer_state
from .evaluator import Evaluator
from .init import build_model, initial_model
from .loggers import Logger, build_loggers
from .metrics import truncate_metrics
from .optim import build_optimizer, lr_at, transfer_state
from .resume import config_changes, describe
from .step import StepHooks, Stepper


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    resume: bool = False,
    show_progress: bool = True,
    device: str | None = None,
    accept_config_change: bool = False,
    callbacks: list[Callback] = (),
) -> dict:
    """Train ``cfg`` into ``run_dir`` (config.yaml, metrics.jsonl, tensorboard/, checkpoints/) on
    ``device`` (default: CUDA when available), as one process or one rank of a torchrun job.

    ``resume`` continues from the newest checkpoint that verifies. A resume whose config changes the
    training (:mod:`diffmoe.train.resume`) is refused unless ``accept_config_change``; then the previous
    config is kept as ``config.before-step-N.yaml`` and the change is logged in ``metrics.jsonl``.

    ``callbacks`` run after the default ones (:func:`~diffmoe.train.callbacks.default_callbacks`).

    Returns a summary: final step, last training loss, held-out evaluation, skipped steps, tokens, seconds.
    """
    pc = cfg.train.parallel
    env = distributed.setup(device, pc.timeout_s, need_group=pc.mode == "fsdp")
    ok = False
    try:
        summary = Trainer(
            cfg, Path(run_dir), env, show_progress, accept_config_change, default_callbacks() + list(callbacks)
        ).run(resume)
        ok = True
        return summary
    finally:
        distributed.teardown(env, ok)


def batch_split(cfg: RunConfig, ranks: int) -> tuple[int, int]:
    """(micro-batch size per rank, micro-batches per step) for the global batch over ``ranks``."""
    d = cfg.data
    micro = d.micro_batch_size or d.batch_size // ranks
    if micro < 1 or d.batch_size % (micro * ranks):
        field, value = (
            ("data.micro_batch_size", d.micro_batch_size) if d.micro_batch_size else ("data.batch_size", d.batch_size)
        )
        raise ConfigError.invalid(
            field,
            value,
            f"the global batch data.batch_size={d.batch_size} must be a "
            f"multiple of micro_batch_size={max(micro, 1)} x {ranks} ranks",
        )
    return micro, d.batch_size // (micro * ranks)


@dataclass
class TrainerState:
    """What a checkpoint records of the loop (``trainer.json``) besides weights, optimizer and step."""

    phase: str
    """``dense`` during the dense warm-up, then ``moe``."""
    skipped_steps: int = 0
    bad_in_a_row: int = 0
    tokens: int = 0
    world: int = 1
    layout: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Trainer(StepHooks):
    """One run: its data, its model (dense warm-up, then MoE), the step, and the callbacks that do the rest
    (:mod:`diffmoe.train.callbacks`: logging, evaluation, checkpoints, the warm-up's switch, MoE per-step
    updates). ``callbacks``: default :func:`~diffmoe.train.callbacks.default_callbacks`."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        env: distributed.DistEnv,
        show_progress: bool = True,
        accept_config_change: bool = False,
        callbacks: list[Callback] | None = None,
    ):
        self.cfg, self.run_dir, self.env = cfg, run_dir, env
        self.accept_config_change = accept_config_change
        self.config_change: dict | None = None
        self.verbose = show_progress and env.is_main
        self.callbacks = default_callbacks() if callbacks is None else callbacks
        sources = sources_of(cfg.data)
        train_sets = open_datasets(sources, "train")
        self.train_set = train_sets[0]
        self.config_warnings = _check_data(cfg, self.train_set)
        tc = cfg.train
        self.micro, self.accum = batch_split(cfg, env.world)
        if cfg.data.mixture:
            self.stream = MixtureStream(
                train_sets, [s.weight for s in sources], self.micro, tc.seed, cfg.data.batch_size, env.rank, env.world
            )
            heldout = dict(zip((s.name for s in sources), open_datasets(sources, "heldout")))
        else:
            self.stream = BatchStream(self.train_set, self.micro, tc.seed, env.rank, env.world)
            heldout = PackedDataset(cfg.data.path, "heldout")
        self.evaluator = Evaluator(heldout, self.micro, eval_batches(cfg, self.micro), env.rank, env.world)
        self.checkpointer = Checkpointer(run_dir, tc.keep_checkpoints, env.rank, env.world, cfg.to_dict())
        self.plan = ParallelPlan.build(tc.parallel, env.world, env.device.type, tc.compile, tc.bf16)
        self.switch_step = int(round(tc.dense_warmup_frac * tc.steps)) if cfg.model.has_moe else 0
        self.tokens_per_step = cfg.data.batch_size * self.train_set.context_len
        self.loggers: list[Logger] = []
        self.step, self.lr = 0, 0.0
        self.last_eval: dict | None = None
        self.last_train_record: dict | None = None

    # ------------------------------------------------------------------------------------------
    def run(self, resume: bool) -> dict:
        tc, env = self.cfg.train, self.env
        start_step = self._restore(resume)
        counts = self.model.parameter_counts()
        say(
            f"model: {counts['total'] / 1e6:.2f}M parameters, {counts['active'] / 1e6:.2f}M active; "
            f"{_describe_data(self.cfg, self.train_set)}; "
            f"{self.plan.layout.describe()}, {self.accum} micro-batch(es) of {self.micro} per rank and step",
            self.verbose and start_step == 0,
        )
        # a resume rewrites the records after start_step: metrics.jsonl was truncated, TensorBoard purges them
        if env.is_main:
            self.loggers = build_loggers(tc.logger_names(), self.run_dir, self.cfg.to_dict(), start_step + 1)
        if self.config_change is not None:
            self.log({"kind": "config_change", "step": start_step, **self.config_change})
        for message in self.config_warnings:  # allowed for experiments, but loud: in the log and metrics.jsonl
            say(f"warning: {message}", env.is_main)
            self.log({"kind": "warning", "step": start_step, "message": message})
        t_start, last_loss = time.perf_counter(), float("nan")
        self._call("on_start", start_step)
        ok = False
        try:
            with self.stream.prefetch(start_step * self.accum) as batches:
                for step in range(start_step, tc.steps):
                    self.step = step
                    torch.manual_seed(_step_seed(tc.seed, env.rank, step))  # all randomness of step s: (seed, rank, s)
                    self._call("pre_step", step)
                    self.lr = lr_at(step, tc)
                    for group in self.optimizer.param_groups:
                        group["lr"] = self.lr
                    result = self.stepper.step(batches, self.accum, self)
                    self.state.tokens += self.tokens_per_step
                    last_loss = result.loss
                    self._call("post_step", step, result)
            self._call("on_end")
            ok = True
        finally:
            for logger in self.loggers:
                logger.close(ok)
        if self.last_eval is None:  # resumed a finished run: nothing was evaluated above
            self.last_eval = self.evaluator(self.model)
        return {
            "step": tc.steps,
            "loss": last_loss,
            "heldout": self.last_eval,
            "skipped_steps": self.state.skipped_steps,
            "tokens": self.state.tokens,
            "seconds": time.perf_counter() - t_start,
            "parameters": self.model.parameter_counts(),
        }

    # ---- what callbacks use --------------------------------------------------------------------
    def log(self, record: dict) -> None:
        """Write ``record`` to every logger (rank 0; the other ranks have none)."""
        for logger in self.loggers:
            logger.log(record)

    def evaluate(self, done: int) -> dict:
        """The held-out evaluation after ``done`` steps; every callback's ``on_eval`` gets it."""
        self.last_eval = self.evaluator(self.model)
        self._call("on_eval", done, self.last_eval)
        return self.last_eval

    def save_checkpoint(self, done: int, state: TrainerState | None = None) -> None:
        """A checkpoint after ``done`` steps, with the trainer's state (or ``state``); then every callback's
        ``on_checkpoint``."""
        self.checkpointer.save(done, self.model, self.optimizer, (state or self.state).to_dict())
        self._call("on_checkpoint", done, self.checkpointer.latest())

    def switch_to_moe(self, step: int) -> None:
        """The dense warm-up ends: copy the dense FFN into every expert; shared weights keep their
        optimizer state. Unsharded layouts copy on the device. Under FSDP the dense model is gathered to the
        CPU, the MoE model filled there and sharded by ``parallelize`` (no device holds it whole). The new
        models are built from a forked CPU generator, so the step's random draws do not depend on the layout."""
        sharded = self.plan.layout.mode == "fsdp"
        with torch.random.fork_rng(devices=[]):
            if sharded:
                dense = build_model(self.cfg, dense=True)  # its initial values are overwritten below
                dense.load_state_dict(full_state(self.model), strict=False)  # tied names are absent
            torch.default_generator.manual_seed(
                _step_seed(self.cfg.train.seed, -1, step)
            )  # routers: same on every rank
            moe = build_model(self.cfg, dense=False)
        if not sharded:
            dense = self.model
            moe.to(self.env.device)
        moe.dense_to_moe(dense)
        old_model, old_optimizer = self.model, self.optimizer
        self._set_model(moe)
        transfer_state(old_optimizer, old_model, self.optimizer, self.model)
        self.state.phase = "moe"
        say(f"step {step}: dense warm-up done, FFN copied into every expert", self.verbose)

    # ---- StepHooks: the points inside a step ---------------------------------------------------
    def post_backward(self, micro: int) -> None:
        self._call("post_backward", self.step, micro)

    def pre_optimizer_step(self) -> None:
        self._call("pre_optimizer_step", self.step)

    def _call(self, point: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, point)(self, *args)

    # ------------------------------------------------------------------------------------------
    def _restore(self, resume: bool) -> int:
        """Build model and optimizer, from the newest checkpoint when resuming; set :attr:`state`. Returns
        the first step."""
        for line in self.checkpointer.recover():
            say(f"checkpoints: {line}", self.verbose)
        ckpt = self._resumable() if resume else None
        if not resume and list_checkpoints(self.run_dir):
            raise ConfigError(
                f"{self.run_dir} already holds checkpoints: pass --resume to continue it, or choose a new run directory"
            )
        self.state = TrainerState(
            phase="dense" if self.switch_step > 0 else "moe", world=self.env.world, layout=self.plan.layout.describe()
        )
        if ckpt is not None:
            meta = read_trainer_state(ckpt)
            self.state.phase = meta.get("phase", "moe")
            self._check_config(meta, ckpt)
        torch.manual_seed(self.cfg.train.seed)  # identical initial weights on every rank
        dense = self.state.phase == "dense"
        self._set_model(build_model(self.cfg, dense) if ckpt is not None else initial_model(self.cfg, dense))
        start_step = 0
        if ckpt is not None:
            meta = load_checkpoint(ckpt, self.model, self.optimizer)
            start_step = meta["step"]
            for name in ("skipped_steps", "bad_in_a_row", "tokens"):
                setattr(self.state, name, meta.get(name, 0))
            say(f"resumed from {ckpt} at step {start_step}", self.verbose)
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if ckpt is None or self.config_change is not None:  # a resume keeps the config it trained with
                save_config(self.cfg, str(self.run_dir / "config.yaml"))
            truncate_metrics(self.run_dir, start_step)
        return start_step

    def _resumable(self) -> Path:
        """The newest checkpoint that verifies; a damaged newer one is named in a warning."""
        ckpt, damaged = self.checkpointer.resumable()
        for message in damaged:
            say(f"warning: not resuming from a damaged checkpoint: {message}", self.env.is_main)
            warnings.warn(f"not resuming from a damaged checkpoint: {message}", stacklevel=3)
        if ckpt is None:
            where = self.run_dir / "checkpoints"
            raise ConfigError(
                f"--resume: no checkpoint in {where}" + (f" verifies ({'; '.join(damaged)})" if damaged else "")
            )
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
            raise ConfigError(
                f"--resume from {ckpt} with a config that changes the training: {describe(changes)}. "
                "Resume with the run's config.yaml, or pass --accept-config-change to continue "
                "with the new values (both configs are kept)"
            )
        step = meta["step"]
        self.config_change = {
            "changes": {k: list(v) for k, v in changes.items()},
            "previous_config": f"config.before-step-{step:08d}.yaml",
        }
        if self.env.is_main:
            save_config(RunConfig.from_dict(stored), str(self.run_dir / self.config_change["previous_config"]))
        say(f"warning: resuming at step {step} with a changed config: {describe(changes)}", self.env.is_main)

    def _set_model(self, model: Decoder) -> None:
        """Parallelize ``model`` for the run's layout on the device (sharded under fsdp) and build its
        optimizer."""
        self.model = model
        self.wrapped = parallelize(model, self.plan, self.env.device)
        self.optimizer = build_optimizer(self.model, self.cfg.train)
        self.stepper = Stepper(
            self.wrapped, self.optimizer, self.plan, self.env, self.cfg.train.grad_clip, self.cfg.train.bf16
        )


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
        raise ConfigError(
            f"invalid config: model.vocab_size={cfg.model.vocab_size}: the dataset's tokenizer "
            f"has {dataset.vocab_size} tokens"
        )
    if dataset.context_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"invalid config: model.max_seq_len={cfg.model.max_seq_len}: the dataset's "
            f"sequences have {dataset.context_len} positions"
        )
    return cfg.check_training(dataset.context_len)


def _describe_data(cfg: RunConfig, train_set) -> str:
    if not cfg.data.mixture:
        return f"{len(train_set)} training sequences of {train_set.context_len} tokens"
    parts = ", ".join(f"{s.name} {s.weight:.0%}" for s in sources_of(cfg.data))
    return f"a mixture of {len(cfg.data.mixture)} datasets ({parts}) of {train_set.context_len}-token sequences"


def _step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of step ``step`` on ``rank`` (rank -1: draws that must agree on every rank)."""
    return int(np.random.SeedSequence([seed, rank + 1, step]).generate_state(1)[0])
