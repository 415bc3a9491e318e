"""k nearest neighbours of every document over the whole corpus, by cosine (inner product of
L2-normalised vectors): exact search below a size threshold, faiss IVF above it.

Index choice (``index="auto"``; ``n`` vectors of ``d`` dimensions):

- ``n <= exact_max_docs`` (default 50,000): ``exact``, faiss ``IndexFlatIP`` (scikit-learn's brute force
  without faiss), queried in blocks;
- else ``ivf-flat``: ``IVF{K},Flat`` with ``K`` the power of two nearest ``4 sqrt(n)`` (16 to 65,536),
  trained on a seeded sample of ``max(39 K, 20,000)`` vectors (at most ``n``; faiss' k-means warns below
  39 per centroid);
- ``ivf-pq`` instead when the flat codes (``4 n d`` bytes) would exceed ``memory_gb``: ``IVF{K},PQ{d/8}``,
  each query's ``10 k`` candidates then re-ranked by the exact inner product of their stored vectors (read
  from the memory-mapped vectors: keep them on fast local disk).

``nprobe`` (lists scanned per query) is tuned when not given: starting from 8 it doubles until recall@k
against exact search, measured on a seeded sample of ``recall_queries`` queries, reaches
``recall_target`` (or ``nprobe = K``). The recall of the setting used is returned, for the manifest.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

KNN_BACKENDS = ("auto", "faiss", "sklearn")
KNN_INDEXES = ("auto", "exact", "ivf-flat", "ivf-pq")
_QUERY_BLOCK = 32768
_FIRST_NPROBE = 8
_RERANK = 10
"""ivf-pq: candidates per neighbour re-ranked exactly (PQ codes alone mis-rank close vectors)."""


@dataclass
class SearchOptions:
    """How neighbours are searched (the ``knn_*`` fields of :class:`~diffmoe.data.OrderingConfig`)."""

    k: int = 10
    index: str = "auto"
    backend: str = "auto"
    exact_max_docs: int = 50_000
    nprobe: int | None = None
    recall_target: float = 0.9
    recall_queries: int = 1000
    memory_gb: float = 16.0
    seed: int = 0


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``faiss`` when it imports, else ``sklearn``; an explicit choice must be installed."""
    if backend not in KNN_BACKENDS:
        raise DataError(f"invalid knn_backend={backend!r}: choose one of {', '.join(KNN_BACKENDS)}")
    if backend in ("auto", "faiss"):
        try:
            import faiss  # noqa: F401

            return "faiss"
        except ImportError:
            if backend == "faiss":
                raise DataError("knn_backend 'faiss' needs the package faiss-cpu: pip install faiss-cpu") from None
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise DataError(
            "similarity ordering needs faiss-cpu or scikit-learn: pip install faiss-cpu "
            "(or pip install 'diffmoe[data]')"
        ) from None
    return "sklearn"


def choose_index(n: int, d: int, options: SearchOptions) -> str:
    if options.index != "auto":
        return options.index
    if n <= options.exact_max_docs:
        return "exact"
    return "ivf-flat" if 4.0 * n * d <= options.memory_gb * 1e9 else "ivf-pq"


def nlist_for(n: int) -> int:
    """Inverted lists of an IVF index over ``n`` vectors: the power of two nearest 4 sqrt(n), in [16, 65536]."""
    return int(min(max(2 ** round(math.log2(4 * math.sqrt(max(n, 1)))), 16), 65536))


def search(
    vectors: np.ndarray,
    options: SearchOptions,
    out: np.ndarray,
    progress: Callable[[int], None] | None = None,
    start_block: int = 0,
    block_done: Callable[[int], None] | None = None,
) -> dict:
    """Fill ``out`` (int64 [n, k'], k' = min(k, n - 1)) with each row's nearest other rows, most similar
    first (-1 where fewer were found). ``vectors``: float32 [n, d], rows L2-normalised (may be memory-mapped).

    Queries run in blocks of 32768; ``block_done(b)`` is called after block ``b`` is written (so a caller
    can checkpoint) and the search starts at ``start_block``. Returns a description for the manifest:
    index, backend, k, and for IVF nlist, nprobe and the measured recall.
    """
    n, d = vectors.shape
    k = out.shape[1]
    kind = choose_index(n, d, options)
    backend = resolve_backend(options.backend)
    info: dict = {"index": kind, "k": k, "documents": n}
    if k == 0:
        return info
    if kind == "exact":
        info["backend"] = backend
        query = _exact_searcher(vectors, k, backend)
    else:
        if backend != "faiss":
            raise DataError(f"knn index {kind!r} needs faiss: pip install faiss-cpu")
        info["backend"] = "faiss"
        index, searcher = _ivf(vectors, kind, options)
        info.update(searcher.describe())
        query = searcher.query
    blocks = range(0, n, _QUERY_BLOCK)
    for b, start in enumerate(blocks):
        if b < start_block:
            continue
        stop = min(start + _QUERY_BLOCK, n)
        out[start:stop] = query(np.ascontiguousarray(vectors[start:stop], dtype=np.float32), np.arange(start, stop))
        if block_done is not None:
            block_done(b + 1)
        if progress is not None:
            progress(stop)
    return info


