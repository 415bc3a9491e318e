"""``prepare``: a corpus in, a tokenized, ordered, packed dataset out.

Stages (data flows one way):

1. read and fingerprint the corpus; train or load the tokenizer;
2. tokenize every document into a temporary token store (streaming);
3. drop exact duplicates; hold out a fraction of each domain (whole documents);
4. in chunks of ``chunk_docs`` documents: embed, find k nearest neighbours, drop near-duplicates
   (keeping held-out copies, so no near-duplicate of a held-out document trains), and — with
   ``batching="similarity"`` — order the training documents by the greedy walk;
   ``batching="random"`` shuffles them instead;
5. pack each split with end-of-document separators into rows of ``context_len + 1`` tokens, shuffle
   the training rows (not the documents inside them), write shards, indexes and, last, the manifest.

The same corpus, options and seed give byte-identical files (on one machine and library versions).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from . import store as st
from ..report import say
from .embed import EMBEDDINGS, MINILM_MAX_TOKENS, Embedding, minilm_embedding, tfidf_embedding
from .errors import DataError
from .ingest import TokenStore, ingest, tokenizer_sample
from .knn import KNN_BACKENDS, nearest_neighbours, resolve_backend
from .order import keep_one_per_group, near_duplicate_groups, similarity_walk
from .pack import Packed, pack
from .readers import Corpus, ReadOptions
from .split import heldout_mask
from .tokenizer import TokenizerConfig, eod_id, gpt2_tokenizer, load_tokenizer_file, train_bpe, vocab_size

BATCHING = ("random", "similarity")
_WORKDIR = ".prepare-tmp"
_ROW_BLOCK = 4096
# Document status codes (documents.jsonl "split").
_TRAIN, _HELDOUT, _EXACT_DUP, _NEAR_DUP = 0, 1, 2, 3
_STATUS_NAMES = ("train", "heldout", "exact_duplicate", "near_duplicate")


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


@dataclass
class PrepareResult:
    """What ``prepare`` wrote: the dataset directory, its manifest, and seconds per stage."""

    out: Path
    manifest: dict
    seconds: dict[str, float]


def prepare(corpus: str | os.PathLike, out: str | os.PathLike, config: PrepareConfig | None = None,
            overwrite: bool = False, verbose: bool = False) -> PrepareResult:
    """Prepare ``corpus`` into the dataset directory ``out`` (layout: :mod:`diffmoe.data.store`).

    ``out`` must be new, empty, or hold a previous dataset (replaced only with ``overwrite``). Raises
    :class:`DataError` for bad input or options; on any failure no loadable dataset is left in ``out``.
    ``verbose`` prints a status line per stage (through :func:`diffmoe.report.say`).
    """
    config = config or PrepareConfig()
    config.validate()
    reader = Corpus(corpus, config.read)
    out = Path(out)
    _claim(out, overwrite)
    workdir = out / _WORKDIR
    workdir.mkdir()
    timer = _Timer()
    try:
        manifest = _run(reader, out, workdir, config, timer, verbose)
    except BaseException:
        _remove_ours(out, keep_workdir=True)
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return PrepareResult(out, manifest, timer.seconds)


# ------------------------------------------------------------------------------------------ pipeline
def _run(corpus: Corpus, out: Path, workdir: Path, config: PrepareConfig, timer: "_Timer", verbose: bool) -> dict:
    sources = corpus.fingerprints()
    if config.tokenizer.source == "train":
        say(f"training a byte-level BPE of {config.tokenizer.vocab_size} tokens", verbose)
    tokenizer = _tokenizer(corpus, config.tokenizer)
    eod = eod_id(tokenizer, config.tokenizer.eod_token)
    timer.lap("tokenizer")
    store = ingest(corpus, tokenizer, workdir)
    read_stats = corpus.stats
    if len(store) == 0:
        raise DataError(_empty_corpus_message(corpus))
    say(f"read {len(store)} documents ({int(store.lengths.sum())} tokens) from {len(sources)} files; "
        f"{config.ordering.batching} ordering", verbose)
    timer.lap("tokenize")

    status, duplicate_of = _exact_duplicates(store.keys)
    heldout = heldout_mask(store.domain_ids, store.keys, status == _TRAIN, config.heldout_fraction, config.seed)
    status[heldout] = _HELDOUT
    train_order, knn_backend = _order(store, status, duplicate_of, tokenizer, config, verbose)
    heldout_order = _heldout_order(store, status, config.seed)
    timer.lap("order")

    row_len = config.context_len + 1
    _check_sizes(store, train_order, heldout_order, row_len, config)
    size = vocab_size(tokenizer)
    dtype = np.dtype(np.uint16 if size <= 1 << 16 else np.uint32)
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 2]))
    st.write_bytes_atomic(out / "tokenizer.json", tokenizer.to_str().encode("utf-8"))
    splits = {}
    for split, order in (("train", train_order), ("heldout", heldout_order)):
        packed = pack(store, order, eod, row_len, dtype, workdir / f"{split}.stream.npy")
        row_order = (rng.permutation(len(packed.rows)) if split == "train"
                     else np.arange(len(packed.rows), dtype=np.int64))
        splits[split] = _write_split(out, split, packed, order, row_order, store, dtype, config)
        del packed
    timer.lap("pack")
    st.write_lines_atomic(out / "documents.jsonl", _document_lines(store, status, duplicate_of))
    st.write_lines_atomic(out / "sources.jsonl", (json.dumps(s, ensure_ascii=False) for s in sources))
    files = {name: st.sha256_file(out / name) for name in ["tokenizer.json", "documents.jsonl", "sources.jsonl"]
             + [name for info in splits.values() for name in _index_files(info)]}
    files.update({shard["file"]: shard["sha256"] for info in splits.values() for shard in info["shards"]})
    manifest = _manifest(corpus, config, tokenizer, eod, size, dtype, store, status, read_stats, splits,
                         sources, knn_backend, files)
    st.write_json_atomic(out / st.MANIFEST, manifest)  # last: only now is `out` a dataset
    timer.lap("write")
    return manifest


def _tokenizer(corpus: Corpus, config: TokenizerConfig) -> Tokenizer:
    if config.source == "train":
        return train_bpe(tokenizer_sample(corpus, config.train_mb * 1e6), config.vocab_size,
                         config.eod_token, config.min_frequency)
    if config.source == "gpt2":
        return gpt2_tokenizer(config.eod_token)
    return load_tokenizer_file(config.source, config.eod_token)


def _exact_duplicates(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(status int8 [n], duplicate_of int64 [n]): every copy but the first of a text is a duplicate."""
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    first_of = first[inverse.ravel()]
    status = np.where(first_of == np.arange(len(keys)), _TRAIN, _EXACT_DUP).astype(np.int8)
    return status, np.where(status == _EXACT_DUP, first_of, -1)


