"""Dedup and ordering: each document's status, exact and near-duplicate removal, the training order
(the In-Context Pretraining greedy walk, or a seeded shuffle) and the held-out order.

The graph functions work on a k-nearest-neighbour graph given as edge arrays (``a[e]``, ``b[e]``,
``sim[e]``): the pair of documents ``a[e]`` and ``b[e]`` with cosine similarity ``sim[e]``. Edges are
undirected here: ``b`` is a neighbour of ``a`` and ``a`` one of ``b``.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from ..report import say
from .config import PrepareConfig
from .embed import MINILM_MAX_TOKENS, Embedding, minilm_embedding, tfidf_embedding
from .ingest import TokenStore
from .knn import nearest_neighbours, resolve_backend
from .tokenizer import vocab_size

# Document status codes (documents.jsonl "split").
TRAIN, HELDOUT, EXACT_DUP, NEAR_DUP = 0, 1, 2, 3
STATUS_NAMES = ("train", "heldout", "exact_duplicate", "near_duplicate")


def exact_duplicates(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(status int8 [n], duplicate_of int64 [n]): every copy but the first of a text is a duplicate."""
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    first_of = first[inverse.ravel()]
    status = np.where(first_of == np.arange(len(keys)), TRAIN, EXACT_DUP).astype(np.int8)
    return status, np.where(status == EXACT_DUP, first_of, -1)


def order_training(store: TokenStore, status: np.ndarray, duplicate_of: np.ndarray, tokenizer: Tokenizer,
                   config: PrepareConfig, verbose: bool) -> tuple[np.ndarray, str | None]:
    """Drop near-duplicates (updating ``status`` / ``duplicate_of`` in place) and order the training
    documents. Returns (train order int64 [n_train], the kNN backend used or None)."""
    ordering = config.ordering
    similarity = ordering.batching == "similarity"
    if not similarity and ordering.dedup_threshold is None:
        train = np.flatnonzero(status == TRAIN)
        return _shuffled(train, config.seed), None
    backend = resolve_backend(ordering.knn_backend)
    candidates = np.flatnonzero(status != EXACT_DUP)
    walked = []
    for start in range(0, len(candidates), ordering.chunk_docs):
        idx = candidates[start:start + ordering.chunk_docs]
        embedding = _embed(store, idx, tokenizer, config)
        neighbours = nearest_neighbours(embedding.vectors, ordering.knn_k, backend)
        a = np.repeat(np.arange(len(idx)), neighbours.shape[1])
        b = neighbours.ravel()
        sim = embedding.pair_similarity(a, b)
        if ordering.dedup_threshold is not None:
            groups = near_duplicate_groups(len(idx), a, b, sim, ordering.dedup_threshold)
            keep = keep_one_per_group(groups, status[idx] == HELDOUT)
            kept_of_group = np.full(len(idx), -1, dtype=np.int64)
            kept_of_group[groups[keep]] = np.flatnonzero(keep)
            status[idx[~keep]] = NEAR_DUP
            duplicate_of[idx[~keep]] = idx[kept_of_group[groups[~keep]]]
        if similarity:
            local = np.flatnonzero(status[idx] == TRAIN)
            position = np.full(len(idx), -1, dtype=np.int64)
            position[local] = np.arange(len(local))
            edge = (position[a] >= 0) & (position[b] >= 0)
            walk = similarity_walk(len(local), position[a[edge]], position[b[edge]], sim[edge],
                                   ordering.max_chain_docs)
            walked.append(idx[local[walk]])
        say(f"compared documents {start}-{start + len(idx)} of {len(candidates)} with their neighbours", verbose)
    if similarity:
        return np.concatenate(walked), backend
    return _shuffled(np.flatnonzero(status == TRAIN), config.seed), backend


def _embed(store: TokenStore, idx: np.ndarray, tokenizer: Tokenizer, config: PrepareConfig) -> Embedding:
    ordering = config.ordering
    if ordering.embedding == "tfidf":
        return tfidf_embedding([store.doc(i) for i in idx], vocab_size(tokenizer), ordering.lsa_dims, config.seed)
    texts = tokenizer.decode_batch([store.doc(i)[:MINILM_MAX_TOKENS].tolist() for i in idx])
    return minilm_embedding(texts)


def _shuffled(indices: np.ndarray, seed: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence([seed, 0])).permutation(indices)


def order_heldout(store: TokenStore, status: np.ndarray, seed: int) -> np.ndarray:
    """Held-out documents grouped by domain (domain id order), shuffled within each domain."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    held = status == HELDOUT
    parts = [rng.permutation(np.flatnonzero(held & (store.domain_ids == d))) for d in range(len(store.domains))]
    return np.concatenate(parts).astype(np.int64)


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
