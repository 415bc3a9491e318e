"""Packing: documents in order, each followed by the end-of-document token, cut into fixed rows.

The packed stream of a split is never written whole: :func:`plan` places every document in it
(global offsets from a cumulative sum), and :func:`assemble_rows` builds any set of its rows straight
from the documents' token ids, so output shards are written in parallel, each by its own task.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tokens import DocumentTable


@dataclass
class PackPlan:
    """Where one split's documents sit in its packed stream.

    order: int64 [docs], document indices in stream order; starts: int64 [docs], where each begins;
    sizes: int64 [docs], its tokens plus the separator; rows: whole rows of ``row_len`` tokens; the
    ``dropped_tail_tokens`` after them fill no whole row.
    """

    order: np.ndarray
    starts: np.ndarray
    sizes: np.ndarray
    rows: int
    row_len: int

    @property
    def tokens(self) -> int:
        return int(self.sizes.sum())

    @property
    def dropped_tail_tokens(self) -> int:
        return self.tokens - self.rows * self.row_len


def plan(lengths: np.ndarray, order: np.ndarray, row_len: int) -> PackPlan:
    """Place documents ``order`` (int64 [n], indices into ``lengths``) one after another, each with its separator."""
    sizes = np.asarray(lengths[order], dtype=np.int64) + 1
    starts = np.zeros(len(order), dtype=np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    return PackPlan(np.asarray(order, dtype=np.int64), starts, sizes, int(sizes.sum()) // row_len, row_len)


def assemble_rows(
    table: DocumentTable, plan: PackPlan, stream_rows: np.ndarray, eod_id: int, dtype: np.dtype
) -> np.ndarray:
    """Rows ``stream_rows`` (int64 [m]) of the packed stream: [m, row_len] in ``dtype``."""
    L = plan.row_len
    out = np.empty((len(stream_rows), L), dtype=dtype)
    for i, r in enumerate(stream_rows.tolist()):
        lo, hi = r * L, (r + 1) * L
        j = int(np.searchsorted(plan.starts, lo, side="right")) - 1
        row = out[i]
        while j < len(plan.starts) and plan.starts[j] < hi:
            start, size = int(plan.starts[j]), int(plan.sizes[j])
            a, b = max(lo, start), min(hi, start + size)  # the part of this document (and separator) in the row
            text_end = min(b, start + size - 1)
            if a < text_end:
                row[a - lo : text_end - lo] = table.doc_slice(int(plan.order[j]), a - start, text_end - start)
            if b == start + size:
                row[b - 1 - lo] = eod_id
            j += 1
    return out


def domain_tokens(plan: PackPlan, domain_ids: np.ndarray, num_domains: int) -> np.ndarray:
    """uint32 [rows, num_domains], tokens of each domain in each row (a separator counts for the document it
    ends), from the documents' stream spans, without a per-token array.

    Tokens of domain d before stream position x = (sizes of earlier documents of d) + (the part of the
    document containing x that lies before x, if it is of domain d).
    """
    num_rows, row_len, starts, sizes = plan.rows, plan.row_len, plan.starts, plan.sizes
    domains = np.asarray(domain_ids[plan.order])
    out = np.zeros((num_rows, num_domains), dtype=np.uint32)
    if num_rows == 0:
        return out
    bounds = np.arange(num_rows + 1, dtype=np.int64) * row_len
    holder = np.searchsorted(starts, bounds, side="right") - 1
    partial = np.minimum(bounds - starts[holder], sizes[holder])
    for d in range(num_domains):
        before = np.concatenate([[0], np.cumsum(np.where(domains == d, sizes, 0))])
        cumulative = before[holder] + np.where(domains[holder] == d, partial, 0)
        out[:, d] = np.diff(cumulative)
    return out
