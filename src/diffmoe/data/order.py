"""Document ordering: near-duplicate removal and the In-Context Pretraining greedy walk.

Both work on a k-nearest-neighbour graph given as edge arrays (``a[e]``, ``b[e]``, ``sim[e]``): the
pair of documents ``a[e]`` and ``b[e]`` with cosine similarity ``sim[e]``. Edges are undirected here:
``b`` is a neighbour of ``a`` and ``a`` one of ``b``.
"""

from __future__ import annotations

import numpy as np


def near_duplicate_groups(n: int, a: np.ndarray, b: np.ndarray, sim: np.ndarray, threshold: float) -> np.ndarray:
    """Group documents joined by edges of similarity >= ``threshold`` (connected components).

    Returns int64 [n]: each document's group label, the smallest document index in its group; a
    document without such an edge is its own group.
    """
    parent = np.arange(n, dtype=np.int64)

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:  # path compression
            parent[i], i = root, parent[i]
        return root

    close = sim >= threshold
    for i, j in zip(a[close].tolist(), b[close].tolist()):
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return np.array([find(i) for i in range(n)], dtype=np.int64)


def keep_one_per_group(groups: np.ndarray, preferred: np.ndarray) -> np.ndarray:
    """bool [n]: the document kept in each near-duplicate group.

    The kept one is the first (lowest index) ``preferred`` member when the group has one, else the
    group's first member. Preferring held-out documents keeps every near-duplicate of a held-out
    document out of training.
    """
    n = len(groups)
    # Sort by (group, not preferred, index): the first row of each group is the one to keep.
    order = np.lexsort((np.arange(n), ~preferred, groups))
    first = np.ones(n, dtype=bool)
    first[1:] = groups[order][1:] != groups[order][:-1]
    keep = np.zeros(n, dtype=bool)
    keep[order[first]] = True
    return keep


def similarity_walk(n: int, a: np.ndarray, b: np.ndarray, sim: np.ndarray,
                    max_chain_docs: int | None = None) -> np.ndarray:
    """Order ``n`` documents by the greedy walk of In-Context Pretraining (Shi et al. 2023).

    Start at an unvisited document of minimum degree, step to its most similar unvisited neighbour,
    and when there is none (or the chain holds ``max_chain_docs``), jump to the next unvisited
    minimum-degree document. Degree is the number of distinct neighbours in the undirected graph;
    ties go to the smaller index. Returns int64 [n], a permutation: every document exactly once.
    """
    indptr, nbr = _adjacency(n, a, b, sim)
    degree = np.diff(indptr)
    starts = np.lexsort((np.arange(n), degree))
    visited = np.zeros(n, dtype=bool)
    order = np.empty(n, dtype=np.int64)
    filled, next_start = 0, 0
    while filled < n:
        while visited[starts[next_start]]:
            next_start += 1
        current, chain = int(starts[next_start]), 1
        while True:
            visited[current] = True
            order[filled] = current
            filled += 1
            if max_chain_docs is not None and chain >= max_chain_docs:
                break
            candidates = nbr[indptr[current]:indptr[current + 1]]
            free = np.flatnonzero(~visited[candidates])
            if len(free) == 0:
                break
            current, chain = int(candidates[free[0]]), chain + 1
    return order


def _adjacency(n: int, a: np.ndarray, b: np.ndarray, sim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Undirected neighbour lists in CSR form, each sorted by similarity (highest first), then index.

    Returns (indptr int64 [n + 1], neighbours int64 [edges]); self-loops and repeated pairs dropped.
    """
    src = np.concatenate([a, b]).astype(np.int64)
    dst = np.concatenate([b, a]).astype(np.int64)
    w = np.concatenate([sim, sim]).astype(np.float64)
    mask = src != dst
    src, dst, w = src[mask], dst[mask], w[mask]
    order = np.lexsort((dst, -w, src))
    src, dst = src[order], dst[order]
    # Drop repeated (src, dst) pairs, keeping the first (= most similar) occurrence.
    pair_order = np.lexsort((dst, src))
    pairs = np.stack([src[pair_order], dst[pair_order]], axis=1)
    repeated = np.zeros(len(pairs), dtype=bool)
    repeated[1:] = (pairs[1:] == pairs[:-1]).all(axis=1)
    keep = np.ones(len(src), dtype=bool)
    keep[pair_order[repeated]] = False
    # pair_order is a stable sort, so among equal pairs the first kept is the earliest in `order`.
    src, dst = src[keep], dst[keep]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(src, minlength=n), out=indptr[1:])
    return indptr, dst
