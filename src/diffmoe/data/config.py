"""The options of ``prepare``: ``PrepareConfig`` and its ``OrderingConfig``, and their validation."""

from __future__ import annotations

from dataclasses import dataclass, field

from .embed import EMBEDDINGS
from .errors import DataError
from .knn import KNN_BACKENDS
from .readers import ReadOptions
from .tokenizer import TokenizerConfig

BATCHING = ("random", "similarity")


@dataclass
class OrderingConfig:
    """How training documents are ordered before packing."""

    batching: str = "similarity"
    """``similarity``: the In-Context Pretraining walk over nearest neighbours (Lory trains on this);
    ``random``: a seeded shuffle of the documents (the control)."""
    embedding: str = "tfidf"
    """``tfidf`` (fast) or ``minilm`` (dense all-MiniLM-L6-v2; slow on CPU)."""
    lsa_dims: int = 128
    """TF-IDF only: dimensions of the LSA projection searched for neighbour candidates."""
    knn_k: int = 10
    """Neighbours per document (In-Context Pretraining's code follows the top 9)."""
    knn_backend: str = "auto"
    """``auto`` (faiss when installed, else scikit-learn), ``faiss`` or ``sklearn``."""
    dedup_threshold: float | None = 0.9
    """Documents whose cosine similarity reaches this are near-duplicates; one per group is kept.
    Applies to both batching methods, so they train on the same documents. None: keep them all
    (exact duplicates are always dropped)."""
    max_chain_docs: int | None = None
    """Cap on documents per walk chain before jumping to a new start (the released ICP code uses
    21); None: follow neighbours as long as there are unvisited ones (the paper's description)."""
    chunk_docs: int = 250_000
    """Near-duplicate removal and the walk run on chunks of this many documents (in corpus order),
    which bounds their memory; documents are only compared within a chunk."""

    def validate(self) -> None:
        _choice("batching", self.batching, BATCHING)
        _choice("embedding", self.embedding, EMBEDDINGS)
        _choice("knn_backend", self.knn_backend, KNN_BACKENDS)
        _positive_int("lsa_dims", self.lsa_dims)
        _positive_int("knn_k", self.knn_k)
        _positive_int("chunk_docs", self.chunk_docs, minimum=2)
        if self.max_chain_docs is not None:
            _positive_int("max_chain_docs", self.max_chain_docs)
        if self.dedup_threshold is not None and not 0 < self.dedup_threshold <= 1:
            raise DataError(f"invalid dedup_threshold={self.dedup_threshold!r}: must be in (0, 1], or None")


@dataclass
class PrepareConfig:
    """Everything ``prepare`` needs besides the corpus path and the output directory."""

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
