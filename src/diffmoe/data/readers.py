"""Documents in: a directory of text files, JSONL, Parquet, or a local Hugging Face ``datasets`` directory.

``Corpus(path)`` finds the files once and streams :class:`Document` objects each time it is iterated:
one file, one JSONL line or one table row at a time, so memory stays bounded whatever the corpus size.

Layouts (``path`` may be any of them):

- a directory: every file with a text extension (``TEXT_EXTENSIONS``) is one document; ``.jsonl``,
  ``.jsonl.gz`` and ``.parquet`` files inside it are read as below. Hidden files and folders are
  skipped; other files are counted in ``Corpus.ignored`` by extension.
- a ``.jsonl`` / ``.jsonl.gz`` file: one JSON object per line with a string ``text`` field (name set
  by ``text_field``) and optional ``domain`` and ``id``.
- a ``.parquet`` file: the same fields as columns.
- a directory written by ``datasets.Dataset.save_to_disk`` (``state.json``) or
  ``DatasetDict.save_to_disk`` (``dataset_dict.json``; the split is ``hf_split``).

A document's domain is, in order: its record's ``domain`` field; the top-level folder it sits in
under a corpus directory; for a JSONL / Parquet file at the top, the file name without suffix; for a
text file at the top, the corpus directory's name.

Empty (whitespace-only) documents are always skipped and counted. Binary files, invalid UTF-8,
malformed JSON lines and records without a string text field are bad input: with
``on_bad_input="error"`` (the default) they raise :class:`DataError` naming the file and line; with
``"skip"`` they are skipped and counted in ``Corpus.stats``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError

TEXT_EXTENSIONS = frozenset({
    ".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".org", ".html", ".htm", ".xml",
    ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".js", ".ts", ".go", ".rs", ".rb",
    ".sh", ".css", ".yaml", ".yml", ".toml", ".ini", ".cfg",
})
BAD_INPUT_POLICIES = ("error", "skip")
_BINARY_PROBE_BYTES = 8192
_TABLE_BATCH_ROWS = 1024


@dataclass(frozen=True)
class Document:
    """One document: its text, domain, a stable id and the file it came from (relative path)."""

    text: str
    domain: str
    id: str
    source: str


@dataclass
class ReadOptions:
    """How a corpus is read."""

    text_field: str = "text"
    """Name of the text field in JSONL records and Parquet / Arrow columns."""
    on_bad_input: str = "error"
    """``error``: raise on bad input, naming file and line. ``skip``: skip it and count it."""
    hf_split: str = "train"
    """Split read from a ``DatasetDict.save_to_disk`` directory."""

    def validate(self) -> None:
        if self.on_bad_input not in BAD_INPUT_POLICIES:
            raise DataError(f"invalid on_bad_input={self.on_bad_input!r}: choose one of "
                            f"{', '.join(BAD_INPUT_POLICIES)}")
        if not self.text_field:
            raise DataError("invalid text_field='': must name a field")


@dataclass
class ReadStats:
    """Counts of one pass over a corpus."""

    documents: int = 0
    skipped: Counter = field(default_factory=Counter)
    """reason -> documents skipped (``empty``, ``binary``, ``invalid_utf8``, ``malformed_json``,
    ``bad_record``)."""
    first_skipped: dict[str, str] = field(default_factory=dict)
    """reason -> where the first such document was (``file`` or ``file:line``)."""


@dataclass(frozen=True)
class SourceFile:
    """A file of the corpus: ``kind`` is ``text``, ``jsonl``, ``parquet`` or ``arrow``."""

    path: Path
    relpath: str
    kind: str
    domain: str


class Corpus:
    """A corpus on disk, iterated as a stream of :class:`Document` (re-iterable, same order each time)."""

    def __init__(self, path: str | os.PathLike, options: ReadOptions | None = None):
        self.options = options or ReadOptions()
        self.options.validate()
        self.path = Path(path)
        self.ignored: Counter = Counter()
        self.files = self._discover()
        self.stats = ReadStats()

    # ---------------------------------------------------------------------------------------- files
    def _discover(self) -> list[SourceFile]:
        path = self.path
        if not path.exists():
            raise DataError(f"corpus not found: {path}")
        if path.is_file():
            kind = _kind_of(path.name)
            if kind is None:
                raise DataError(f"unsupported corpus file {path}: expected a directory, .jsonl, .jsonl.gz "
                                f"or .parquet file, or a text file ({', '.join(sorted(TEXT_EXTENSIONS))})")
            return [SourceFile(path, path.name, kind, _stem(path.name))]
        if (path / "dataset_dict.json").is_file():
            return self._hf_dataset_dict(path)
        if (path / "state.json").is_file():
            return _hf_dataset_files(path, path.name)
        files = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                full = Path(dirpath) / name
                rel = full.relative_to(path)
                kind = _kind_of(name)
                if kind is None:
                    self.ignored[full.suffix.lower() or "(no extension)"] += 1
                    continue
                if len(rel.parts) > 1:
                    domain = rel.parts[0]
                else:
                    domain = path.resolve().name if kind == "text" else _stem(name)
                files.append(SourceFile(full, rel.as_posix(), kind, domain))
        return files

    def _hf_dataset_dict(self, path: Path) -> list[SourceFile]:
        try:
            splits = json.loads((path / "dataset_dict.json").read_text("utf-8"))["splits"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path / 'dataset_dict.json'}: not a readable datasets DatasetDict ({e})") from None
        split = self.options.hf_split
        if split not in splits:
            raise DataError(f"{path}: no split {split!r} in this DatasetDict (splits: {', '.join(splits)}); "
                            "choose one with hf_split / --hf-split")
        return _hf_dataset_files(path / split, path.name, root=path)

    @property
    def total_bytes(self) -> int:
        """Size of all corpus files on disk."""
        return sum(f.path.stat().st_size for f in self.files)

    def fingerprints(self) -> list[dict]:
        """One entry per file: ``{"path": relative path, "bytes": size, "sha256": content hash}``."""
        out = []
        for f in self.files:
            h = hashlib.sha256()
            with open(f.path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            out.append({"path": f.relpath, "bytes": f.path.stat().st_size, "sha256": h.hexdigest()})
        return out

    # ---------------------------------------------------------------------------------------- reading
    def __iter__(self) -> Iterator[Document]:
        self.stats = ReadStats()
        readers = {"text": self._read_text, "jsonl": self._read_jsonl,
                   "parquet": self._read_parquet, "arrow": self._read_arrow}
        for f in self.files:
            for doc in readers[f.kind](f):
                self.stats.documents += 1
                yield doc

    def _skip(self, reason: str, where: str, message: str | None = None) -> None:
        """Count a skipped document; raise instead for bad input under ``on_bad_input="error"``."""
        if message is not None and self.options.on_bad_input == "error":
            raise DataError(f"{where}: {message} (set on_bad_input=skip / --on-bad-input skip to skip "
                            "and count such input)")
        self.stats.skipped[reason] += 1
        self.stats.first_skipped.setdefault(reason, where)

    def _read_text(self, f: SourceFile) -> Iterator[Document]:
        data = f.path.read_bytes()
        where = str(f.path)
        if b"\x00" in data[:_BINARY_PROBE_BYTES]:
            self._skip("binary", where, "binary file (NUL byte in the first 8 KiB)")
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            self._skip("invalid_utf8", where, f"invalid UTF-8 at byte {e.start}")
            return
        text = text.removeprefix("\ufeff")
        if not text.strip():
            self._skip("empty", where)
            return
        yield Document(text, f.domain, f.relpath, f.relpath)

    def _read_jsonl(self, f: SourceFile) -> Iterator[Document]:
        opener = gzip.open if f.path.name.lower().endswith(".gz") else open
        try:
            with opener(f.path, "rb") as fh:
                for lineno, raw in enumerate(fh, 1):
                    if not raw.strip():
                        continue
                    where = f"{f.path}:{lineno}"
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        self._skip("invalid_utf8", where, f"invalid UTF-8 at byte {e.start} of the line")
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        self._skip("malformed_json", where, f"malformed JSON: {e.msg} (column {e.colno})")
                        continue
                    except RecursionError:
                        self._skip("malformed_json", where, "malformed JSON: nested too deeply")
                        continue
                    if not isinstance(record, dict):
                        self._skip("malformed_json", where,
                                   f"expected a JSON object, got {type(record).__name__}")
                        continue
                    doc = self._record(record, where, f, f"{f.relpath}:{lineno}")
                    if doc is not None:
                        yield doc
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise DataError(f"{f.path}: not a readable gzip file ({e})") from None

    def _read_parquet(self, f: SourceFile) -> Iterator[Document]:
        pq = _import_pyarrow(f.path, "parquet")
        try:
            table = pq.ParquetFile(f.path)
            columns = self._columns(f, table.schema_arrow.names)
            yield from self._read_batches(f, table.iter_batches(batch_size=_TABLE_BATCH_ROWS, columns=columns))
        except _arrow_errors() as e:
            raise DataError(f"{f.path}: not a readable Parquet file ({e})") from None

    def _read_arrow(self, f: SourceFile) -> Iterator[Document]:
        pa = _import_pyarrow(f.path, "arrow")
        try:
            with pa.memory_map(str(f.path)) as source:
                reader = pa.ipc.open_stream(source)
                columns = self._columns(f, reader.schema.names)
                yield from self._read_batches(f, (batch.select(columns) for batch in reader))
        except _arrow_errors() as e:
            raise DataError(f"{f.path}: not a readable Arrow stream file ({e})") from None

    def _columns(self, f: SourceFile, names: list[str]) -> list[str]:
        text_field = self.options.text_field
        if text_field not in names:
            raise DataError(f"{f.path}: no {text_field!r} column (columns: {', '.join(names)}); "
                            "name the text column with text_field / --text-field")
        return [text_field] + [c for c in ("domain", "id") if c in names]

    def _read_batches(self, f: SourceFile, batches: Iterable) -> Iterator[Document]:
        row = 0
        for batch in batches:
            columns = batch.to_pydict()
            names = list(columns)
            for values in zip(*columns.values()):
                row += 1
                doc = self._record(dict(zip(names, values)), f"{f.path}: row {row}", f, f"{f.relpath}:{row}")
                if doc is not None:
                    yield doc

    def _record(self, record: Mapping, where: str, f: SourceFile, default_id: str) -> Document | None:
        text_field = self.options.text_field
        text = record.get(text_field)
        if not isinstance(text, str):
            problem = (f"no {text_field!r} field (fields: {', '.join(map(str, record)) or 'none'})"
                       if text is None else f"field {text_field!r} must be a string, got {type(text).__name__}")
            self._skip("bad_record", where, problem)
            return None
        domain = record.get("domain")
        if domain is None:
            domain = f.domain
        elif not isinstance(domain, str) or not domain.strip():
            self._skip("bad_record", where, f"field 'domain' must be a non-empty string, got {domain!r}")
            return None
        if not text.strip():
            self._skip("empty", where)
            return None
        for name, value in (("text", text), ("domain", domain)):
            try:  # JSON may escape a lone surrogate ("\ud800"), which no text file can hold
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                self._skip("invalid_utf8", where, f"field {name!r}: invalid Unicode (a lone surrogate at "
                                                  f"character {e.start})")
                return None
        doc_id = record.get("id")
        return Document(text, domain, default_id if doc_id is None else str(doc_id), f.relpath)


def _kind_of(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if lower.endswith(".parquet"):
        return "parquet"
    if Path(lower).suffix in TEXT_EXTENSIONS:
        return "text"
    return None


def _stem(name: str) -> str:
    for suffix in (".jsonl.gz", ".jsonl", ".parquet"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _hf_dataset_files(path: Path, domain: str, root: Path | None = None) -> list[SourceFile]:
    """The Arrow files of a ``Dataset.save_to_disk`` directory, in the order its ``state.json`` lists."""
    root = root or path
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
        files.append(SourceFile(full, full.relative_to(root).as_posix(), "arrow", domain))
    return files


def _import_pyarrow(path: Path, what: str):
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    return pq if what == "parquet" else pyarrow


def _arrow_errors() -> tuple[type[Exception], ...]:
    import pyarrow
    return (pyarrow.ArrowException, OSError)
