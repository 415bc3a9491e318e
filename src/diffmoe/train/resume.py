"""What a resumed run may change in its config.

A checkpoint stores the run config that trained it. Resuming with a config that differs in a field that
changes what is computed (the model, the data and global batch, the schedule, the optimizer, the seed,
the precision) would silently train a different run (a new ``train.steps`` reshapes the cosine
schedule), so :func:`config_changes` lists those differences and the trainer refuses them unless the user
accepts them explicitly. The fields below only say how the same computation is laid out, observed or
saved, and may change freely.
"""

from __future__ import annotations

from ..moe.registry import FAMILIES

FREE = (
    "train.parallel.mode",  # the layout and world size (param_dtype / reduce_dtype are not free)
    "train.parallel.dp_replicate",
    "train.parallel.dp_shard",
    "train.parallel.ep",
    "train.parallel.etp",
    "train.parallel.activation_checkpointing",
    "train.parallel.timeout_s",
    "data.micro_batch_size",  # how the global batch is split, like the world size (see below)
    "data.eval_batches",
    "train.log_every",
    "train.routing_log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.max_bad_steps",
    "train.tensorboard",
    "train.loggers",
    "train.compile",
    "train.init_from",  # read at step 0 only
    "model.moe.dispatch",  # grouped_mm or loop: the same arithmetic
)
"""Dotted config fields (or sections) a resume may change. Like the world size, ``micro_batch_size``
decides which sequences share a micro-batch, and so the numbers of layers that select within one
(a training capacity, or selection by experts) and of per-micro-batch auxiliary losses: free as the
layout is, not bit-for-bit neutral for those layers."""


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def _free(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FREE)


def _unused(name: str, kinds: set[str]) -> bool:
    """A field of an FFN family the model does not use (or of the MoE section in a dense model)."""
    if not name.startswith("model.moe."):
        return False
    if kinds <= {"dense"}:
        return True
    section = name.split(".")[2]
    return section in FAMILIES and section not in kinds


def config_changes(old: dict, new: dict, kinds=()) -> dict[str, tuple[object, object]]:
    """{dotted field: (old value, new value)} for every field outside :data:`FREE` that differs between
    two ``RunConfig.to_dict()`` trees (a field missing on one side counts as None); fields of FFN
    families outside ``kinds`` (the model's layer kinds) are ignored."""
    a, b = _flatten(old), _flatten(new)
    return {
        name: (a.get(name), b.get(name))
        for name in sorted(set(a) | set(b))
        if not _free(name) and not _unused(name, set(kinds)) and a.get(name) != b.get(name)
    }


def describe(changes: dict[str, tuple[object, object]]) -> str:
    return ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changes.items())
