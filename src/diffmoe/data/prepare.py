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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from . import store as st
from ..report import say
from .config import PrepareConfig
from .errors import DataError
from .ingest import TokenStore, ingest, tokenizer_sample
from .order import HELDOUT, TRAIN, exact_duplicates, order_heldout, order_training
from .pack import pack
from .readers import Corpus
from .split import heldout_mask
from .tokenizer import TokenizerConfig, eod_id, gpt2_tokenizer, load_tokenizer_file, train_bpe, vocab_size
from .write import build_manifest, document_lines, index_files, write_split


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
    st.claim(out, overwrite)
    workdir = out / st.WORKDIR
    workdir.mkdir()
    timer = _Timer()
    try:
        manifest = _run(reader, out, workdir, config, timer, verbose)
    except BaseException:
        st.remove_ours(out, keep_workdir=True)
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

    status, duplicate_of = exact_duplicates(store.keys)
    heldout = heldout_mask(store.domain_ids, store.keys, status == TRAIN, config.heldout_fraction, config.seed)
    status[heldout] = HELDOUT
    train_order, knn_backend = order_training(store, status, duplicate_of, tokenizer, config, verbose)
    heldout_order = order_heldout(store, status, config.seed)
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
        splits[split] = write_split(out, split, packed, order, row_order, store, dtype, config)
        del packed
    timer.lap("pack")
    st.write_lines_atomic(out / "documents.jsonl", document_lines(store, status, duplicate_of))
    st.write_lines_atomic(out / "sources.jsonl", (json.dumps(s, ensure_ascii=False) for s in sources))
    files = {name: st.sha256_file(out / name) for name in ["tokenizer.json", "documents.jsonl", "sources.jsonl"]
             + [name for info in splits.values() for name in index_files(info)]}
    files.update({shard["file"]: shard["sha256"] for info in splits.values() for shard in info["shards"]})
    manifest = build_manifest(corpus, config, tokenizer, eod, size, dtype, store, status, read_stats, splits,
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
