"""Process set-up for compute commands on CPU: keep freed memory for reuse (glibc).

By default glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and unmaps it on free, so a CPU training step page-faults, and the kernel zeroes, its large
temporaries again at every step: MoE layers allocate several (gathered tokens [k N, d], merged
experts, their gradients). On the reference machine a fresh 64 MiB ``index_select`` took 38 ms against
4.6 ms into a reused buffer. With mmap disabled and trimming off, freed blocks stay in the heap and
are reused, as CUDA's caching allocator reuses them; the price is that memory returns to the OS only
when the process ends. ``diffmoe train | eval | generate | demo | bench`` call
:func:`reuse_freed_memory` at start; ``DIFFMOE_MALLOC=default`` keeps glibc's behaviour.

A script that imports the layers without that switch still avoids the cost for Lory's merged experts,
its largest temporaries: the merge kernel takes them from :func:`scratch`, which keeps one CPU buffer
per name and hands the same memory out again at the next call (in forward and in backward).
"""

from __future__ import annotations

import ctypes
import math
import os
import threading

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
_state = {"malloc": "default"}


def reuse_freed_memory() -> bool:
    """Disable glibc's mmap for allocations and its heap trimming. Returns whether it took effect
    (False outside glibc, or with DIFFMOE_MALLOC=default)."""
    if os.environ.get("DIFFMOE_MALLOC", "reuse") == "default":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return False
    if ok:
        _state["malloc"] = "reuse"
    return bool(ok)


def malloc_mode() -> str:
    """``reuse`` after :func:`reuse_freed_memory` took effect, else ``default`` (for benchmark records)."""
    return _state["malloc"]


_scratch = threading.local()


def scratch(name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` in ``like``'s dtype and device, for a temporary that never
    leaves the call asking for it (neither returned nor saved for backward).

    On CPU the memory is kept and handed out again: one buffer per (thread, ``name``, dtype), grown to
    the largest size asked for and never per shape, so a model's layers share it and memory stays
    bounded by the largest request. Two tensors in use at the same time need two names. Elsewhere
    (CUDA's caching allocator already reuses memory) and while compiling, a fresh tensor.
    """
    if like.device.type != "cpu" or torch.compiler.is_compiling():
        return like.new_empty(shape)
    pool = _scratch.__dict__.setdefault("pool", {})
    n = math.prod(shape)
    buf = pool.get((name, like.dtype))
    if buf is None or buf.numel() < n:
        pool.pop((name, like.dtype), None)  # free the smaller one first
        with torch.inference_mode(False):  # a buffer first asked for under inference_mode serves training too
            buf = pool[(name, like.dtype)] = torch.empty(n, dtype=like.dtype, device="cpu")
    return buf[:n].view(shape)


def scratch_bytes() -> int:
    """Bytes held by this thread's :func:`scratch` buffers."""
    return sum(b.numel() * b.element_size() for b in _scratch.__dict__.get("pool", {}).values())


def release_scratch() -> None:
    """Free this thread's :func:`scratch` buffers (the next request allocates again)."""
    _scratch.__dict__.pop("pool", None)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an op on ``x`` computes in: autocast's for ``x``'s device when autocast is on there, else
    ``x``'s own. The custom kernels (dispatch, merge, the chunked loss, the expert-parallel exchanges) cast
    to it explicitly and run with autocast off."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
