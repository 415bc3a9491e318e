"""Process set-up for compute commands on CPU: keep freed memory for reuse (glibc).

By default glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and unmaps it on free, so a CPU training step page-faults, and the kernel zeroes, its large
temporaries again at every step: MoE layers allocate several (gathered tokens [k N, d], merged
experts, their gradients). On the reference machine a fresh 64 MiB ``index_select`` took 38 ms against
4.6 ms into a reused buffer. With mmap disabled and trimming off, freed blocks stay in the heap and
are reused, as CUDA's caching allocator reuses them; the price is that memory returns to the OS only
when the process ends. ``diffmoe train | eval | generate | demo | bench`` call
:func:`reuse_freed_memory` at start; ``DIFFMOE_MALLOC=default`` keeps glibc's behaviour.
"""

from __future__ import annotations

import ctypes
import os

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
