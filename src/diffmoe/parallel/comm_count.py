"""Count the calls and bytes of every collective a piece of code issues on this rank.

    with CommCounter() as comm:
        stepper.step(...)
    comm.counts        # {"all_gather": {"calls": 50, "bytes": 1.2e9}, "reduce_scatter": {...}, ...}
    comm.total_bytes   # int, bytes this rank sent

How it sees them. Every collective of ``torch.distributed`` reaches the dispatcher as an operator, so one
:class:`~torch.utils._python_dispatch.TorchDispatchMode` sees them all, whoever issues them:

- ``torch.ops.c10d.*`` (``allreduce_``, ``_allgather_base_``, ``_reduce_scatter_base_``, ``alltoall_base_``,
  ``broadcast_``, ``barrier``, their list and coalesced forms): every Python c10d call
  (``dist.all_reduce``, ``all_gather_into_tensor``, ``reduce_scatter_tensor``, ``all_to_all_single``, ...),
  what FSDP2 issues (torch 2.13's ``_fsdp_collectives.py`` calls ``dist.all_gather_single`` and
  ``dist.reduce_scatter_single``, not ``all_gather_into_tensor`` / ``reduce_scatter_tensor``, so patching
  the latter would miss them), and what C++ issues without Python (DDP's reducer when no comm hook is
  registered, ``_broadcast_coalesced`` of DDP's buffers);
- ``torch.ops._c10d_functional.*``: functional collectives (``all_to_all_single_autograd``,
  ``all_gather_tensor_autograd``, ``reduce_scatter_tensor_autograd``, DTensor redistribution and
  ``full_tensor``), including the collectives their backward runs (the autograd engine carries the mode
  into backward).

Counting at the dispatcher rather than by patching ``torch.distributed`` attributes means nothing is
counted twice (a functional collective does not re-enter the mode as a c10d op) and nothing depends on
the module path a caller uses. ``wait_tensor`` and ``_wrap_tensor_autograd`` are not collectives and are
ignored; point-to-point ``send``/``recv`` are counted as kind ``send``/``recv`` with their bytes.

Byte convention — the bytes this rank sends, with ring algorithms; ``G`` is the size of the call's
group (so a group of one rank sends nothing):

=================  ==============================================================================
all_reduce         2 (G-1)/G x n, n = bytes of the tensor(s) reduced
all_gather         (G-1)/G x n, n = bytes of the gathered output (= G x the input)
reduce_scatter     (G-1)/G x n, n = bytes of the input (= G x the output)
all_to_all         the input bytes bound for the other ranks (the input minus this rank's own split)
broadcast          (G-1)/G x n (a pipelined ring: the average over the ranks of what each forwards)
reduce             (G-1)/G x n (same ring as broadcast, reversed)
gather / scatter   what leaves this rank: a non-root's input (gather), the root's other chunks (scatter)
send               n; recv: 0
barrier            0 bytes (counted in calls)
=================  ==============================================================================

Units: bytes are integers (float results of the (G-1)/G factor rounded down), per rank.

Limits: eager mode only (under ``torch.compile`` the mode sees the compiled graph's collectives only if
it is active while the graph runs, and a mode active during compilation changes what is traced — start
the counter after warm-up steps). A collective issued on another thread that did not inherit this
thread's dispatch modes (not the autograd engine's, which does) is not seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

KINDS = (
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "all_to_all",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "send",
    "recv",
    "barrier",
)


@dataclass
class _Call:
    """One collective as counted: its kind, the size and rank of its group, and the bytes this rank sends."""

    kind: str
    group_size: int
    bytes: int
    group_name: str = ""


def _nbytes(tensors) -> int:
    """Total bytes of a tensor or a (nested) list of tensors."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    return sum(_nbytes(t) for t in tensors)


def _ring(n: int, g: int, factor: int = 1) -> int:
    """factor x (g-1)/g x n, rounded down."""
    return factor * (g - 1) * n // g


def _own_split_bytes(t: torch.Tensor, splits, rank: int, g: int) -> int:
    """Bytes of this rank's own split of an all-to-all input (rows along dim 0; equal splits if none)."""
    rows = t.shape[0] if t.dim() else 1
    row_bytes = _nbytes(t) // rows if rows else 0
    own_rows = int(splits[rank]) if splits else rows // g
    return own_rows * row_bytes