def nearest_neighbours(vectors: np.ndarray, k: int, backend: str = "auto") -> np.ndarray:
    """Exact search: each row's ``k`` most similar other rows, most similar first (int64 [n, min(k, n - 1)];
    a row never lists itself, exact duplicates of it may appear)."""
    n = len(vectors)
    out = np.full((n, max(min(k, n - 1), 0)), -1, dtype=np.int64)
    search(vectors, SearchOptions(k=out.shape[1], index="exact", backend=backend), out)
    return out


def _drop_self(found: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Rows of ``found`` (int64 [m, >= k + 1], the results of queries that are base rows ``rows``) without
    the query itself, cut to ``k`` (padded with -1)."""
    not_self = (found != rows[:, None]) & (found >= 0)
    keep = not_self & (np.cumsum(not_self, axis=1) <= k)
    out = np.full((len(found), k), -1, dtype=np.int64)
    counts = keep.sum(axis=1)
    out[np.arange(k)[None, :] < counts[:, None]] = found[keep]
    return out


def _exact_searcher(vectors: np.ndarray, k: int, backend: str):
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        return lambda q, rows: _drop_self(index.search(q, k + 1)[1].astype(np.int64), rows, k)
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute", metric="euclidean").fit(x)
    return lambda q, rows: _drop_self(np.asarray(nn.kneighbors(q, return_distance=False), np.int64), rows, k)


class _IvfSearcher:
    def __init__(self, index, vectors: np.ndarray, k: int, kind: str, nlist: int, train: int):
        self.index, self.vectors, self.k, self.kind, self.nlist, self.train = index, vectors, k, kind, nlist, train
        self.nprobe, self.recall, self.recall_queries = 1, None, 0

    def describe(self) -> dict:
        return {
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "train_vectors": self.train,
            "recall_at_k": None if self.recall is None else round(self.recall, 4),
            "recall_queries": self.recall_queries,
            **({"rerank_candidates": _RERANK * self.k} if self.kind == "ivf-pq" else {}),
        }

    def query(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        import faiss

        faiss.extract_index_ivf(self.index).nprobe = self.nprobe
        if self.kind == "ivf-flat":
            return _drop_self(self.index.search(q, self.k + 1)[1].astype(np.int64), rows, self.k)
        candidates = self.index.search(q, _RERANK * self.k + 1)[1].astype(np.int64)
        return _drop_self(_rerank(q, candidates, self.vectors), rows, self.k)


def _rerank(q: np.ndarray, candidates: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Candidates (int64 [m, c], -1 for none) sorted per row by their exact inner product with the query
    (highest first, ties by id, -1 last)."""
    valid = candidates >= 0
    flat = np.unique(candidates[valid])
    if not len(flat):
        return candidates
    rows = np.asarray(vectors[flat], dtype=np.float32)
    position = np.searchsorted(flat, np.where(valid, candidates, flat[0]))
    scores = np.where(valid, np.einsum("qd,qcd->qc", q, rows[position]), -np.inf)
    by_id = np.argsort(np.where(valid, candidates, np.iinfo(np.int64).max), axis=1, kind="stable")
    candidates, scores = np.take_along_axis(candidates, by_id, 1), np.take_along_axis(scores, by_id, 1)
    return np.take_along_axis(candidates, np.argsort(-scores, axis=1, kind="stable"), 1)


def _ivf(vectors: np.ndarray, kind: str, options: SearchOptions):
    import faiss

    n, d = vectors.shape
    nlist = nlist_for(n)
    rng = np.random.default_rng(np.random.SeedSequence([options.seed, 7]))
    train_n = min(n, max(39 * nlist, 20_000))
    train = np.sort(rng.choice(n, size=train_n, replace=False)) if train_n < n else np.arange(n)
    if kind == "ivf-flat":
        index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    else:
        m = next(m for m in (d // 8, d // 4, d // 2, d) if m >= 1 and d % m == 0)
        index = faiss.index_factory(d, f"IVF{nlist},PQ{m}", faiss.METRIC_INNER_PRODUCT)
    faiss.extract_index_ivf(index).cp.seed = 1234 + options.seed  # faiss' default k-means seed, shifted
    index.train(np.ascontiguousarray(vectors[train], dtype=np.float32))
    for start in range(0, n, 1 << 18):
        index.add(np.ascontiguousarray(vectors[start : start + (1 << 18)], dtype=np.float32))
    k = min(options.k, n - 1)
    searcher = _IvfSearcher(index, vectors, k, kind, nlist, train_n)
    _tune_nprobe(searcher, vectors, options)
    return index, searcher


def _tune_nprobe(searcher: _IvfSearcher, vectors: np.ndarray, options: SearchOptions) -> None:
    """Measure recall@k on a seeded sample of queries; double nprobe until it reaches the target (unless
    nprobe is given)."""
    n = len(vectors)
    rng = np.random.default_rng(np.random.SeedSequence([options.seed, 8]))
    queries = np.sort(rng.choice(n, size=min(options.recall_queries, n), replace=False))
    q = np.ascontiguousarray(vectors[queries], dtype=np.float32)
    truth = exact_neighbours(vectors, queries, searcher.k)
    searcher.recall_queries = len(queries)
    nprobe = options.nprobe or min(_FIRST_NPROBE, searcher.nlist)
    while True:
        searcher.nprobe = nprobe
        found = np.concatenate(
            [
                searcher.query(q[i : i + _QUERY_BLOCK], queries[i : i + _QUERY_BLOCK])
                for i in range(0, len(q), _QUERY_BLOCK)
            ]
        )
        searcher.recall = recall_at_k(found, truth)
        if options.nprobe or searcher.recall >= options.recall_target or nprobe >= searcher.nlist:
            return
        nprobe = min(2 * nprobe, searcher.nlist)


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k other rows of rows ``queries`` (int64 [q, k]), scanning the base in blocks (ties: lower id)."""
    q = np.ascontiguousarray(vectors[queries], dtype=np.float32)
    best_s = np.full((len(q), k + 1), -np.inf, dtype=np.float32)
    best_i = np.full((len(q), k + 1), -1, dtype=np.int64)
    for start in range(0, len(vectors), 8192):
        block = np.asarray(vectors[start : start + 8192], dtype=np.float32)
        s = q @ block.T
        take = min(k + 1, s.shape[1])
        top = np.argpartition(-s, take - 1, axis=1)[:, :take]
        s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], axis=1)
        ids = np.concatenate([best_i, top + start], axis=1)
        order = _top_rows(s, ids, k + 1)
        best_s, best_i = np.take_along_axis(s, order, 1), np.take_along_axis(ids, order, 1)
    return _drop_self(best_i, np.asarray(queries), k)


def _top_rows(scores: np.ndarray, ids: np.ndarray, m: int) -> np.ndarray:
    """Per row, the positions of the ``m`` highest scores (ties: lower id first), best first."""
    by_id = np.argsort(ids, axis=1, kind="stable")
    by_score = np.argsort(-np.take_along_axis(scores, by_id, 1), axis=1, kind="stable")
    return np.take_along_axis(by_id, by_score, 1)[:, :m]


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (rows of ids, -1 ignored)."""
    hits, total = 0, 0
    for f, t in zip(found, truth):
        t = set(t[t >= 0].tolist())
        hits += len(t & set(f[f >= 0].tolist()))
        total += len(t)
    return hits / total if total else 1.0


# ------------------------------------------------------------------------------------------ imported graphs
def load_neighbours(path: str | Path, documents: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A kNN graph computed elsewhere: ``(ids int64 [documents, k], sims float32 [documents, k] or None)``.

    Layout: a ``.npy`` of ids, or a ``.npz`` with ``ids`` and optionally ``sims``. Row ``i`` lists the
    neighbours of document ``i`` (read order: the ``index`` of ``documents.jsonl``), most similar first;
    ``-1`` pads rows with fewer. ``sims`` (cosine, higher is closer) replace the computed similarities.
    """
    path = Path(path)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                if "ids" not in data:
                    raise DataError(f"{path}: a neighbours .npz needs an 'ids' array (has {', '.join(data.files)})")
                ids = data["ids"]
                sims = data["sims"] if "sims" in data else None
        else:
            ids, sims = np.load(path, allow_pickle=False), None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable neighbours file ({e})") from None
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"{path}: ids must be an integer array [documents, k], got {ids.dtype} {ids.shape}")
    if len(ids) != documents:
        raise DataError(
            f"{path}: {len(ids)} rows, but the corpus has {documents} documents (rows follow the "
            "read order, documents.jsonl's index)"
        )
    if ids.size and (ids.min() < -1 or ids.max() >= documents):
        raise DataError(f"{path}: neighbour ids must be in [-1, {documents - 1}], found {ids.min()}..{ids.max()}")
    if sims is not None and (sims.shape != ids.shape or not np.issubdtype(sims.dtype, np.floating)):
        raise DataError(
            f"{path}: sims must be a float array of the ids' shape {ids.shape}, got {sims.dtype} {sims.shape}"
        )
    return ids.astype(np.int64), None if sims is None else sims.astype(np.float32)
