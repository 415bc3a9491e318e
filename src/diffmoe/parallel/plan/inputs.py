"""What the planner is given: the cluster, the step's workload, and the bytes per element they imply.
Also the units and constants every part of the plan shares."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ...config import ConfigError, RunConfig
from ..layout import Layout

GiB = 2**30
GB = 1e9
MODES = ("none", "block")
"""Activation checkpointing modes: none, or per transformer block."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

DEFAULT_INTRA_GBPS = 150.0
"""Per-GPU bus bandwidth inside a node (GB/s): NVLink, as NCCL achieves on A100/H100 nodes."""
DEFAULT_INTER_GBPS = 25.0
"""Per-GPU bus bandwidth across nodes (GB/s): one 200 Gb/s InfiniBand NIC per GPU."""
DEFAULT_RESERVE_GIB = 4.0
"""CUDA context, NCCL buffers and allocator fragmentation (GiB), added to every layout."""


@dataclass(frozen=True)
class Cluster:
    """The machines: ``gpus`` GPUs of ``gpu_mem_gib`` GiB, ``gpus_per_node`` per node, and the per-GPU
    bandwidths (GB/s) inside a node and across nodes."""

    gpus: int
    gpu_mem_gib: float
    gpus_per_node: int = 8
    intra_gbps: float = DEFAULT_INTRA_GBPS
    inter_gbps: float = DEFAULT_INTER_GBPS
    reserve_gib: float = DEFAULT_RESERVE_GIB

    def __post_init__(self) -> None:
        _positive_int("--gpus", self.gpus)
        _positive_int("--gpus-per-node", self.gpus_per_node)
        for flag, value in (
            ("--gpu-mem", self.gpu_mem_gib),
            ("--intra-bw", self.intra_gbps),
            ("--inter-bw", self.inter_gbps),
        ):
            if not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"invalid {flag}={value!r}: must be a positive number")
        if not (isinstance(self.reserve_gib, (int, float)) and self.reserve_gib >= 0):
            raise ConfigError(f"invalid --reserve={self.reserve_gib!r}: must be a number >= 0")
        if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            raise ConfigError(
                f"invalid --gpus={self.gpus}: a multi-node job needs a multiple of --gpus-per-node={self.gpus_per_node}"
            )


def _positive_int(flag: str, value) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ConfigError(f"invalid {flag}={value!r}: must be a positive integer")


@dataclass(frozen=True)
class Workload:
    """What one optimizer step processes and in which dtypes.

    seq_len L: tokens per sequence; global_batch: sequences per step (all ranks); micro_batch:
    sequences per forward on one rank; accum: micro-batches per step on each rank; bf16: activations in
    bfloat16; param_dtype / reduce_dtype: FSDP's compute and gradient-reduction dtypes.
    """

    seq_len: int
    global_batch: int
    micro_batch: int
    accum: int
    bf16: bool
    param_dtype: str = "float32"
    reduce_dtype: str = "float32"

    @property
    def tokens(self) -> int:
        """b: tokens per rank per micro-batch."""
        return self.micro_batch * self.seq_len

    @property
    def act_bytes(self) -> int:
        return 2 if self.bf16 else 4


def workload(cfg: RunConfig, gpus: int, seq_len: int | None = None, micro_batch: int | None = None) -> Workload:
    """The step of ``cfg`` on ``gpus`` ranks; errors (a batch that does not split) are ConfigErrors."""
    d, t = cfg.data, cfg.train
    L = seq_len or _dataset_context_len(d.primary_path) or cfg.model.max_seq_len
    _positive_int("--seq-len", L)
    batch = d.batch_size
    micro = micro_batch or getattr(d, "micro_batch_size", None)
    if micro is None:
        if batch % gpus:
            raise ConfigError(
                f"invalid config: data.batch_size={batch}: must be divisible by the {gpus} GPUs "
                "(or set data.micro_batch_size)"
            )
        micro = batch // gpus
    if batch % (micro * gpus):
        raise ConfigError(
            f"invalid config: data.batch_size={batch}: must be a multiple of data.micro_batch_size "
            f"x GPUs = {micro} x {gpus}"
        )
    parallel = getattr(t, "parallel", None)
    param, reduce = (
        parallel.dtypes(t.bf16) if parallel is not None else ("bfloat16" if t.bf16 else "float32", "float32")
    )
    return Workload(L, batch, micro, batch // (micro * gpus), t.bf16, param, reduce)


def _dataset_context_len(path: str) -> int | None:
    """The context length of a prepared dataset at ``path`` (its manifest), or None."""
    try:
        return int(json.loads((Path(path) / "manifest.json").read_text(encoding="utf-8"))["context_len"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class Precision:
    """Bytes per element: act (activations), resid (residual stream), compute (FSDP's unsharded
    parameters, or DDP's autocast weight copies; 0 when there are none), reduce (gradient reduction)."""

    act: int
    resid: int
    compute: int
    reduce: int

    @classmethod
    def of(cls, layout: Layout, w: Workload) -> "Precision":
        a = w.act_bytes
        if layout.mode == "ddp":
            return cls(a, 4, 2 if w.bf16 else 0, 4)
        p = DTYPE_BYTES[w.param_dtype]
        return cls(a, p, p, DTYPE_BYTES[w.reduce_dtype])
