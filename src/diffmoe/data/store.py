"""The files of a dataset directory: their layout, the atomic writers that write them, and the manifest
reader.

Layout of a dataset directory (every file written to a temporary name, then ``os.replace``-d; the
manifest is written last, so a directory without ``manifest.json`` is never a dataset; while ``prepare``
runs, its work directory ``.prepare-tmp`` is here too, see :mod:`.workdir`)::

    manifest.json               what is here: tokenizer, sizes, counts, ordering, seed, sources, checksums
    tokenizer.json              the tokenizer (``load_tokenizer``)
    {split}-00000.npy ...       token rows, dtype uint16 (vocab <= 65536) or uint32, [rows, context_len + 1]
    {split}.domain_tokens.npy   uint32 [rows, num_domains]: tokens of each domain in each row
    {split}.row_order.npy       int64 [rows]: the packed-stream row each stored row came from
    {split}.docs.npy            int64 [docs, 2]: (document index, offset of its first token in the stream)
    documents.jsonl             one line per input document: id, domain, source, tokens, split / why dropped
    sources.jsonl               one line per corpus file: path (its name), bytes, sha256

``split`` is ``train`` or ``heldout``. A row holds ``context_len + 1`` tokens so that inputs
``row[:-1]`` and targets ``row[1:]`` are both ``context_len`` long.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..atomic import commit, fsync_dir, sha256_file, tmp_path  # noqa: F401  (re-exported for the stages)
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


# --------------------------------------------------------------------------------------------- reading
def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a prepared dataset; :class:`DataError` when the directory holds no complete one."""
    directory = Path(path)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        why = (
            "does not exist"
            if not directory.exists()
            else (f"has no {MANIFEST}: not a prepared dataset, or `diffmoe prepare` was interrupted")
        )
        raise DataError(f"no dataset at {directory}: the directory {why}")
    try:
        manifest = json.loads(manifest_path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{manifest_path}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{manifest_path}: not a {FORMAT} v{FORMAT_VERSION} manifest "
            f"(format={manifest.get('format')!r}, version={manifest.get('format_version')!r})"
        )
    return manifest
