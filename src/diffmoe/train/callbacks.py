"""The parts of training that run at fixed points of the loop (OLMo-core's callbacks, torchtitan's hooks).

The loop (:class:`~diffmoe.train.loop.Trainer`) only steps; everything else is a :class:`Callback`,
called in order, on every rank, at these points:

    on_start(trainer, step)              after the model (and a checkpoint) is loaded; step: the first step
    pre_step(trainer, step)              before step ``step`` (0-based): the dense warm-up's switch
    post_backward(trainer, step, micro)  after each micro-batch's backward
    pre_optimizer_step(trainer, step)    after clipping, before an update that is applied
    post_step(trainer, step, result)     after the update (applied or skipped): MoE per-step updates,
                                         bad-step guard, logging, evaluation, checkpoints
    on_eval(trainer, done, result)       after an evaluation (``done`` steps)
    on_checkpoint(trainer, done, path)   after a checkpoint is written
    on_end(trainer)                      after the last step

A callback that runs a collective runs it on every rank. :func:`default_callbacks` is what ``diffmoe
train`` uses; ``Trainer(callbacks=...)`` adds others.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..console import progress
from .metrics import flops_per_token, gpu_peak_flops, peak_memory_gb, routing_metrics

if TYPE_CHECKING:
    from pathlib import Path

    from .loop import Trainer
    from .step import StepResult


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the message says why."""


class Callback:
    """Does nothing at every point; subclasses override what they need."""

    def on_start(self, trainer: "Trainer", step: int) -> None:
        pass

    def pre_step(self, trainer: "Trainer", step: int) -> None:
        pass

    def post_backward(self, trainer: "Trainer", step: int, micro: int) -> None:
        pass

    def pre_optimizer_step(self, trainer: "Trainer", step: int) -> None:
        pass

    def post_step(self, trainer: "Trainer", step: int, result: "StepResult") -> None:
        pass

    def on_eval(self, trainer: "Trainer", done: int, result: dict) -> None:
        pass

    def on_checkpoint(self, trainer: "Trainer", done: int, path: "Path") -> None:
        pass

    def on_end(self, trainer: "Trainer") -> None:
        pass


def due(done: int, every: int, last: int) -> bool:
    """Whether a periodic job runs after ``done`` steps: every ``every`` steps, and after the last."""
    return done % every == 0 or done == last


class DenseWarmup(Callback):
    """The dense warm-up (``train.dense_warmup_frac``): at ``trainer.switch_step`` the dense FFNs are copied
    into every expert."""

    def pre_step(self, trainer: "Trainer", step: int) -> None:
        if trainer.state.phase == "dense" and step >= trainer.switch_step:
            trainer.switch_to_moe(step)


class MoEPostStep(Callback):
    """Each MoE layer class's once-per-step update (:meth:`diffmoe.moe.MoELayer.post_step`) with all of the
    model's layers of the class, the same on every rank: the sums it asks for are all-reduced on the device."""

    def post_step(self, trainer: "Trainer", step: int, result: "StepResult") -> None:
        by_class: dict[type, list] = {}
        for _, layer in trainer.model.moe_layers():
            by_class.setdefault(type(layer), []).append(layer)
        world = trainer.env.world
        for cls, layers in by_class.items():
            cls.post_step(layers, lambda t: _sum_over_ranks(t, world))


