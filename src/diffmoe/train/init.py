"""A run's initial weights: seeded random, or ``train.init_from`` (continued pre-training and sparse
upcycling).

``init_from`` names a diffmoe run directory (its newest checkpoint), a checkpoint directory, or a run
made by ``diffmoe import``. Only weights are taken (not the optimizer state, step or data position).
A model of the same shape loads them as they are; a dense source into a model with MoE layers copies
each dense FFN into every expert of the matching layer (routers keep their seeded random init), so
the upcycled model computes what the source computed at step 0 when its layers reduce to the dense
FFN with identical experts (merged experts; top-k with renormalised gates).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import ConfigError, RunConfig
from ..model import Decoder


def build_model(cfg: RunConfig, dense: bool) -> Decoder:
    """The run's model, or its all-dense twin for the dense warm-up phase; seeded from the global RNG."""
    return Decoder(dataclasses.replace(cfg.model, ffn="dense") if dense else cfg.model)


def initial_model(cfg: RunConfig, dense: bool) -> Decoder:
    """:func:`build_model`, with the weights of ``train.init_from`` when it is set."""
    model = build_model(cfg, dense)
    if cfg.train.init_from:
        load_initial_weights(model, cfg.train.init_from)
    return model


def load_initial_weights(model: Decoder, source: str | Path) -> None:
    """Copy the weights of ``source`` (see the module docstring) into ``model``; a ConfigError naming
    ``train.init_from`` when the source is missing or its shapes do not fit."""
    from ..runs import load_run
    from .checkpoint import CheckpointError

    source = Path(source)
    run_dir, checkpoint = (source.parent.parent, source) if (source / "trainer.json").is_file() else (source, None)
    try:
        _, src, _ = load_run(run_dir, checkpoint)
    except (CheckpointError, FileNotFoundError) as err:
        raise ConfigError(f"invalid config: train.init_from={str(source)!r}: {err}") from None
    if src.cfg.kinds == model.cfg.kinds or not src.moe_layers():
        mismatch = _shape_mismatch(src, model, ffn=bool(src.moe_layers()) or not model.moe_layers())
        if mismatch:
            raise ConfigError(f"invalid config: train.init_from={str(source)!r}: {mismatch}")
        if src.cfg.kinds == model.cfg.kinds:
            model.load_state_dict(src.state_dict())
        else:
            model.dense_to_moe(src)
        return
    raise ConfigError(
        f"invalid config: train.init_from={str(source)!r}: its FFN kinds {src.cfg.kinds} differ from "
        f"the run's {model.cfg.kinds}; only a dense source can start a model with MoE layers"
    )


def _shape_mismatch(src: Decoder, model: Decoder, ffn: bool) -> str | None:
    """The first tensor whose name or shape differs (FFN tensors only when ``ffn``), or None."""
    theirs = src.state_dict()
    for name, value in model.state_dict().items():
        if not ffn and ".ffn." in name:
            continue
        if name not in theirs:
            return f"the source has no tensor {name}"
        if theirs[name].shape != value.shape:
            return f"{name} has shape {tuple(theirs[name].shape)} there, {tuple(value.shape)} here"
    if not ffn:
        d_ff = src.cfg.d_ff
        for i, layer in model.moe_layers():
            if layer.experts.d_ff != d_ff:
                return (
                    f"layer {i}'s experts have d_ff={layer.experts.d_ff}, the source's dense FFN {d_ff}: "
                    "set model.moe.d_ff to it to copy the FFN into every expert"
                )
    return None
