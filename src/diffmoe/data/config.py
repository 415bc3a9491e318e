"""The options of ``prepare``: ``PrepareConfig`` and its ``OrderingConfig``, and their validation.

Everything here decides what ``prepare`` writes (a resumed run must use the same values); how it runs
(workers, executor) is :class:`~diffmoe.data.engine.EngineConfig`, which never changes the output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .embed import EMBEDDINGS
from .errors import DataError
from .knn import KNN_BACKENDS, KNN_INDEXES, SearchOptions
from .readers import ReadOptions
from .tokenizer import TokenizerConfig

BATCHING = ("random", "similarity")


@dataclass
class OrderingConfig:
    """How training documents are deduplicated and ordered before packing."""

    batching: str = "similarity"
    """``similarity``: the In-Context Pretraining walk over nearest neighbours (Lory trains on this);
    ``random``: a seeded shuffle of the documents (the control)."""
    embedding: str = "tfidf"
    """``tfidf`` (fast) or ``minilm`` (dense all-MiniLM-L6-v2; slow on CPU, on CUDA when available)."""
    lsa_dims: int = 128
    """TF-IDF only: dimensions of the LSA projection searched for neighbour candidates."""
    fit_docs: int = 100_000
    """TF-IDF only: the IDF and the LSA projection are fitted on a seeded sample of this many documents
    (all of them when fewer), then applied to every shard."""
    knn_k: int = 10
    """Neighbours per document (In-Context Pretraining's code follows the top 9)."""
    knn_index: str = "auto"
    """``exact``, ``ivf-flat``, ``ivf-pq``, or ``auto``: exact up to ``knn_exact_max_docs`` documents, then
    IVF-Flat, IVF-PQ when flat codes exceed ``knn_memory_gb`` (:mod:`diffmoe.data.knn`)."""
    knn_exact_max_docs: int = 50_000
    knn_nprobe: int | None = None
    """Inverted lists scanned per query; None: doubled from 8 until ``knn_recall_target`` is reached."""
    knn_recall_target: float = 0.9
    """Recall@k against exact search, measured on ``knn_recall_queries`` seeded queries, that IVF must reach."""
    knn_recall_queries: int = 1000
    knn_memory_gb: float = 16.0
    knn_backend: str = "auto"
    """Exact search: ``auto`` (faiss when installed, else scikit-learn), ``faiss`` or ``sklearn``."""
    neighbours: str | None = None
    """A kNN graph computed elsewhere (:func:`diffmoe.data.knn.load_neighbours`): no embedding search."""
    dedup_threshold: float | None = 0.9
    """Documents whose cosine similarity reaches this are near-duplicates; one per group is kept.
    Applies to both batching methods, so they train on the same documents. None: keep them all
    (exact duplicates are always dropped)."""
    max_chain_docs: int | None = None
    """Cap on documents per walk chain before jumping to a new start (the released ICP code uses
    21); None: follow neighbours as long as there are unvisited ones (the paper's description)."""
    chunk_docs: int | None = None
    """None: neighbours, dedup and the walk span the whole corpus. A number: the old local behaviour,
    documents compared only within chunks of this many (in read order), each searched exactly."""

    def validate(self) -> None:
        _choice("batching", self.batching, BATCHING)
        _choice("embedding", self.embedding, EMBEDDINGS)
        _choice("knn_backend", self.knn_backend, KNN_BACKENDS)
        _choice("knn_index", self.knn_index, KNN_INDEXES)
        for name in ("lsa_dims", "knn_k", "fit_docs", "knn_exact_max_docs", "knn_recall_queries"):
            _positive_int(name, getattr(self, name))
        if self.chunk_docs is not None:
            _positive_int("chunk_docs", self.chunk_docs, minimum=2)
        if self.max_chain_docs is not None:
            _positive_int("max_chain_docs", self.max_chain_docs)
        if self.knn_nprobe is not None:
            _positive_int("knn_nprobe", self.knn_nprobe)
        if not 0 < self.knn_recall_target <= 1:
            raise DataError(f"invalid knn_recall_target={self.knn_recall_target!r}: must be in (0, 1]")
        if not self.knn_memory_gb > 0:
            raise DataError(f"invalid knn_memory_gb={self.knn_memory_gb!r}: must be positive")
        if self.dedup_threshold is not None and not 0 < self.dedup_threshold <= 1:
            raise DataError(f"invalid dedup_threshold={self.dedup_threshold!r}: must be in (0, 1], or None")

    @property
    def needs_graph(self) -> bool:
        """Whether a neighbour graph is needed (similarity batching, or near-duplicate removal)."""
        return self.batching == "similarity" or self.dedup_threshold is not None

    def search_options(self, seed: int) -> SearchOptions:
        return SearchOptions(
            k=self.knn_k,
            index=self.knn_index,
            backend=self.knn_backend,
            exact_max_docs=self.knn_exact_max_docs,
            nprobe=self.knn_nprobe,
            recall_target=self.knn_recall_target,
            recall_queries=self.knn_recall_queries,
            memory_gb=self.knn_memory_gb,
            seed=seed,
        )


@dataclass
class PrepareConfig:
    """Everything ``prepare`` needs besides the corpus, the output directory and the engine."""

    context_len: int = 1024
    """Tokens the model sees per sequence; rows store ``context_len + 1`` for the shifted targets."""
    heldout_fraction: float = 0.05
    """Fraction of each domain's documents held out (at least one per domain of two or more)."""
    seed: int = 0
    shard_tokens: int = 1 << 27
    """Tokens per shard file, at most (rounded down to whole rows, at least one row)."""
    read: ReadOptions = field(default_factory=ReadOptions)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    ordering: OrderingConfig = field(default_factory=OrderingConfig)

    def validate(self) -> None:
        _positive_int("context_len", self.context_len)
        _positive_int("shard_tokens", self.shard_tokens)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise DataError(f"invalid seed={self.seed!r}: must be an integer >= 0")
        if not 0 <= self.heldout_fraction < 1:
            raise DataError(f"invalid heldout_fraction={self.heldout_fraction!r}: must be in [0, 1)")
        self.read.validate()
        self.tokenizer.validate()
        self.ordering.validate()


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise DataError(f"invalid {name}={value!r}: choose one of {', '.join(choices)}")


def _positive_int(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise DataError(f"invalid {name}={value!r}: must be an integer >= {minimum}")
