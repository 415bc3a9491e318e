"""Distributed checkpoint (``torch.distributed.checkpoint``) of a model and its AdamW state, in
safetensors files, independent of the world size and layout that wrote them.

Each rank writes the shards it owns (DTensors under FSDP2, ep or etp; replicated tensors once) with
``HuggingFaceStorageWriter(save_distributed=True)``: plain safetensors files whose headers record
where each shard sits in the full tensor, so no pickled metadata file exists and nothing is unpickled
on load. ``dcp.load`` reads into whatever layout the loading model has (1 process without a process
group, or any number of ranks), reading only the slices each rank needs.

State dicts use clean parameter names (``get_model_state_dict``: no FSDP or compile prefixes); the
second name of a tied parameter (``lm_head.weight`` with tied embeddings) is not stored. Optimizer
state is flattened per parameter name (``state.<name>.exp_avg`` ...); hyper-parameters come from the
run config, not the checkpoint.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def tied_names(model: nn.Module) -> set[str]:
    """Names of parameters that repeat an earlier one (tied weights)."""
    seen, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    return tied


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors by clean name (DTensors where sharded), tied duplicates left out."""
    state = get_model_state_dict(model)
    for name in tied_names(model):
        state.pop(name, None)
    return state


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, object]:
    """The flattened optimizer state (``state.<param>.<key>`` tensors, ``param_groups.*`` values)."""
    return get_optimizer_state_dict(model, optimizer, options=_FLAT)


def save(state: dict[str, torch.Tensor], directory: str | Path) -> None:
    """Write the tensors of ``state`` (every rank calls this) into ``directory``."""
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    with warnings.catch_warnings():  # DCP's notice that a single process saves without a group
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(
            tensors,
            storage_writer=HuggingFaceStorageWriter(str(directory), save_distributed=True),
            no_dist=not _distributed(),
        )


def load(state: dict[str, torch.Tensor], directory: str | Path) -> None:
    """Fill the tensors of ``state`` in place from ``directory`` (every rank calls this)."""
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():  # DCP's notice that a single process loads without a group
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(directory)), no_dist=not _distributed())
    except CheckpointException as err:  # a BaseException (past `except Exception`): a RuntimeError naming the cause
        why = "; ".join(" ".join(str(exc).split()) for exc, _ in err.failures.values())
        raise RuntimeError(f"{directory}: {why or 'unreadable'}") from None
    state.update(tensors)


def stored_shapes(directory: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> full shape of every tensor stored in ``directory`` (read from the safetensors headers)."""
    meta = HuggingFaceStorageReader(str(directory)).read_metadata()
    return {name: tuple(m.size) for name, m in meta.state_dict_metadata.items()}


def save_model_and_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """``directory/model`` and ``directory/optimizer`` (every rank calls this)."""
    save(model_state(model), directory / "model")
    save(optimizer_state(model, optimizer), directory / "optimizer")


def load_model(model: nn.Module, directory: Path) -> None:
    """Load ``directory`` (a ``model`` folder) into ``model``, whatever its layout."""
    state = model_state(model)
    load(state, directory)
    set_model_state_dict(model, state, options=StateDictOptions(strict=False))  # tied names are absent


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Load ``directory`` (an ``optimizer`` folder) into ``optimizer`` of ``model``."""
    state = optimizer_state(model, optimizer)  # creates the state tensors to fill
    load(state, directory)
    set_optimizer_state_dict(model, optimizer, state, options=_FLAT)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()
