"""The tokenized corpus inside ``prepare``'s work directory: one folder per read task, and the global
per-document table built from them.

``tok/NNNNN/`` (written by the tokenize stage, renamed into place when complete)::

    tokens.bin          uint32 [task tokens]: the task's documents' ids, concatenated
    lengths.npy         int64 [docs]: tokens per document (BOS included)
    keys.npy            uint64 [docs]: content hash of each document's text
    domains.npy         int32 [docs]: index into domain_names.json
    domain_names.json   the domains named in this task, in order of appearance
    meta.jsonl          one line per document: id, domain, source

``global/`` (the merge, once all tasks are done): ``task_docs.npy`` int64 [tasks + 1] (first document
of each task; global document index = task offset + position in the task, i.e. read order),
``lengths.npy``, ``keys.npy``, ``local_start.npy`` (offset in the task's ``tokens.bin``), ``domain_ids.npy``
(into the sorted domain names of ``domains.json``).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .errors import DataError

TOKEN_DTYPE = np.dtype("<u4")


def task_dir(work: Path, index: int) -> Path:
    return Path(work) / "tok" / f"{index:05d}"


def merge_tasks(work: Path, tasks: int) -> dict:
    """Build ``global/``'s document table from the task folders; returns ``{"documents", "tokens", "domains"}``."""
    work = Path(work)
    out = work / "global"
    out.mkdir(parents=True, exist_ok=True)
    names: list[list[str]] = []
    counts = np.zeros(tasks + 1, dtype=np.int64)
    for t in range(tasks):
        folder = task_dir(work, t)
        names.append(json.loads((folder / "domain_names.json").read_text("utf-8")))
        counts[t + 1] = len(np.load(folder / "lengths.npy", mmap_mode="r"))
    offsets = np.cumsum(counts)
    domains = sorted({name for task_names in names for name in task_names})
    index = {name: i for i, name in enumerate(domains)}
    n = int(offsets[-1])
    lengths = np.lib.format.open_memmap(out / "lengths.npy", mode="w+", dtype=np.int64, shape=(n,))
    keys = np.lib.format.open_memmap(out / "keys.npy", mode="w+", dtype=np.uint64, shape=(n,))
    starts = np.lib.format.open_memmap(out / "local_start.npy", mode="w+", dtype=np.int64, shape=(n,))
    domain_ids = np.lib.format.open_memmap(out / "domain_ids.npy", mode="w+", dtype=np.int32, shape=(n,))
    for t in range(tasks):
        folder, sl = task_dir(work, t), slice(int(offsets[t]), int(offsets[t + 1]))
        task_lengths = np.load(folder / "lengths.npy")
        lengths[sl] = task_lengths
        keys[sl] = np.load(folder / "keys.npy")
        starts[sl] = np.concatenate([[0], np.cumsum(task_lengths)[:-1]]) if len(task_lengths) else task_lengths
        remap = np.array([index[name] for name in names[t]], dtype=np.int32)
        local = np.load(folder / "domains.npy")
        domain_ids[sl] = remap[local] if len(local) else local
    for array in (lengths, keys, starts, domain_ids):
        array.flush()
    np.save(out / "task_docs.npy", offsets)
    (out / "domains.json").write_text(json.dumps(domains), encoding="utf-8")
    return {"documents": n, "tokens": int(np.asarray(lengths).sum()), "domains": domains}


class DocumentTable:
    """The global per-document arrays of ``global/`` (memory-mapped) and random access to documents' ids.

    ``doc(i)``: uint32 [length] token ids of document ``i``; ``docs(indices)``: a list of them. File
    handles of task token files are kept in a small LRU, read with ``os.pread``.
    """

    def __init__(self, work: Path, max_open: int = 128):
        self.work = Path(work)
        g = self.work / "global"
        self.task_docs = np.load(g / "task_docs.npy")
        self.lengths = np.load(g / "lengths.npy", mmap_mode="r")
        self.keys = np.load(g / "keys.npy", mmap_mode="r")
        self.local_start = np.load(g / "local_start.npy", mmap_mode="r")
        self.domain_ids = np.load(g / "domain_ids.npy", mmap_mode="r")
        self.domains: list[str] = json.loads((g / "domains.json").read_text("utf-8"))
        self._files: OrderedDict[int, int] = OrderedDict()
        self._max_open = max_open

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def tasks(self) -> int:
        return len(self.task_docs) - 1

    def task_of(self, doc: int) -> int:
        return int(np.searchsorted(self.task_docs, doc, side="right")) - 1

    def task_range(self, task: int) -> range:
        return range(int(self.task_docs[task]), int(self.task_docs[task + 1]))

    def doc(self, index: int) -> np.ndarray:
        """Token ids of document ``index``: uint32 [length]."""
        return self.doc_slice(index, 0, int(self.lengths[index]))

    def doc_slice(self, index: int, start: int, stop: int) -> np.ndarray:
        """Tokens ``start:stop`` of document ``index`` (0 <= start <= stop <= its length)."""
        task = self.task_of(index)
        data = os.pread(self._fd(task), (stop - start) * 4, (int(self.local_start[index]) + start) * 4)
        if len(data) != (stop - start) * 4:
            raise DataError(
                f"{task_dir(self.work, task) / 'tokens.bin'}: shorter than its lengths.npy says "
                "(the work directory was damaged; rerun with --overwrite)"
            )
        return np.frombuffer(data, dtype=TOKEN_DTYPE)

    def docs(self, indices) -> list[np.ndarray]:
        return [self.doc(int(i)) for i in indices]

    def _fd(self, task: int) -> int:
        fd = self._files.get(task)
        if fd is not None:
            self._files.move_to_end(task)
            return fd
        if len(self._files) >= self._max_open:
            _, old = self._files.popitem(last=False)
            os.close(old)
        fd = os.open(task_dir(self.work, task) / "tokens.bin", os.O_RDONLY)
        self._files[task] = fd
        return fd

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __getstate__(self):
        return {"work": self.work, "_max_open": self._max_open}

    def __setstate__(self, state) -> None:
        self.__init__(state["work"], state["_max_open"])

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