def _order(store: TokenStore, status: np.ndarray, duplicate_of: np.ndarray, tokenizer: Tokenizer,
           config: PrepareConfig, verbose: bool) -> tuple[np.ndarray, str | None]:
    """Drop near-duplicates (updating ``status`` / ``duplicate_of`` in place) and order the training
    documents. Returns (train order int64 [n_train], the kNN backend used or None)."""
    ordering = config.ordering
    similarity = ordering.batching == "similarity"
    if not similarity and ordering.dedup_threshold is None:
        train = np.flatnonzero(status == _TRAIN)
        return _shuffled(train, config.seed), None
    backend = resolve_backend(ordering.knn_backend)
    candidates = np.flatnonzero(status != _EXACT_DUP)
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
            keep = keep_one_per_group(groups, status[idx] == _HELDOUT)
            kept_of_group = np.full(len(idx), -1, dtype=np.int64)
            kept_of_group[groups[keep]] = np.flatnonzero(keep)
            status[idx[~keep]] = _NEAR_DUP
            duplicate_of[idx[~keep]] = idx[kept_of_group[groups[~keep]]]
        if similarity:
            local = np.flatnonzero(status[idx] == _TRAIN)
            position = np.full(len(idx), -1, dtype=np.int64)
            position[local] = np.arange(len(local))
            edge = (position[a] >= 0) & (position[b] >= 0)
            walk = similarity_walk(len(local), position[a[edge]], position[b[edge]], sim[edge],
                                   ordering.max_chain_docs)
            walked.append(idx[local[walk]])
        say(f"compared documents {start}-{start + len(idx)} of {len(candidates)} with their neighbours", verbose)
    if similarity:
        return np.concatenate(walked), backend
    return _shuffled(np.flatnonzero(status == _TRAIN), config.seed), backend