# ---------------------------------------------------------------------------------------------------
# c10d ops: (kind, bytes) from the arguments, the group being (size, rank)
def _c10d_allreduce(a, g, r):
    return "all_reduce", _ring(_nbytes(a[0]), g, 2)


def _c10d_allgather_base(a, g, r):  # (output, input, pg, ...)
    return "all_gather", _ring(_nbytes(a[0]), g)


def _c10d_allgather_list(a, g, r):  # (outputs [[...]] or [...], inputs, pg, ...)
    return "all_gather", _ring(_nbytes(a[0]), g)


def _c10d_reduce_scatter_base(a, g, r):  # (output, input, pg, op, ...)
    return "reduce_scatter", _ring(_nbytes(a[1]), g)


def _c10d_reduce_scatter_list(a, g, r):  # (outputs, inputs [[...]] or [...], pg, op, ...)
    return "reduce_scatter", _ring(_nbytes(a[1]), g)


def _c10d_alltoall_base(a, g, r):  # (output, input, pg, output_splits, input_splits, ...)
    return "all_to_all", _nbytes(a[1]) - _own_split_bytes(a[1], a[4], r, g)


def _c10d_alltoall(a, g, r):  # (outputs [...], inputs [...], pg, ...)
    return "all_to_all", _nbytes(a[1]) - _nbytes(a[1][r])


def _c10d_broadcast(a, g, r):  # (tensors, pg, root_rank, ...)
    return "broadcast", _ring(_nbytes(a[0]), g)


def _c10d_reduce(a, g, r):  # (tensors, pg, op, root_rank, ...)
    return "reduce", _ring(_nbytes(a[0]), g)


def _c10d_gather(a, g, r):  # (outputs [[...]], inputs, pg, root_rank, ...)
    return "gather", 0 if r == a[3] else _nbytes(a[1])


def _c10d_scatter(a, g, r):  # (outputs, inputs [[...]], pg, root_rank, ...)
    if r != a[3]:
        return "scatter", 0
    chunks = a[1][0] if a[1] and isinstance(a[1][0], (list, tuple)) else a[1]
    return "scatter", sum(_nbytes(c) for i, c in enumerate(chunks) if i != r)


_C10D = {
    "allreduce_": _c10d_allreduce,
    "allreduce_coalesced_": _c10d_allreduce,
    "_allgather_base_": _c10d_allgather_base,
    "allgather_": _c10d_allgather_list,
    "allgather_coalesced_": _c10d_allgather_list,
    "allgather_into_tensor_coalesced_": _c10d_allgather_list,
    "_reduce_scatter_base_": _c10d_reduce_scatter_base,
    "reduce_scatter_": _c10d_reduce_scatter_list,
    "reduce_scatter_tensor_coalesced_": _c10d_reduce_scatter_list,
    "alltoall_base_": _c10d_alltoall_base,
    "alltoall_": _c10d_alltoall,
    "broadcast_": _c10d_broadcast,
    "reduce_": _c10d_reduce,
    "gather_": _c10d_gather,
    "scatter_": _c10d_scatter,
    "send": lambda a, g, r: ("send", _nbytes(a[0])),
    "recv_": lambda a, g, r: ("recv", 0),
    "recv_any_source_": lambda a, g, r: ("recv", 0),
    "barrier": lambda a, g, r: ("barrier", 0),
}


# functional collectives (torch.ops._c10d_functional): group given by name, last positional argument
def _f_all_reduce(a, g, r):  # (input(s), reduce_op, group_name)
    return "all_reduce", _ring(_nbytes(a[0]), g, 2)


def _f_all_gather(a, g, r):  # (input(s), group_size, group_name): output = g x input
    return "all_gather", (g - 1) * _nbytes(a[0])


def _f_reduce_scatter(a, g, r):  # (input(s), reduce_op, group_size, group_name)
    return "reduce_scatter", _ring(_nbytes(a[0]), g)


def _f_all_to_all(a, g, r):  # (input, output_split_sizes, input_split_sizes, group_name)
    return "all_to_all", _nbytes(a[0]) - _own_split_bytes(a[0], a[2], r, g)


def _f_broadcast(a, g, r):  # (input, src, group_name)
    return "broadcast", _ring(_nbytes(a[0]), g)


