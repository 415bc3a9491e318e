"""What a resumed run may change in its config.

A checkpoint stores the run config that trained it. Resuming with a config that differs in a field that
changes what is computed (the model, the data and global batch, the schedule, the optimizer, the seed,
the precision) would silently train a different run (a new ``train.steps`` reshapes the cosine
schedule), so :func:`config_changes` lists those differences and the trainer refuses them unless the user
accepts them explicitly. The fields below only say how the same computation is laid out, observed or
saved, and may change freely.
"""

from __future__ import annotations

FREE = (
    "train.parallel.mode",     # the layout and world size (param_dtype / reduce_dtype are not free)
    "train.parallel.dp_replicate",
    "train.parallel.dp_shard",
    "train.parallel.ep",
    "train.parallel.etp",
    "train.parallel.activation_checkpointing",
    "train.parallel.timeout_s",
    "data.micro_batch_size",   # accumulation: the same global batch
    "data.eval_batches",
    "train.log_every",
    "train.routing_log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.max_bad_steps",
    "train.tensorboard",
    "train.compile",
    "train.init_from",         # read at step 0 only
)
"""Dotted config fields (or sections) a resume may change."""


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


def config_changes(old: dict, new: dict) -> dict[str, tuple[object, object]]:
    """{dotted field: (old value, new value)} for every field outside :data:`FREE` that differs between
    two ``RunConfig.to_dict()`` trees (a field missing on one side counts as None)."""
    a, b = _flatten(old), _flatten(new)
    return {name: (a.get(name), b.get(name)) for name in sorted(set(a) | set(b))
            if not _free(name) and a.get(name) != b.get(name)}


def describe(changes: dict[str, tuple[object, object]]) -> str:
    return ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changes.items())
