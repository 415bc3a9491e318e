"""Which files make up a corpus, and how they are cut into tasks.

A corpus is one or more *specs* (``--corpus`` arguments), each one of:

- a local directory, file or glob (``data/**/*.jsonl.gz``): every file of a known kind under it, in
  sorted path order (hidden files and folders and ``__pycache__`` skipped; a folder written by
  ``datasets.save_to_disk`` is read as a dataset);
- an fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``file:///...``), a directory, file or glob the
  same way (needs the filesystem's fsspec package, e.g. ``s3fs``);
- ``hf:NAME`` or ``hf:NAME:CONFIG``: a ``datasets`` builder or Hub dataset, streamed
  (``load_dataset(NAME, CONFIG, split=hf_split, data_files=hf_data_files, streaming=True)``), one task per
  shard of the stream;
- ``hf://datasets/OWNER/NAME[/PATTERN]``: the Hub dataset OWNER/NAME (its files matching PATTERN), streamed
  the same way.

Files of other kinds are counted by extension (``ignored``), never read, and reported. A ``.json`` file
that is one JSON document rather than JSON lines (``corpus.json``, a metadata file) is counted there too.

Names: with one spec a file's name is its path relative to the spec's root (the directory, or the part
of a glob before its first wildcard); with several, it is prefixed with the root's name (``c4/en/x.json.gz``),
made unique. Tasks (:func:`plan_tasks`) group consecutive files up to ``task_mb``; a larger Parquet file
is split by row groups. The split depends only on the files, so the output never depends on how many
workers run the tasks.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import DataError
from .readers import (
    SINGLE_DOMAIN,
    ReadOptions,
    SourceFile,
    _arrow_errors,
    _import_pyarrow,
    compression_of,
    load_streaming_dataset,
    open_binary,
)

TEXT_EXTENSIONS = frozenset(
    {
        ".txt",
        ".text",
        ".md",
        ".markdown",
        ".rst",
        ".tex",
        ".org",
        ".html",
        ".htm",
        ".xml",
        ".py",
        ".pyi",
        ".c",
        ".h",
        ".cc",
        ".cpp",
        ".hpp",
        ".java",
        ".js",
        ".ts",
        ".go",
        ".rs",
        ".rb",
        ".sh",
        ".css",
        ".yaml",
        ".yml",
        ".toml",
        ".ini",
        ".cfg",
    }
)
JSON_LINES_SUFFIXES = tuple(ext + comp for ext in (".jsonl", ".json") for comp in ("", ".gz", ".zst"))
TABLE_SUFFIXES = (".parquet",)
NOT_JSON_LINES = ".json (a JSON document, not JSON lines)"
_GLOB_CHARS = re.compile(r"[*?\[]")
_PEEK_BYTES = 1 << 20


@dataclass
class Found:
    """What :func:`discover` found: the files in read order, and files of other kinds by extension."""

    files: list[SourceFile]
    ignored: Counter


@dataclass(frozen=True)
class Part:
    """What a task reads of one file: all of it, or row groups ``[start, stop)`` of a Parquet file."""

    file: int
    row_groups: tuple[int, int] | None = None

    def to_list(self) -> list:
        return [self.file, list(self.row_groups) if self.row_groups else None]

    @classmethod
    def from_list(cls, data: list) -> "Part":
        return cls(data[0], tuple(data[1]) if data[1] is not None else None)


def kind_of(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(JSON_LINES_SUFFIXES):
        return "jsonl"
    if lower.endswith(TABLE_SUFFIXES):
        return "parquet"
    if PurePosixPath(lower).suffix in TEXT_EXTENSIONS:
        return "text"
    return None


def stem(name: str) -> str:
    base = PurePosixPath(name).name
    for suffix in JSON_LINES_SUFFIXES + TABLE_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return PurePosixPath(base).stem


def discover(specs: list[str], options: ReadOptions) -> Found:
    """The source files of ``specs`` (see the module docstring), in read order."""
    if not specs:
        raise DataError("no corpus given: pass at least one --corpus (a directory, file, glob, URL or hf:NAME)")
    labels = _labels(specs)
    files, ignored = [], Counter()
    for spec, label in zip(specs, labels):
        found = _discover_spec(spec, label if len(specs) > 1 else None, options)
        files.extend(found.files)
        ignored.update(found.ignored)
    if options.domain_from == "none":
        files = [SourceFile(**{**f.to_dict(), "domain": SINGLE_DOMAIN}) for f in files]
    return Found(files, ignored)


def _discover_spec(spec: str, label: str | None, options: ReadOptions) -> Found:
    if spec.startswith("hf:") and not spec.startswith("hf://"):
        name, _, config = spec[len("hf:") :].partition(":")
        return _hf_stream(spec, name, config or None, options.hf_data_files, label, options)
    if spec.startswith("hf://"):
        parts = spec[len("hf://") :].split("/")
        if len(parts) < 3 or parts[0] != "datasets":
            raise DataError(f"unsupported corpus {spec!r}: expected hf://datasets/OWNER/NAME[/PATTERN]")
        pattern = "/".join(parts[3:]) or options.hf_data_files
        return _hf_stream(spec, "/".join(parts[1:3]), None, pattern, label, options)
    return _Walker(spec, label, options).run()


def _labels(specs: list[str]) -> list[str]:
    """A unique name per spec: its root's last component (``c4``, ``code``), ``-2``... on repeats."""
    labels, seen = [], Counter()
    for spec in specs:
        if spec.startswith("hf:"):
            base = (
                spec.rstrip("/").split("/")[-1].split(":")[-1]
                if spec.startswith("hf://")
                else spec[len("hf:") :].split(":")[0].split("/")[-1]
            )
        else:
            root = _static_prefix(spec.rstrip("/")) if _GLOB_CHARS.search(spec) else spec.rstrip("/")
            base = stem(root.split("://")[-1].rstrip("/").split("/")[-1] or "corpus")
        seen[base] += 1
        labels.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return labels


