"""Dedup and ordering over the whole corpus: each document's status, exact and near-duplicate removal,
the training order (the In-Context Pretraining greedy walk, or a seeded shuffle) and the held-out order.

The graph functions take a k-nearest-neighbour graph as a table ``nbr`` (int64 [n, k], -1 for none) with
the similarity of each edge in ``sim`` (float32 [n, k]), or as edge arrays (``a[e]``, ``b[e]``,
``sim[e]``). Edges are undirected: ``b`` is a neighbour of ``a`` and ``a`` one of ``b``. Memory and time
are O(n k).
"""

from __future__ import annotations

import numpy as np

# Document status codes (documents.jsonl "split").
TRAIN, HELDOUT, EXACT_DUP, NEAR_DUP = 0, 1, 2, 3
STATUS_NAMES = ("train", "heldout", "exact_duplicate", "near_duplicate")


def exact_duplicates(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(status int8 [n], duplicate_of int64 [n]): every copy but the first of a text is a duplicate."""
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    first_of = first[inverse.ravel()]
    status = np.where(first_of == np.arange(len(keys)), TRAIN, EXACT_DUP).astype(np.int8)
    return status, np.where(status == EXACT_DUP, first_of, -1)


def edges(nbr: np.ndarray, sim: np.ndarray, rows: slice | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The graph table's edges (a, b, sim), without -1 entries (of rows ``rows`` only, when given)."""
    if rows is not None:
        first = rows.start or 0
        nbr, sim = nbr[rows], sim[rows]
    else:
        first = 0
    a = np.repeat(np.arange(first, first + len(nbr), dtype=np.int64), nbr.shape[1])
    b, s = nbr.ravel(), sim.ravel()
    keep = b >= 0
    return a[keep], b[keep].astype(np.int64), s[keep].astype(np.float32)


def remove_near_duplicates(
    docs: np.ndarray, nbr: np.ndarray, sim: np.ndarray, status: np.ndarray, duplicate_of: np.ndarray, threshold: float
) -> None:
    """Mark near-duplicates among ``docs`` (the documents the graph's rows are, int64 [n]) in ``status`` and
    ``duplicate_of`` (indexed by document), keeping one per group — a held-out one when the group has one."""
    a, b, s = edges(nbr, sim)
    groups = near_duplicate_groups(len(docs), a, b, s, threshold)
    keep = keep_one_per_group(groups, status[docs] == HELDOUT)
    kept_of_group = np.full(len(docs), -1, dtype=np.int64)
    kept_of_group[groups[keep]] = np.flatnonzero(keep)
    status[docs[~keep]] = NEAR_DUP
    duplicate_of[docs[~keep]] = docs[kept_of_group[groups[~keep]]]


def walk(
    docs: np.ndarray,
    nbr: np.ndarray,
    sim: np.ndarray,
    status: np.ndarray,
    max_chain_docs: int | None,
    chunks: list[slice] | None = None,
) -> np.ndarray:
    """The training documents among ``docs`` (the graph's rows) in walk order: int64 [n_train] of document
    indices. With ``chunks`` (row ranges whose edges stay inside), each chunk is walked on its own, in order."""
    out = []
    for rows in chunks or [slice(0, len(docs))]:
        a, b, s = edges(nbr, sim, rows)
        first = rows.start or 0
        local = np.flatnonzero(status[docs[rows]] == TRAIN)
        position = np.full(len(docs[rows]), -1, dtype=np.int64)
        position[local] = np.arange(len(local))
        inside = (b >= first) & (b < first + len(position))  # chunks: only edges inside the chunk
        a, b, s = position[a[inside] - first], position[b[inside] - first], s[inside]
        keep = (a >= 0) & (b >= 0)
        order = similarity_walk(len(local), a[keep], b[keep], s[keep], max_chain_docs)
        out.append(docs[rows][local[order]])
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def shuffled(indices: np.ndarray, seed: int) -> np.ndarray:
    """The random-batching control: a seeded shuffle of the training documents."""
    return np.random.default_rng(np.random.SeedSequence([seed, 0])).permutation(indices)


def order_heldout(domain_ids: np.ndarray, status: np.ndarray, domains: int, seed: int) -> np.ndarray:
    """Held-out documents grouped by domain (domain id order), shuffled within each domain."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    held = status == HELDOUT
    parts = [rng.permutation(np.flatnonzero(held & (domain_ids == d))) for d in range(domains)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def near_duplicate_groups(n: int, a: np.ndarray, b: np.ndarray, sim: np.ndarray, threshold: float) -> np.ndarray:
    """Group documents joined by edges of similarity >= ``threshold`` (connected components).

    Returns int64 [n]: each document's group label, the smallest document index in its group; a
    document without such an edge is its own group.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    close = sim >= threshold
    graph = coo_matrix((np.ones(int(close.sum()), dtype=np.int8), (a[close], b[close])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    smallest = np.full(labels.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(smallest, labels, np.arange(n, dtype=np.int64))
    return smallest[labels]


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


def similarity_walk(
    n: int, a: np.ndarray, b: np.ndarray, sim: np.ndarray, max_chain_docs: int | None = None
) -> np.ndarray:
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
            candidates = nbr[indptr[current] : indptr[current + 1]]
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