def _sum_over_ranks(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


class BadSteps(Callback):
    """Counts skipped (non-finite) steps; after ``train.max_bad_steps`` in a row, saves a checkpoint and
    stops the run with a :class:`TrainingError`."""

    def post_step(self, trainer: "Trainer", step: int, result: "StepResult") -> None:
        state = trainer.state
        if result.applied:
            state.bad_in_a_row = 0
            return
        state.skipped_steps += 1
        state.bad_in_a_row += 1
        limit = trainer.cfg.train.max_bad_steps
        if state.bad_in_a_row >= limit:  # the state before this step (its tokens not trained on)
            trainer.save_checkpoint(step, dataclasses.replace(state, tokens=state.tokens - trainer.tokens_per_step))
            raise TrainingError(
                f"{limit} steps in a row had a non-finite loss or gradient (last at step {step}); "
                f"stopped. The last usable weights are in {trainer.checkpointer.latest()}. Lower "
                "train.lr or enable train.grad_clip."
            )


class TrainLog(Callback):
    """Every ``train.log_every`` steps a ``train`` record: loss, auxiliary losses (scaled, and each unscaled),
    lr, gradient norm, tokens, skipped steps, and since the last record tokens/s and FLOP/s of the whole job
    (and on a known GPU the model FLOPs utilisation ``mfu``: over the peak of all its GPUs), the seconds rank
    0's steps waited for data and rank 0's peak memory."""

    def on_start(self, trainer: "Trainer", step: int) -> None:
        self._t, self._tokens, self._wait = time.perf_counter(), 0, 0.0
        self._peak = gpu_peak_flops(trainer.env.device)

    def post_step(self, trainer: "Trainer", step: int, result: "StepResult") -> None:
        self._tokens += trainer.tokens_per_step
        self._wait += result.data_wait_s
        done, tc = step + 1, trainer.cfg.train
        if not due(done, tc.log_every, tc.steps) or not trainer.env.is_main:  # rank 0 logs; no syncs elsewhere
            return
        now = time.perf_counter()
        elapsed = now - self._t
        flops = flops_per_token(trainer.model, trainer.train_set.context_len) * self._tokens / elapsed  # all ranks
        record = {
            "kind": "train",
            "step": done,
            "loss": result.loss,
            "aux_loss": result.aux_loss,
            **{f"aux_{name}_unscaled": float(value) for name, value in result.aux_unscaled.items()},
            "lr": trainer.lr,
            "grad_norm": result.grad_norm,
            "tokens": trainer.state.tokens,
            "tokens_per_s": self._tokens / elapsed,
            "flops_per_s": flops,
            **({"mfu": flops / (self._peak * trainer.env.world)} if self._peak else {}),
            "data_wait_s": self._wait,
            "skipped_steps": trainer.state.skipped_steps,
            **peak_memory_gb(trainer.env.device),
        }
        self._t, self._tokens, self._wait = now, 0, 0.0
        trainer.log(record)
        trainer.last_train_record = record


class RoutingLog(Callback):
    """Every ``train.routing_log_every`` steps a ``routing`` record of the last forward's statistics."""

    def post_step(self, trainer: "Trainer", step: int, result: "StepResult") -> None:
        tc = trainer.cfg.train
        if due(step + 1, tc.routing_log_every, tc.steps) and trainer.env.is_main:
            metrics = routing_metrics(trainer.model)
            if metrics:
                trainer.log({"kind": "routing", "step": step + 1, **metrics})


class Evaluate(Callback):
    """Every ``train.eval_every`` steps the held-out evaluation; every callback's ``on_eval`` gets it."""

    def post_step(self, trainer: "Trainer", step: int, result: "StepResult") -> None:
        tc = trainer.cfg.train
        if due(step + 1, tc.eval_every, tc.steps):
            trainer.evaluate(step + 1)


class EvalLog(Callback):
    """An ``eval`` record of each evaluation: loss and perplexity per dataset and domain."""

    def on_eval(self, trainer: "Trainer", done: int, result: dict) -> None:
        trainer.log(
            {
                "kind": "eval",
                "step": done,
                **{f"{d}.loss": v["loss"] for d, v in result.items()},
                **{f"{d}.ppl": v["ppl"] for d, v in result.items()},
            }
        )


class Checkpoint(Callback):
    """Every ``train.checkpoint_every`` steps a checkpoint (weights, optimizer, trainer state, data position)."""

    def post_step(self, trainer: "Trainer", step: int, result: "StepResult") -> None:
        tc = trainer.cfg.train
        if due(step + 1, tc.checkpoint_every, tc.steps):
            trainer.save_checkpoint(step + 1)


class Progress(Callback):
    """The progress bar (rank 0, unless quiet), with the loss and tokens/s of the last train record."""

    def on_start(self, trainer: "Trainer", step: int) -> None:
        self._bar = progress(trainer.cfg.train.steps, f"train {trainer.run_dir.name}", trainer.verbose, initial=step)

    def post_step(self, trainer: "Trainer", step: int, result: "StepResult") -> None:
        self._bar.update(1)
        record = trainer.last_train_record
        if record is not None and record["step"] == step + 1:
            self._bar.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")

    def on_end(self, trainer: "Trainer") -> None:
        self._bar.close()


def default_callbacks() -> list[Callback]:
    """What ``diffmoe train`` runs, in this order: the dense warm-up, the bad-step guard (its checkpoint holds
    the state before the bad step), the MoE per-step updates, train and routing records, evaluation and its
    record, checkpoints, the progress bar."""
    return [
        DenseWarmup(),
        BadSteps(),
        MoEPostStep(),
        TrainLog(),
        RoutingLog(),
        Evaluate(),
        EvalLog(),
        Checkpoint(),
        Progress(),
    ]
