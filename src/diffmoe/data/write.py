"""Writing a prepared dataset's contents: each split's shards and index arrays, the records of
``documents.jsonl``, and the manifest (layout: :mod:`diffmoe.data.store`, whose atomic writers write
every file)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from . import store as st
from .config import PrepareConfig
from .ingest import TokenStore
from .order import EXACT_DUP, HELDOUT, NEAR_DUP, STATUS_NAMES, TRAIN
from .pack import Packed
from .readers import Corpus

_ROW_BLOCK = 4096


def write_split(out: Path, split: str, packed: Packed, order: np.ndarray, row_order: np.ndarray,
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


def index_files(info: dict) -> list[str]:
    return [info["domain_tokens_file"], info["row_order_file"], info["docs_file"]]


def document_lines(store: TokenStore, status: np.ndarray, duplicate_of: np.ndarray):
    with open(store.meta_path, encoding="utf-8") as meta:
        for index, line in enumerate(meta):
            record = json.loads(line)
            record.update(index=index, tokens=int(store.lengths[index]), split=STATUS_NAMES[status[index]])
            if duplicate_of[index] >= 0:
                record["duplicate_of"] = int(duplicate_of[index])
            yield json.dumps(record, ensure_ascii=False)


def build_manifest(corpus: Corpus, config: PrepareConfig, tokenizer: Tokenizer, eod: int, size: int,
                   dtype: np.dtype, store: TokenStore, status: np.ndarray, read_stats, splits: dict,
                   sources: list[dict], knn_backend: str | None, files: dict[str, str]) -> dict:
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
            "exact_duplicates": int((status == EXACT_DUP).sum()),
            "near_duplicates": int((status == NEAR_DUP).sum()),
            "train": int((status == TRAIN).sum()),
            "heldout": int((status == HELDOUT).sum()),
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
