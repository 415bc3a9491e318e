"""``prepare``'s per-shard stages, each a list of independent tasks run by :mod:`.engine`.

Every stage reads its inputs from the work directory (what earlier stages and the coordinator wrote)
and writes its outputs under temporary names, renamed into place when complete:

- :class:`SampleStage`: the documents that train the BPE (a seeded hash of their content) -> ``sample/``;
- :class:`TokenizeStage`: read + tokenize + hash a group of source files -> ``tok/NNNNN/`` (:mod:`.tokens`);
- :class:`EmbedStage`: search vectors of a read task's candidate documents -> ``emb/NNNNN.npy``;
- :class:`ScoreStage`: the exact similarity of each of their kNN edges -> ``sim/NNNNN.npy``;
- :class:`WriteStage`: one output shard of packed rows -> ``{split}-NNNNN.npy`` in the dataset;
- :class:`DocumentsStage`: a read task's lines of ``documents.jsonl`` -> ``docs/NNNNN.jsonl``.

A task's result depends only on its inputs, never on which worker runs it or when.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from . import store as st
from .config import PrepareConfig
from .embed import MINILM_MAX_TOKENS, TfidfModel, minilm_vectors, sparse_pair_cosine
from .engine import ShardStage, TaskProgress
from .order import EXACT_DUP, STATUS_NAMES
from .pack import PackPlan, assemble_rows
from .readers import PartReader, ReadStats, SourceFile, open_binary
from .sources import Part
from .split import content_key, mix64
from .tokenizer import Vocab
from .tokens import TOKEN_DTYPE, DocumentTable, task_dir

_BATCH_DOCS = 512
_BATCH_CHARS = 8 << 20
_BLOCK_DOCS = 4096
_SCORE_BLOCK = 1 << 16
"""Query rows scored together: their neighbours' TF-IDF rows are built once per block."""


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    st.write_npy_atomic(path, array)


