"""A prepared dataset on disk, and the loader a training loop uses.

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
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from ..atomic import commit, fsync_dir, tmp_path  # noqa: F401  (fsync_dir: used by prepare)
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


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a prepared dataset (``tokenizers.Tokenizer``; ``manifest["tokenizer"]["eod_id"]``
    is the end-of-document id)."""
    directory = Path(path)
    manifest = read_manifest(directory)
    tokenizer = Tokenizer.from_file(str(directory / manifest["tokenizer"]["file"]))
    tokenizer.encode_special_tokens = True
    return tokenizer


class PackedDataset(torch.utils.data.Dataset):
    """The rows of one split of a prepared dataset, memory-mapped.

    ``dataset[i]`` is a dict:
      - ``input_ids``: int64 [context_len], the row without its last token;
      - ``labels``: int64 [context_len], the row without its first token (next-token targets);
      - ``domain``: int64 [] (scalar), index into ``domains`` of the domain with most tokens in the row.

    ``domain_tokens`` (uint32 [rows, num_domains]) gives the full domain mix of each row.
    Train rows are shuffled; held-out rows are grouped by domain (in ``domains`` order), so all but at
    most ``num_domains - 1`` of them hold a single domain (see :meth:`rows_of_domain`).
    """

    def __init__(self, path: str | os.PathLike, split: str = "train", verify: bool = False):
        if split not in SPLITS:
            raise DataError(f"invalid split={split!r}: choose one of {', '.join(SPLITS)}")
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.split = split
        info = self.manifest["splits"][split]
        self.domains: list[str] = self.manifest["domains"]
        self.context_len: int = self.manifest["context_len"]
        self.row_len: int = self.manifest["row_len"]
        self.vocab_size: int = self.manifest["tokenizer"]["vocab_size"]
        self.eod_id: int = self.manifest["tokenizer"]["eod_id"]
        if verify:
            self.verify()
        self._shards = [self._open_shard(entry) for entry in info["shards"]]
        self._offsets = np.cumsum([0] + [len(s) for s in self._shards])
        self.domain_tokens = self._load_array(info["domain_tokens_file"])
        if len(self.domain_tokens) != len(self):
            raise DataError(f"{self.path}: {info['domain_tokens_file']} has {len(self.domain_tokens)} rows, "
                            f"the shards {len(self)}")

    def __getstate__(self) -> dict:
        # DataLoader workers started by spawn pickle the dataset: send paths, not the mapped arrays.
        return {k: v for k, v in self.__dict__.items() if k not in ("_shards", "domain_tokens")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        info = self.manifest["splits"][self.split]
        self._shards = [self._open_shard(entry) for entry in info["shards"]]
        self.domain_tokens = self._load_array(info["domain_tokens_file"])

    def _open_shard(self, entry: dict) -> np.ndarray:
        rows = self._load_array(entry["file"], mmap=True)
        if rows.shape != (entry["rows"], self.row_len):
            raise DataError(f"{self.path / entry['file']}: shape {rows.shape}, the manifest says "
                            f"({entry['rows']}, {self.row_len})")
        return rows

    def _load_array(self, name: str, mmap: bool = False) -> np.ndarray:
        file = self.path / name
        try:
            return np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{file}: missing or unreadable ({e})") from None

    def verify(self) -> None:
        """Check every file against the manifest's sha256; :class:`DataError` names the first mismatch."""
        for name, digest in self.manifest["files"].items():
            file = self.path / name
            if not file.is_file():
                raise DataError(f"{file}: missing (listed in {MANIFEST})")
            if sha256_file(file) != digest:
                raise DataError(f"{file}: checksum differs from {MANIFEST}: the dataset was modified")

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def row(self, index: int) -> np.ndarray:
        """Raw tokens of row ``index``: [row_len] in the dataset dtype (a view, no copy)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        index %= len(self)
        shard = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return self._shards[shard][index - self._offsets[shard]]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens = torch.from_numpy(self.row(index).astype(np.int64))
        return {"input_ids": tokens[:-1], "labels": tokens[1:],
                "domain": torch.tensor(int(np.argmax(self.domain_tokens[index])))}

    def rows_of_domain(self, domain: str, pure: bool = True) -> np.ndarray:
        """int64 indices of the rows whose tokens all come from ``domain`` (``pure``), or whose
        majority domain it is."""
        if domain not in self.domains:
            raise DataError(f"unknown domain {domain!r}: this dataset has {', '.join(self.domains)}")
        d = self.domains.index(domain)
        if pure:
            return np.flatnonzero(self.domain_tokens[:, d] == self.domain_tokens.sum(axis=1))
        return np.flatnonzero(np.argmax(self.domain_tokens, axis=1) == d)
