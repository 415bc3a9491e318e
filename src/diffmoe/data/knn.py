"""k nearest neighbours by cosine similarity: faiss-cpu when installed, else scikit-learn (both exact)."""

from __future__ import annotations

import numpy as np

from .errors import DataError

KNN_BACKENDS = ("auto", "faiss", "sklearn")


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
        raise DataError("similarity ordering needs scikit-learn: pip install scikit-learn "
                        "(or pip install 'diffmoe[data]')") from None
    return "sklearn"


def nearest_neighbours(vectors: np.ndarray, k: int, backend: str) -> np.ndarray:
    """Indices of each row's ``k`` most similar other rows, most similar first.

    vectors: float32 [n, d], rows L2-normalised. Returns int64 [n, min(k, n - 1)]; a row never lists
    itself (exact duplicates of it may appear).
    """
    n = len(vectors)
    k = min(k, n - 1)
    if k <= 0:
        return np.zeros((n, 0), dtype=np.int64)
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        _, found = index.search(vectors, k + 1)
    else:
        from sklearn.neighbors import NearestNeighbors

        found = NearestNeighbors(n_neighbors=k + 1, algorithm="brute", metric="euclidean").fit(vectors) \
            .kneighbors(vectors, return_distance=False)
    found = np.asarray(found, dtype=np.int64)
    # Drop the row itself wherever it appears (ties with duplicates can move it off rank 0).
    not_self = found != np.arange(n)[:, None]
    keep = np.cumsum(not_self, axis=1) <= k
    return found[not_self & keep].reshape(n, k)