def _atomic_lines(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    st.write_lines_atomic(path, lines)


class _ReadStage(ShardStage):
    """A stage over the read tasks (groups of source files)."""

    unit = "MB"

    def __init__(self, work: Path, config: PrepareConfig, files: list[SourceFile], tasks: list[list[Part]]):
        self.work, self.config = str(work), config
        self.files, self.tasks = files, tasks

    def sizes(self) -> list[float]:
        return [sum(self.files[p.file].bytes for p in task) / 1e6 for task in self.tasks]

    def documents(self, index: int, stats: ReadStats, progress: TaskProgress):
        reader = PartReader(self.config.read, stats)
        for part in self.tasks[index]:
            f = self.files[part.file]
            share = f.bytes / 1e6
            for doc in reader.read(f, part.row_groups):
                yield doc
            progress.advance(share)


class SampleStage(_ReadStage):
    """The texts that train the BPE: each document with probability ``limit / 2**64``, decided by a hash of
    its content (all of them when ``limit`` is None)."""

    name = "sample"

    def __init__(self, work, config, files, tasks, limit: int | None):
        super().__init__(work, config, files, tasks)
        self.limit = limit

    def run_task(self, index: int, progress: TaskProgress) -> dict:
        stats = ReadStats()
        texts, size = [], 0
        for doc in self.documents(index, stats, progress):
            if self.limit is None or int(mix64(np.array([content_key(doc.text)], np.uint64))[0]) < self.limit:
                texts.append(json.dumps(doc.text, ensure_ascii=False))
                size += len(doc.text.encode("utf-8"))
        _atomic_lines(Path(self.work) / "sample" / f"{index:05d}.jsonl", texts)
        return {"documents": len(texts), "bytes": size}


def sample_texts(work: Path, tasks: int, max_bytes: float | None = None):
    """The sampled texts in task order (up to ``max_bytes`` of them when given)."""
    size = 0
    for t in range(tasks):
        with open(Path(work) / "sample" / f"{t:05d}.jsonl", encoding="utf-8") as fh:
            for line in fh:
                text = json.loads(line)
                size += len(text.encode("utf-8"))
                if max_bytes is not None and size > max_bytes:
                    return
                yield text


class TokenizeStage(_ReadStage):
    """Read, tokenize and hash the documents of a read task into ``tok/NNNNN/``; hash its whole source files."""

    name = "tokenize"

    def run_task(self, index: int, progress: TaskProgress) -> dict:
        vocab = Vocab.load(Path(self.work))
        final = task_dir(Path(self.work), index)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        stats = ReadStats()
        lengths, keys, domain_of, names = [], [], [], {}
        with open(tmp / "tokens.bin", "wb") as tokens, open(tmp / "meta.jsonl", "w", encoding="utf-8") as meta:
            for batch in _batches(self.documents(index, stats, progress)):
                for doc, ids in zip(batch, vocab.encode_batch([d.text for d in batch])):
                    tokens.write(np.asarray(ids, dtype=TOKEN_DTYPE).tobytes())
                    lengths.append(len(ids))
                    keys.append(content_key(doc.text))
                    domain_of.append(names.setdefault(doc.domain, len(names)))
                    meta.write(
                        json.dumps({"id": doc.id, "domain": doc.domain, "source": doc.source}, ensure_ascii=False)
                        + "\n"
                    )
        np.save(tmp / "lengths.npy", np.asarray(lengths, dtype=np.int64))
        np.save(tmp / "keys.npy", np.asarray(keys, dtype=np.uint64))
        np.save(tmp / "domains.npy", np.asarray(domain_of, dtype=np.int32))
        (tmp / "domain_names.json").write_text(json.dumps(list(names), ensure_ascii=False), encoding="utf-8")
        _fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        st.fsync_dir(final.parent)
        return {
            "stats": stats.to_dict(),
            "documents": len(lengths),
            "tokens": int(sum(lengths)),
            "sources": [
                self._source_entry(p) for p in self.tasks[index] if p.row_groups is None or p.row_groups[0] == 0
            ],
        }

    def _source_entry(self, part: Part) -> dict:
        f = self.files[part.file]
        if f.kind == "hf":
            return {"path": f.name, "dataset": {k: f.hf[k] for k in ("name", "config", "split", "data_files")}}
        h = hashlib.sha256()
        with open_binary(f.location) as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return {"path": f.name, "bytes": f.bytes, "sha256": h.hexdigest()}


def _batches(docs):
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    st.fsync_dir(directory)


class _DocStage(ShardStage):
    """A stage over the read tasks' documents, once they are merged into ``global/``."""

    unit = "docs"

    def __init__(self, work: Path, config: PrepareConfig):
        self.work, self.config = str(work), config
        self.task_docs = np.load(Path(work) / "global" / "task_docs.npy")

    def sizes(self) -> list[float]:
        return np.diff(self.task_docs).astype(float).tolist()

    def _global(self, name: str) -> np.ndarray:
        return np.load(Path(self.work) / "global" / name, mmap_mode="r")


class EmbedStage(_DocStage):
    """Search vectors of a read task's candidate documents (all but exact duplicates) -> ``emb/NNNNN.npy``."""

    name = "embed"

    def run_task(self, index: int, progress: TaskProgress) -> dict:
        work = Path(self.work)
        table = DocumentTable(work)
        status = self._global("status.npy")
        docs = [i for i in table.task_range(index) if status[i] != EXACT_DUP]
        blocks = []
        if self.config.ordering.embedding == "tfidf":
            model = TfidfModel.load(work / "global")
            for start in range(0, len(docs), _BLOCK_DOCS):
                blocks.append(model.vectors(table.docs(docs[start : start + _BLOCK_DOCS])))
                progress.advance(len(blocks[-1]))
            vectors = np.concatenate(blocks) if blocks else np.zeros((0, _tfidf_dims(model)), np.float32)
        else:
            vocab = Vocab.load(work)
            skip = len(vocab.bos_ids)
            texts = vocab.tokenizer.decode_batch([table.doc(i)[skip : skip + MINILM_MAX_TOKENS].tolist() for i in docs])
            vectors = minilm_vectors(texts)
        _atomic_npy(work / "emb" / f"{index:05d}.npy", vectors.astype(np.float32))
        table.close()
        return {"documents": len(docs)}


def _tfidf_dims(model: TfidfModel) -> int:
    return 1 if model.components is None else len(model.components)


class ScoreStage(_DocStage):
    """The exact similarity of each kNN edge of a read task's candidates -> ``sim/NNNNN.npy`` (float32
    [rows, k], NaN where there is no neighbour): sparse TF-IDF cosine, or the MiniLM vectors' dot product."""

    name = "score"

    def run_task(self, index: int, progress: TaskProgress) -> dict:
        work = Path(self.work)
        cand_task = self._global("candidate_tasks.npy")
        candidates = self._global("candidates.npy")
        neighbours = self._global("knn_ids.npy")
        rows = np.arange(int(cand_task[index]), int(cand_task[index + 1]))
        out = np.full((len(rows), neighbours.shape[1]), np.nan, dtype=np.float32)
        tfidf = self.config.ordering.embedding == "tfidf"
        table = DocumentTable(work) if tfidf else None
        model = TfidfModel.load(work / "global") if tfidf else None
        vectors = None if tfidf else self._global("vectors.npy")
        for start in range(0, len(rows), _SCORE_BLOCK):
            block = rows[start : start + _SCORE_BLOCK]
            nbr = np.asarray(neighbours[block])
            valid = nbr >= 0
            q = np.repeat(np.arange(len(block)), nbr.shape[1]).reshape(nbr.shape)[valid]
            n = nbr[valid]
            if tfidf:
                query_docs = np.asarray(candidates[block])
                others = np.unique(n)
                xq = model.matrix(table.docs(query_docs))
                xn = model.matrix(table.docs(np.asarray(candidates[others])))
                sims = sparse_pair_cosine(xq[q], xn[np.searchsorted(others, n)])
            else:
                sims = np.einsum("pd,pd->p", np.asarray(vectors[block])[q], np.asarray(vectors[n]))
            part = out[start : start + len(block)]
            part[valid] = sims
            progress.advance(len(block))
        _atomic_npy(work / "sim" / f"{index:05d}.npy", out)
        if table is not None:
            table.close()
        return {"rows": len(rows)}


class DocumentsStage(_DocStage):
    """A read task's lines of ``documents.jsonl``: id, domain, source, index, tokens, split, duplicate_of."""

    name = "documents"

    def run_task(self, index: int, progress: TaskProgress) -> dict:
        work = Path(self.work)
        first = int(self.task_docs[index])
        status, duplicate_of = self._global("final_status.npy"), self._global("final_duplicate_of.npy")
        lengths = self._global("lengths.npy")

        def lines():
            with open(task_dir(work, index) / "meta.jsonl", encoding="utf-8") as meta:
                for i, line in enumerate(meta, first):
                    record = json.loads(line)
                    record.update(index=i, tokens=int(lengths[i]), split=STATUS_NAMES[status[i]])
                    if duplicate_of[i] >= 0:
                        record["duplicate_of"] = int(duplicate_of[i])
                    yield json.dumps(record, ensure_ascii=False)

        _atomic_lines(work / "docs" / f"{index:05d}.jsonl", lines())
        progress.advance(self.sizes()[index])
        return {"lines": int(self.task_docs[index + 1]) - first}


class WriteStage(ShardStage):
    """One output shard: its rows of a split's packed stream, in the stored (shuffled) order."""

    name = "write"
    unit = "rows"

    def __init__(self, work: Path, out: Path, shards: list[dict], dtype: str, eod_id: int, row_len: int):
        self.work, self.out, self.shards = str(work), str(out), shards
        self.dtype, self.eod_id, self.row_len = dtype, eod_id, row_len

    def sizes(self) -> list[float]:
        return [float(s["rows"]) for s in self.shards]

    def run_task(self, index: int, progress: TaskProgress) -> dict:
        work, shard = Path(self.work), self.shards[index]
        split = shard["split"]
        g = work / "global"
        order = np.load(g / f"{split}.order.npy", mmap_mode="r")
        table = DocumentTable(work)
        plan = PackPlan(
            np.asarray(order),
            np.load(g / f"{split}.starts.npy"),
            np.asarray(table.lengths[np.asarray(order)], dtype=np.int64) + 1,
            0,
            self.row_len,
        )
        row_order = np.load(g / f"{split}.row_order.npy", mmap_mode="r")
        path = Path(self.out) / shard["file"]
        tmp = st.tmp_path(path)
        rows = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.dtype(self.dtype), shape=(shard["rows"], self.row_len)
        )
        for start in range(0, shard["rows"], _BLOCK_DOCS):
            stop = min(start + _BLOCK_DOCS, shard["rows"])
            wanted = np.asarray(row_order[shard["first"] + start : shard["first"] + stop], dtype=np.int64)
            rows[start:stop] = assemble_rows(table, plan, wanted, self.eod_id, np.dtype(self.dtype))
            progress.advance(stop - start)
        rows.flush()
        del rows
        st.commit(tmp, path)
        table.close()
        return {"file": shard["file"], "rows": shard["rows"], "sha256": st.sha256_file(path)}