_FUNCTIONAL = {
    "all_reduce": _f_all_reduce,
    "all_reduce_": _f_all_reduce,
    "all_reduce_coalesced": _f_all_reduce,
    "all_reduce_coalesced_": _f_all_reduce,
    "all_gather_into_tensor": _f_all_gather,
    "all_gather_into_tensor_out": _f_all_gather,
    "all_gather_into_tensor_coalesced": _f_all_gather,
    "reduce_scatter_tensor": _f_reduce_scatter,
    "reduce_scatter_tensor_out": _f_reduce_scatter,
    "reduce_scatter_tensor_coalesced": _f_reduce_scatter,
    "all_to_all_single": _f_all_to_all,
    "broadcast": _f_broadcast,
    "broadcast_": _f_broadcast,
    "isend": lambda a, g, r: ("send", _nbytes(a[0])),
    "irecv": lambda a, g, r: ("recv", 0),
}


def _group_of(func, args, kwargs):
    """The ProcessGroup an op runs on: a ``ProcessGroup`` argument (c10d ops) or a group name
    (functional ops, resolved through the c10d registry)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    for i, arg in enumerate(func._schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        type_str = str(arg.type)
        if "ProcessGroup" in type_str and value is not None:
            return value if isinstance(value, dist.ProcessGroup) else dist.ProcessGroup.unbox(value)
        if arg.name == "group_name" and value is not None:
            return value if isinstance(value, dist.ProcessGroup) else _resolve_process_group(value)
    return None


def _classify(func, args, kwargs) -> _Call | None:
    """The collective ``func`` is, with this rank's bytes, or None when it is not one."""
    namespace, name = func.namespace, func._schema.name.split("::")[-1]
    table = _C10D if namespace == "c10d" else _FUNCTIONAL if namespace == "_c10d_functional" else None
    if table is None or name not in table:
        return None
    group = _group_of(func, args, kwargs)
    size, rank = (group.size(), group.rank()) if group is not None else (1, 0)
    kind, nbytes = table[name](args, size, rank)
    group_name = getattr(group, "group_name", "") if group is not None else ""
    return _Call(kind, size, int(nbytes), group_name)


class CommCounter(TorchDispatchMode):
    """While active (``with CommCounter() as comm:``), counts every collective this rank issues.

    ``counts``: kind -> {"calls": int, "bytes": int} (kinds of :data:`KINDS`, only those seen);
    ``by_group``: group name -> {"size": int, "kinds": {kind -> {"calls", "bytes"}}};
    ``total_bytes`` / ``total_calls``: over all kinds. With ``record=True`` every call is also kept in
    ``calls`` as (kind, group size, bytes). Entering the counter again accumulates; :meth:`reset` clears.
    See the module docstring for what is counted and the byte convention.
    """

    def __init__(self, record: bool = False):
        super().__init__()
        self.record = record
        self.counts: dict[str, dict[str, int]] = {}
        self.by_group: dict[str, dict] = {}
        self.calls: list[tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        call = _classify(func, args, kwargs)
        if call is not None:
            self._add(call)
        return func(*args, **kwargs)

    def _add(self, call: _Call) -> None:
        group = self.by_group.setdefault(call.group_name, {"size": call.group_size, "kinds": {}})
        for table in (self.counts, group["kinds"]):
            entry = table.setdefault(call.kind, {"calls": 0, "bytes": 0})
            entry["calls"] += 1
            entry["bytes"] += call.bytes
        if self.record:
            self.calls.append((call.kind, call.group_size, call.bytes))

    @property
    def total_bytes(self) -> int:
        return sum(v["bytes"] for v in self.counts.values())

    @property
    def total_calls(self) -> int:
        return sum(v["calls"] for v in self.counts.values())

    def reset(self) -> None:
        self.counts.clear()
        self.by_group.clear()
        self.calls.clear()

    def as_dict(self) -> dict:
        """Plain dicts for JSON: ``{"counts", "by_group", "total_bytes", "total_calls"}``."""
        return {
            "counts": {k: dict(v) for k, v in self.counts.items()},
            "by_group": {
                name: {"size": g["size"], "kinds": {k: dict(v) for k, v in g["kinds"].items()}}
                for name, g in self.by_group.items()
            },
            "total_bytes": self.total_bytes,
            "total_calls": self.total_calls,
        }
