"""Atomic file writes: write a temporary file next to the target, flush it to disk, rename it into
place. Readers see the old file or the new one, never a half-written one."""

from __future__ import annotations

import os
from pathlib import Path


def tmp_path(path: Path) -> Path:
    """The temporary name ``path`` is written under (hidden, per process)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, path: Path) -> None:
    """Flush ``tmp`` to disk and move it to ``path`` in one step."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = tmp_path(path)
    tmp.write_text(text, encoding="utf-8")
    commit(tmp, path)


def sha256_file(path: Path, flush: bool = False) -> str:
    """The hex SHA-256 of a file's bytes; ``flush``: also fsync it (a checkpoint's files, before their
    digests are recorded)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
        if flush:
            os.fsync(fh.fileno())
    return digest.hexdigest()
