"""Packing: documents in order, each followed by the end-of-document token, cut into fixed rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .ingest import TokenStore


@dataclass
class Packed:
    """One split's packed stream.

    stream: [total_tokens] in the dataset dtype (memory-mapped): the documents of ``order`` each
    followed by ``eod_id``. rows: [num_rows, row_len], a view of the stream's first
    ``num_rows * row_len`` tokens; the ``dropped_tail_tokens`` after them fill no whole row.
    doc_starts: int64 [len(order)], where each document starts in the stream.
    domain_tokens: uint32 [num_rows, num_domains], tokens of each domain in each row (a separator
    counts for the document it ends).
    """

    stream: np.ndarray
    rows: np.ndarray
    doc_starts: np.ndarray
    domain_tokens: np.ndarray
    dropped_tail_tokens: int


def pack(store: TokenStore, order: np.ndarray, eod_id: int, row_len: int, dtype: np.dtype, path: Path) -> Packed:
    """Concatenate documents ``order`` (int64 [n], indices into ``store``) into a stream file at ``path``."""
    sizes = store.lengths[order] + 1
    doc_starts = np.zeros(len(order), dtype=np.int64)
    np.cumsum(sizes[:-1], out=doc_starts[1:])
    total = int(sizes.sum())
    stream = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(max(total, 1),))[:total]
    for doc, start, size in zip(order.tolist(), doc_starts.tolist(), sizes.tolist()):
        stream[start:start + size - 1] = store.doc(doc)
        stream[start + size - 1] = eod_id
    num_rows = total // row_len
    rows = stream[:num_rows * row_len].reshape(num_rows, row_len)
    domain_tokens = _domain_tokens(doc_starts, sizes, store.domain_ids[order], len(store.domains),
                                   num_rows, row_len)
    return Packed(stream, rows, doc_starts, domain_tokens, total - num_rows * row_len)


def _domain_tokens(starts: np.ndarray, sizes: np.ndarray, domains: np.ndarray, num_domains: int,
                   num_rows: int, row_len: int) -> np.ndarray:
    """uint32 [num_rows, num_domains] from the documents' stream spans, without a per-token array.

    Tokens of domain d before stream position x = (sizes of earlier documents of d) + (the part of the
    document containing x that lies before x, if it is of domain d).
    """
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