def _embed(store: TokenStore, idx: np.ndarray, tokenizer: Tokenizer, config: PrepareConfig) -> Embedding:
    ordering = config.ordering
    if ordering.embedding == "tfidf":
        return tfidf_embedding([store.doc(i) for i in idx], vocab_size(tokenizer), ordering.lsa_dims, config.seed)
    texts = tokenizer.decode_batch([store.doc(i)[:MINILM_MAX_TOKENS].tolist() for i in idx])
    return minilm_embedding(texts)


def _shuffled(indices: np.ndarray, seed: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence([seed, 0])).permutation(indices)


def _heldout_order(store: TokenStore, status: np.ndarray, seed: int) -> np.ndarray:
    """Held-out documents grouped by domain (domain id order), shuffled within each domain."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    held = status == _HELDOUT
    parts = [rng.permutation(np.flatnonzero(held & (store.domain_ids == d))) for d in range(len(store.domains))]
    return np.concatenate(parts).astype(np.int64)


def _check_sizes(store: TokenStore, train: np.ndarray, heldout: np.ndarray, row_len: int,
                 config: PrepareConfig) -> None:
    train_tokens = int((store.lengths[train] + 1).sum())
    if train_tokens < row_len:
        raise DataError(f"context_len={config.context_len} needs {row_len} tokens per row, but the training "
                        f"split has only {train_tokens} tokens ({len(train)} documents); lower context_len "
                        "or add data")
    heldout_tokens = int((store.lengths[heldout] + 1).sum())
    if config.heldout_fraction > 0 and heldout_tokens < row_len:
        raise DataError(f"context_len={config.context_len} needs {row_len} tokens per row, but the held-out "
                        f"split has only {heldout_tokens} tokens ({len(heldout)} documents); lower "
                        "context_len, raise heldout_fraction, or set it to 0")


# ------------------------------------------------------------------------------------------ writing
def _write_split(out: Path, split: str, packed: Packed, order: np.ndarray, row_order: np.ndarray,
                 store: TokenStore, dtype: np.dtype, config: PrepareConfig) -> dict:
    row_len = packed.rows.shape[1]
    writer = st.ShardWriter(out, split, len(packed.rows), row_len, max(1, config.shard_tokens // row_len), dtype)
    for start in range(0, len(row_order), _ROW_BLOCK):
        writer.write(packed.rows[row_order[start:start + _ROW_BLOCK]])
    shards = writer.finish()
    domain_tokens = packed.domain_tokens[row_order]
    names = {"domain_tokens_file": f"{split}.domain_tokens.npy", "row_order_file": f"{split}.row_order.npy",
             "docs_file": f"{split}.docs.npy"}
    st.write_npy_atomic(out / names["domain_tokens_file"], domain_tokens)
    st.write_npy_atomic(out / names["row_order_file"], row_order.astype(np.int64))
    st.write_npy_atomic(out / names["docs_file"], np.stack([order, packed.doc_starts], axis=1).astype(np.int64))
    per_domain = domain_tokens.sum(axis=0)
    return {
        "rows": len(packed.rows),
        "tokens": len(packed.rows) * row_len,
        "documents": len(order),
        "dropped_tail_tokens": packed.dropped_tail_tokens,
        "documents_per_domain": {name: int((store.domain_ids[order] == d).sum())
                                 for d, name in enumerate(store.domains)},
        "tokens_per_domain": {name: int(per_domain[d]) for d, name in enumerate(store.domains)},
        "shards": shards,
        **names,
    }


def _index_files(info: dict) -> list[str]:
    return [info["domain_tokens_file"], info["row_order_file"], info["docs_file"]]


def _document_lines(store: TokenStore, status: np.ndarray, duplicate_of: np.ndarray):
    with open(store.meta_path, encoding="utf-8") as meta:
        for index, line in enumerate(meta):
            record = json.loads(line)
            record.update(index=index, tokens=int(store.lengths[index]), split=_STATUS_NAMES[status[index]])
            if duplicate_of[index] >= 0:
                record["duplicate_of"] = int(duplicate_of[index])
            yield json.dumps(record, ensure_ascii=False)


def _manifest(corpus: Corpus, config: PrepareConfig, tokenizer: Tokenizer, eod: int, size: int, dtype: np.dtype,
              store: TokenStore, status: np.ndarray, read_stats, splits: dict, sources: list[dict],
              knn_backend: str | None, files: dict[str, str]) -> dict:
    ordering = asdict(config.ordering)
    ordering["knn_backend"] = knn_backend
    if config.ordering.embedding != "tfidf":
        ordering.pop("lsa_dims")
    tokenizer_info = {"file": "tokenizer.json", "source": config.tokenizer.source, "vocab_size": size,
                      "eod_token": config.tokenizer.eod_token, "eod_id": eod}
    if config.tokenizer.source == "train":
        tokenizer_info.update(requested_vocab_size=config.tokenizer.vocab_size, train_mb=config.tokenizer.train_mb,
                              min_frequency=config.tokenizer.min_frequency)
    return {
        "format": st.FORMAT,
        "format_version": st.FORMAT_VERSION,
        "tokenizer": tokenizer_info,
        "context_len": config.context_len,
        "row_len": config.context_len + 1,
        "dtype": dtype.name,
        "domains": store.domains,
        "seed": config.seed,
        "heldout_fraction": config.heldout_fraction,
        "ordering": ordering,
        "documents": {
            "read": len(store),
            "skipped": dict(sorted(read_stats.skipped.items())),
            "exact_duplicates": int((status == _EXACT_DUP).sum()),
            "near_duplicates": int((status == _NEAR_DUP).sum()),
            "train": int((status == _TRAIN).sum()),
            "heldout": int((status == _HELDOUT).sum()),
        },
        "splits": splits,
        "sources": {
            "corpus": str(corpus.path),
            "files": len(sources),
            "bytes": sum(s["bytes"] for s in sources),
            "sha256": _sources_digest(sources),
            "list": "sources.jsonl",
            "read_options": asdict(config.read),
        },
        "files": files,
    }


def _sources_digest(sources: list[dict]) -> str:
    """One sha256 over every corpus file's path, size and content hash."""
    import hashlib

    h = hashlib.sha256()
    for s in sources:
        h.update(f"{s['path']}\0{s['bytes']}\0{s['sha256']}\n".encode("utf-8"))
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ out dir
_OUR_FILES = re.compile(
    r"(manifest\.json|tokenizer\.json|documents\.jsonl|sources\.jsonl"
    r"|(train|heldout)(-\d{5}\.npy|\.(domain_tokens|row_order|docs)\.npy))")


