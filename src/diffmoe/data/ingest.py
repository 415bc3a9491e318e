"""Documents -> token ids on disk: one streaming pass that tokenizes and records per-document metadata.

Text is held only for one batch of documents at a time; token ids go to a flat file and are
memory-mapped afterwards, so the rest of the pipeline never needs the text again.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .readers import Corpus, Document
from .split import mix64

_BATCH_DOCS = 512
_BATCH_CHARS = 8 << 20


def content_key(text: str) -> int:
    """64-bit content hash of a document (equal texts, equal keys)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


@dataclass
class TokenStore:
    """Every document's token ids, concatenated, plus per-document metadata.

    tokens: uint32 [total_tokens] (memory-mapped); starts, lengths: int64 [num_docs];
    domain_ids: int32 [num_docs] into ``domains``; keys: uint64 [num_docs] content hashes;
    ``meta_path``: a JSONL file with each document's ``id``, ``domain`` and ``source``, in order.
    """

    tokens: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    domain_ids: np.ndarray
    keys: np.ndarray
    domains: list[str]
    meta_path: Path

    def __len__(self) -> int:
        return len(self.starts)

    def doc(self, index: int) -> np.ndarray:
        """Token ids of document ``index``: uint32 [length]."""
        start = self.starts[index]
        return self.tokens[start:start + self.lengths[index]]


def tokenizer_sample(corpus: Corpus, max_bytes: float) -> Iterator[str]:
    """The texts that train the BPE: each document with probability ``max_bytes / corpus size``,
    decided by its content hash (so the same corpus always gives the same sample)."""
    rate = min(1.0, max_bytes / max(corpus.total_bytes, 1))
    limit = int(rate * 2**64) if rate < 1 else None
    for doc in corpus:
        if limit is None or int(mix64(np.array([content_key(doc.text)], np.uint64))[0]) < limit:
            yield doc.text


def ingest(corpus: Corpus, tokenizer: Tokenizer, workdir: Path) -> TokenStore:
    """Tokenize every document of ``corpus`` into ``workdir`` (``tokens.bin``, ``documents.tmp.jsonl``)."""
    tokens_path, meta_path = workdir / "tokens.bin", workdir / "documents.tmp.jsonl"
    lengths, domain_ids, keys = array("q"), array("i"), array("Q")
    domains: dict[str, int] = {}
    with open(tokens_path, "wb") as tokens_out, open(meta_path, "w", encoding="utf-8") as meta_out:
        for batch in _batches(corpus):
            for doc, encoding in zip(batch, tokenizer.encode_batch([d.text for d in batch])):
                ids = np.asarray(encoding.ids, dtype=np.uint32)
                tokens_out.write(ids.tobytes())
                lengths.append(len(ids))
                domain_ids.append(domains.setdefault(doc.domain, len(domains)))
                keys.append(content_key(doc.text))
                meta_out.write(json.dumps({"id": doc.id, "domain": doc.domain, "source": doc.source},
                                          ensure_ascii=False) + "\n")
    names = sorted(domains)  # domain ids follow the sorted names, whatever the file order
    remap = np.array([names.index(name) for name in domains], dtype=np.int32)
    lengths_np = np.frombuffer(lengths, dtype=np.int64).copy()
    starts = np.zeros(len(lengths_np), dtype=np.int64)
    np.cumsum(lengths_np[:-1], out=starts[1:])
    total = int(lengths_np.sum())
    tokens = np.memmap(tokens_path, dtype=np.uint32, mode="r", shape=(total,)) if total else np.zeros(0, np.uint32)
    return TokenStore(tokens, starts, lengths_np, remap[np.frombuffer(domain_ids, dtype=np.int32)],
                      np.frombuffer(keys, dtype=np.uint64).copy(), names, meta_path)


def _batches(docs: Iterable[Document]) -> Iterator[list[Document]]:
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch
