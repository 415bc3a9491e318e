"""The files of a dataset directory: their layout, the atomic writers that write them, the manifest
reader, and which files of an output directory ``prepare`` may claim and clear.

Layout of a dataset directory (every file written to a temporary name, then ``os.replace``-d; the
manifest is written last, so a directory without ``manifest.json`` is never a dataset)::

    manifest.json               what is here: tokenizer, sizes, counts, ordering, seed, sources, checksums
    tokenizer.json              the tokenizer (``load_tokenizer``)
    {split}-00000.npy ...       token rows, dtype uint16 (vocab <= 65536) or uint32, [rows, context_len + 1]
    {split}.domain_tokens.npy   uint32 [rows, num_domains]: tokens of each domain in each row
    {split}.row_order.npy       int64 [rows]: the packed-stream row each stored row came from
    {split}.docs.npy            int64 [docs, 2]: (document index, offset of its first token in the stream)
    documents.jsonl             one line per input document: id, domain, source, tokens, split / why dropped
    sources.jsonl               one line per corpus file: path, bytes, sha256

``split`` is ``train`` or ``heldout``. A row holds ``context_len + 1`` tokens so that inputs
``row[:-1]`` and targets ``row[1:]`` are both ``context_len`` long.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from ..atomic import commit, fsync_dir, tmp_path
from .errors import DataError

FORMAT = "diffmoe-packed"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "heldout")


# --------------------------------------------------------------------------------------------- writing
def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = tmp_path(path)
    tmp.write_bytes(data)
    commit(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def write_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = tmp_path(path)
    with open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
    commit(tmp, path)


def write_lines_atomic(path: Path, lines) -> None:
    """Write an iterable of text lines (without newlines) atomically, streaming."""
    tmp = tmp_path(path)
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        for line in lines:
            fh.write(line)
            fh.write("\n")
    commit(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Writes ``total_rows`` rows of ``row_len`` tokens as ``{split}-NNNNN.npy`` shards of at most
    ``rows_per_shard`` rows, in the order :meth:`write` receives them."""

    def __init__(self, directory: Path, split: str, total_rows: int, row_len: int, rows_per_shard: int,
                 dtype: np.dtype):
        self.directory, self.split, self.row_len, self.dtype = directory, split, row_len, dtype
        self.sizes = [min(rows_per_shard, total_rows - s) for s in range(0, total_rows, rows_per_shard)]
        self.shards: list[dict] = []
        self._current: np.memmap | None = None
        self._tmp: Path | None = None
        self._filled = 0

    def write(self, rows: np.ndarray) -> None:
        """Append rows [m, row_len]."""
        while len(rows):
            if self._current is None:
                self._open()
            take = min(len(rows), len(self._current) - self._filled)
            self._current[self._filled:self._filled + take] = rows[:take]
            self._filled += take
            rows = rows[take:]
            if self._filled == len(self._current):
                self._close()

    def finish(self) -> list[dict]:
        """Shard entries for the manifest: ``{"file", "rows", "sha256"}``; every row must be written."""
        if self._current is not None or len(self.shards) != len(self.sizes):
            raise RuntimeError(f"{self.split}: shard writer finished before all rows were written")
        return self.shards

    def _open(self) -> None:
        path = self.directory / f"{self.split}-{len(self.shards):05d}.npy"
        self._tmp = tmp_path(path)
        shape = (self.sizes[len(self.shards)], self.row_len)
        self._current = np.lib.format.open_memmap(self._tmp, mode="w+", dtype=self.dtype, shape=shape)
        self._filled = 0

    def _close(self) -> None:
        self._current.flush()
        self._current = None
        path = self.directory / f"{self.split}-{len(self.shards):05d}.npy"
        commit(self._tmp, path)
        self.shards.append({"file": path.name, "rows": self.sizes[len(self.shards)], "sha256": sha256_file(path)})


# --------------------------------------------------------------------------------------------- reading
def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a prepared dataset; :class:`DataError` when the directory holds no complete one."""
    directory = Path(path)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        why = "does not exist" if not directory.exists() else (
            f"has no {MANIFEST}: not a prepared dataset, or `diffmoe prepare` was interrupted")
        raise DataError(f"no dataset at {directory}: the directory {why}")
    try:
        manifest = json.loads(manifest_path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{manifest_path}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{manifest_path}: not a {FORMAT} v{FORMAT_VERSION} manifest "
                        f"(format={manifest.get('format')!r}, version={manifest.get('format_version')!r})")
    return manifest


# -------------------------------------------------------------------------------- the output directory
WORKDIR = ".prepare-tmp"
_OUR_FILES = re.compile(
    r"(manifest\.json|tokenizer\.json|documents\.jsonl|sources\.jsonl"
    r"|(train|heldout)(-\d{5}\.npy|\.(domain_tokens|row_order|docs)\.npy))")


def _is_ours(name: str) -> bool:
    """Names ``prepare`` writes: final files, their temporaries (``.NAME.tmp-PID``), its work directory."""
    temporary = re.fullmatch(r"\.(.+)\.tmp-\d+", name)
    return name == WORKDIR or _OUR_FILES.fullmatch(temporary.group(1) if temporary else name) is not None


def claim(out: Path, overwrite: bool) -> None:
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
    if (out / MANIFEST).exists():
        if not overwrite:
            raise DataError(f"{out} already holds a prepared dataset; pass overwrite=True / --overwrite to "
                            "replace it")
        (out / MANIFEST).unlink()
        fsync_dir(out)
    remove_ours(out)


def remove_ours(out: Path, keep_workdir: bool = False) -> None:
    for path in out.iterdir():
        if not _is_ours(path.name) or (keep_workdir and path.name == WORKDIR):
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