def _is_ours(name: str) -> bool:
    """Names ``prepare`` writes: final files, their temporaries (``.NAME.tmp-PID``), its work directory."""
    temporary = re.fullmatch(r"\.(.+)\.tmp-\d+", name)
    return name == _WORKDIR or _OUR_FILES.fullmatch(temporary.group(1) if temporary else name) is not None


def _claim(out: Path, overwrite: bool) -> None:
    """Make ``out`` ready: new or empty, or a previous (possibly interrupted) run's output.

    A previous complete dataset is replaced only with ``overwrite``; its manifest is deleted first,
    so from then on the directory never loads as a dataset until the new manifest is written.
    """
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    foreign = sorted(p.name for p in out.iterdir() if not _is_ours(p.name))
    if foreign:
        raise DataError(f"output directory {out} is not empty and holds files prepare did not write "
                        f"({', '.join(foreign[:3])}); choose a new or empty directory")
    if (out / st.MANIFEST).exists():
        if not overwrite:
            raise DataError(f"{out} already holds a prepared dataset; pass overwrite=True / --overwrite to "
                            "replace it")
        (out / st.MANIFEST).unlink()
        st.fsync_dir(out)
    _remove_ours(out)


def _remove_ours(out: Path, keep_workdir: bool = False) -> None:
    for path in out.iterdir():
        if not _is_ours(path.name) or (keep_workdir and path.name == _WORKDIR):
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _empty_corpus_message(corpus: Corpus) -> str:
    details = [f"{count} {reason}" for reason, count in sorted(corpus.stats.skipped.items())]
    if corpus.ignored:
        details.append("ignored files by extension: " + ", ".join(
            f"{ext} ({n})" for ext, n in sorted(corpus.ignored.items())))
    return (f"empty corpus: no documents in {corpus.path} ({len(corpus.files)} readable files"
            + (f"; skipped: {'; '.join(details)}" if details else "") + ")")


# ------------------------------------------------------------------------------------------ helpers
class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._last, 3)
        self._last = now


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise DataError(f"invalid {name}={value!r}: choose one of {', '.join(choices)}")


def _positive_int(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise DataError(f"invalid {name}={value!r}: must be an integer >= {minimum}")