def _static_prefix(pattern: str) -> str:
    """The directory part of a glob before its first wildcard: ``data/*/x.jsonl`` -> ``data``."""
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        if _GLOB_CHARS.search(part):
            return "/".join(parts[:i]) or ("/" if pattern.startswith("/") else ".")
    return "/".join(parts[:-1]) or "."


def _hf_stream(
    spec: str, name: str, config: str | None, data_files: str | None, label: str | None, options: ReadOptions
) -> Found:
    stream = {"name": name, "config": config, "split": options.hf_split, "data_files": data_files}
    shards = load_streaming_dataset(stream).num_shards
    base = f"hf:{name}" + (f":{config}" if config else "")
    domain = name.split("/")[-1]
    files = [
        SourceFile(
            location=spec,
            name=f"{label + '/' if label else ''}{base}/{i:05d}",
            kind="hf",
            domain=domain,
            hf={**stream, "shard": i, "shards": shards},
        )
        for i in range(shards)
    ]
    return Found(files, Counter())


class _Walker:
    """Lists one local or fsspec spec: a directory, a file or a glob."""

    def __init__(self, spec: str, label: str | None, options: ReadOptions):
        self.spec, self.label, self.options = spec, label, options
        self.url = "://" in spec
        if self.url:
            import fsspec

            try:
                self.fs, self.path = fsspec.core.url_to_fs(spec)
            except (ImportError, ValueError) as e:
                raise DataError(f"corpus {spec}: cannot open this URL ({e})") from None
        else:
            self.fs, self.path = None, spec
        self.ignored: Counter = Counter()

    # ------------------------------------------------------------------ filesystem
    def _exists(self, path: str) -> bool:
        return self.fs.exists(path) if self.url else os.path.exists(path)

    def _isdir(self, path: str) -> bool:
        return self.fs.isdir(path) if self.url else os.path.isdir(path)

    def _location(self, path: str) -> str:
        return self.fs.unstrip_protocol(path) if self.url else path

    def _stat(self, path: str) -> tuple[int, float | str | None]:
        if self.url:
            info = self.fs.info(path)
            version = next((info[k] for k in ("mtime", "LastModified", "updated", "ETag", "etag") if info.get(k)), None)
            return int(info.get("size") or 0), (
                version if isinstance(version, (int, float)) else None if version is None else str(version)
            )
        st = os.stat(path)
        return st.st_size, st.st_mtime

    def _list(self, root: str) -> list[str]:
        """Every file under ``root``, sorted, hidden and ``__pycache__`` folders skipped."""
        if self.url:
            out = self.fs.find(root, withdirs=False)
            return sorted(p for p in out if not _hidden(p[len(root) :].lstrip("/")))
        out = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
            out.extend(os.path.join(dirpath, n) for n in sorted(filenames) if not n.startswith("."))
        return out

    def _glob(self, pattern: str) -> list[str]:
        found = self.fs.glob(pattern) if self.url else glob.glob(pattern, recursive=True)
        return sorted(p for p in found if not self._isdir(p))

    # ------------------------------------------------------------------ listing
    def run(self) -> Found:
        path = self.path
        if _GLOB_CHARS.search(path):
            root = _static_prefix(path)
            paths = self._glob(path)
            if not paths:
                raise DataError(f"corpus {self.spec}: the pattern matches no file")
            return Found(self._files(root, paths), self.ignored)
        if not self._exists(path):
            raise DataError(f"corpus not found: {self.spec}")
        if not self._isdir(path):
            if kind_of(path) is None:
                raise DataError(
                    f"unsupported corpus file {self.spec}: expected a directory, a glob, a JSON lines "
                    f"file ({', '.join(JSON_LINES_SUFFIXES)}), a .parquet file, or a text file "
                    f"({', '.join(sorted(TEXT_EXTENSIONS))})"
                )
            name = PurePosixPath(path).name
            size, mtime = self._stat(path)
            return Found(
                [SourceFile(self._location(path), self._name(name), kind_of(name), stem(name), size, mtime)],
                self.ignored,
            )
        root = path.rstrip("/") or "/"
        if not self.url and (Path(root) / "dataset_dict.json").is_file():
            return Found(self._hf_dataset_dict(Path(root)), self.ignored)
        if not self.url and (Path(root) / "state.json").is_file():
            return Found(self._hf_dataset_files(Path(root), Path(root), Path(root).resolve().name), self.ignored)
        return Found(self._files(root, self._list(root)), self.ignored)

    def _files(self, root: str, paths: list[str]) -> list[SourceFile]:
        root_name = PurePosixPath(os.path.abspath(root) if not self.url else root).name or "corpus"
        rels = [
            os.path.relpath(p, root).replace(os.sep, "/") if not self.url else p[len(root.rstrip("/")) :].lstrip("/")
            for p in paths
        ]
        # folders written by datasets' save_to_disk (a state.json) are read as datasets, not as files
        datasets_dirs = {os.path.dirname(rel) for rel in rels if rel.endswith("/state.json") and not self.url}
        files, done_dirs = [], set()
        for path, rel in zip(paths, rels):
            parts = rel.split("/")
            folder = next((d for d in datasets_dirs if rel.startswith(d + "/")), None)
            if folder is not None:
                if folder not in done_dirs:
                    done_dirs.add(folder)
                    files.extend(self._hf_dataset_files(Path(root) / folder, Path(root), parts[0]))
                continue
            kind = kind_of(parts[-1])
            if kind is None:
                self.ignored[PurePosixPath(parts[-1]).suffix.lower() or "(no extension)"] += 1
                continue
            if kind == "jsonl" and parts[-1].lower().endswith(".json") and not self._json_lines(path):
                self.ignored[NOT_JSON_LINES] += 1
                continue
            if len(parts) > 1:
                domain = parts[0]
            else:
                domain = root_name if kind == "text" else stem(parts[-1])
            size, mtime = self._stat(path)
            files.append(SourceFile(self._location(path), self._name(rel), kind, domain, size, mtime))
        return files

    def _name(self, rel: str) -> str:
        return f"{self.label}/{rel}" if self.label else rel

    def _json_lines(self, path: str) -> bool:
        """Whether a ``.json`` file holds JSON lines: its first non-empty line is a whole JSON object (a
        first line longer than 1 MiB counts as JSON lines, so that its errors are reported)."""
        try:
            with open_binary(self._location(path)) as fh:
                head = fh.read(_PEEK_BYTES)
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e})") from None
        lines = [ln for ln in head.splitlines() if ln.strip()]
        if not lines:
            return True  # empty: read as JSON lines, which skips nothing
        if len(lines) == 1 and len(head) == _PEEK_BYTES:
            return True
        try:
            first = json.loads(lines[0])
        except (ValueError, RecursionError):
            first = None
        if isinstance(first, dict):
            return True
        # one JSON document (an object spread over lines, or an array) is not JSON lines; anything else is
        # read as JSON lines, so that its malformed lines are reported
        return not (
            lines[0].strip() in (b"{", b"[")
            or lines[0].lstrip().startswith(b"[")
            or (len(head) < _PEEK_BYTES and _parses(head))
        )

    def _hf_dataset_dict(self, path: Path) -> list[SourceFile]:
        try:
            splits = json.loads((path / "dataset_dict.json").read_text("utf-8"))["splits"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path / 'dataset_dict.json'}: not a readable datasets DatasetDict ({e})") from None
        split = self.options.hf_split
        if split not in splits:
            raise DataError(
                f"{path}: no split {split!r} in this DatasetDict (splits: {', '.join(splits)}); "
                "choose one with hf_split / --hf-split"
            )
        return self._hf_dataset_files(path / split, path, path.resolve().name)

    def _hf_dataset_files(self, path: Path, root: Path, domain: str) -> list[SourceFile]:
        """The Arrow files of a ``Dataset.save_to_disk`` directory, in the order its ``state.json`` lists."""
        state_file = path / "state.json"
        try:
            data_files = [entry["filename"] for entry in json.loads(state_file.read_text("utf-8"))["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{state_file}: not a readable datasets state file ({e})") from None
        files = []
        for name in data_files:
            full = path / name
            if not full.is_file():
                raise DataError(f"{state_file} lists {name}, which does not exist")
            size, mtime = self._stat(str(full))
            files.append(
                SourceFile(str(full), self._name(full.relative_to(root).as_posix()), "arrow", domain, size, mtime)
            )
        return files


def _parses(data: bytes) -> bool:
    try:
        json.loads(data)
        return True
    except (ValueError, RecursionError):
        return False


def _hidden(rel: str) -> bool:
    return any(p.startswith(".") or p == "__pycache__" for p in rel.split("/")[:-1]) or rel.split("/")[-1].startswith(
        "."
    )


# ------------------------------------------------------------------------------------------ tasks
def plan_tasks(files: list[SourceFile], task_mb: float) -> list[list[Part]]:
    """Tasks: lists of parts, consecutive files grouped until ``task_mb``; each streamed shard and each
    ``task_mb`` of a larger Parquet file (whole row groups) is a task of its own."""
    target = task_mb * 1e6
    tasks: list[list[Part]] = []
    current, size = [], 0
    for index, f in enumerate(files):
        if f.kind == "hf" or (f.kind == "parquet" and f.bytes > target):
            if current:
                tasks.append(current)
                current, size = [], 0
            ranges = _row_group_ranges(f, target) if f.kind == "parquet" else [None]
            tasks.extend([Part(index, r)] for r in ranges)
            continue
        current.append(Part(index))
        size += f.bytes
        if size >= target:
            tasks.append(current)
            current, size = [], 0
    if current:
        tasks.append(current)
    return tasks


def _row_group_ranges(f: SourceFile, target: float) -> list[tuple[int, int]]:
    """Contiguous row-group ranges of about ``target`` bytes each (compressed sizes from the footer)."""
    pq = _import_pyarrow(f.location, "parquet")
    try:
        with open_binary(f.location) as fh:
            meta = pq.ParquetFile(fh).metadata
            sizes = [
                sum(meta.row_group(g).column(c).total_compressed_size for c in range(meta.num_columns))
                for g in range(meta.num_row_groups)
            ]
    except _arrow_errors() as e:
        raise DataError(f"{f.location}: not a readable Parquet file ({e})") from None
    ranges, start, size = [], 0, 0
    for g, s in enumerate(sizes):
        size += s
        if size >= target:
            ranges.append((start, g + 1))
            start, size = g + 1, 0
    if start < len(sizes) or not ranges:
        ranges.append((start, len(sizes)))
    return ranges


def compression_summary(files: list[SourceFile]) -> dict[str, int]:
    """Files per kind (``jsonl.gz``, ``parquet``, ...), for the manifest."""
    counts = Counter()
    for f in files:
        comp = compression_of(f.location) if f.kind == "jsonl" else None
        counts[f.kind + ({"gzip": ".gz", "zstd": ".zst"}[comp] if comp else "")] += 1
    return dict(sorted(counts.items()))
