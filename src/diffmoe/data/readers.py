"""Documents in: reading one source file (or a part of one) as a stream of :class:`Document`.

Which files make up a corpus, their domains and how they are cut into tasks is :mod:`.sources`; this
module reads them, one file, line, row batch or streamed record at a time, so memory stays bounded.

Kinds of source (``SourceFile.kind``):

- ``text``: a text file (``TEXT_EXTENSIONS``) is one document;
- ``jsonl``: JSON lines (``.jsonl``, ``.json``, optionally ``.gz`` / ``.zst`` compressed), one object per
  line with a string text field (``text_field``) and optional ``domain`` and ``id``;
- ``parquet``: the same fields as columns, read in row batches (a part may be a range of row groups);
- ``arrow``: an Arrow stream file of a ``datasets`` ``save_to_disk`` directory;
- ``hf``: one shard of a ``datasets`` dataset streamed with ``load_dataset(..., streaming=True)``.

Local paths are opened directly, URLs (``s3://``, ``gs://``, ``file://``, ...) through fsspec.

A document's id is its record's ``id``, else its position: ``source`` (text files),
``source:line`` (JSON lines), ``source:row`` (tables, 1-based), ``source:index`` (streamed). Empty
(whitespace-only) documents are always skipped and counted. Binary files, invalid UTF-8, malformed JSON
lines and records without a string text field are bad input: with ``on_bad_input="error"`` (the
default) they raise :class:`DataError` naming the file and line; with ``"skip"`` they are counted in
:class:`ReadStats`.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError

BAD_INPUT_POLICIES = ("error", "skip")
DOMAIN_FROM_CHOICES = ("auto", "top-dir", "field:NAME", "none")
SINGLE_DOMAIN = "corpus"
"""The one domain of ``domain_from="none"``."""
_BINARY_PROBE_BYTES = 8192
_TABLE_BATCH_ROWS = 1024


@dataclass(frozen=True)
class Document:
    """One document: its text, domain, a stable id and the source it came from (its name)."""

    text: str
    domain: str
    id: str
    source: str


@dataclass
class ReadOptions:
    """How a corpus is read."""

    text_field: str = "text"
    """Name of the text field in JSON records and Parquet / Arrow columns."""
    on_bad_input: str = "error"
    """``error``: raise on bad input, naming file and line. ``skip``: skip it and count it."""
    domain_from: str = "auto"
    """``auto``: a record's ``domain`` field, else the top-level folder (``top-dir``); ``top-dir``: the
    top-level folder under the corpus root (a file at the top: its name without suffix for JSON lines and
    tables, the corpus folder's name for text files); ``field:NAME``: the record field NAME (text files:
    ``top-dir``); ``none``: one domain, ``corpus``."""
    hf_split: str = "train"
    """Split read from a ``DatasetDict.save_to_disk`` directory or a streamed ``datasets`` dataset."""
    hf_data_files: str | None = None
    """``data_files`` of a streamed ``datasets`` builder (``hf:json`` over local files, for example)."""
    task_mb: float = 64.0
    """Files are grouped into tasks of about this many MB (a larger Parquet file is split by row
    groups); tasks are the unit of parallel work and of resumption. Output does not depend on it, except
    through MiniLM's batches."""

    def validate(self) -> None:
        if self.on_bad_input not in BAD_INPUT_POLICIES:
            raise DataError(
                f"invalid on_bad_input={self.on_bad_input!r}: choose one of {', '.join(BAD_INPUT_POLICIES)}"
            )
        if not self.text_field:
            raise DataError("invalid text_field='': must name a field")
        if self.domain_from not in ("auto", "top-dir", "none") and not (
            self.domain_from.startswith("field:") and len(self.domain_from) > len("field:")
        ):
            raise DataError(f"invalid domain_from={self.domain_from!r}: choose one of {', '.join(DOMAIN_FROM_CHOICES)}")
        if not (isinstance(self.task_mb, (int, float)) and self.task_mb > 0):
            raise DataError(f"invalid task_mb={self.task_mb!r}: must be a positive number")

    @property
    def domain_field(self) -> str | None:
        """The record field that names a document's domain, or None."""
        if self.domain_from == "auto":
            return "domain"
        return self.domain_from[len("field:") :] if self.domain_from.startswith("field:") else None


@dataclass
class ReadStats:
    """Counts of one pass over (part of) a corpus."""

    documents: int = 0
    skipped: Counter = field(default_factory=Counter)
    """reason -> documents skipped (``empty``, ``binary``, ``invalid_utf8``, ``malformed_json``,
    ``bad_record``)."""
    first_skipped: dict[str, str] = field(default_factory=dict)
    """reason -> where the first such document was (``file`` or ``file:line``)."""
    bytes: int = 0
    """Bytes of text read (UTF-8)."""

    def to_dict(self) -> dict:
        return {
            "documents": self.documents,
            "skipped": dict(sorted(self.skipped.items())),
            "first_skipped": dict(sorted(self.first_skipped.items())),
            "bytes": self.bytes,
        }

    def add(self, other: dict) -> None:
        """Add the counts of a later part (``to_dict`` form)."""
        self.documents += other["documents"]
        self.bytes += other["bytes"]
        self.skipped.update(other["skipped"])
        for reason, where in other["first_skipped"].items():
            self.first_skipped.setdefault(reason, where)


@dataclass(frozen=True)
class SourceFile:
    """One input of a corpus.

    ``location``: a local path or an fsspec URL (``hf`` sources: the dataset name); ``name``: the stable
    name recorded in ids and ``sources.jsonl`` (the path relative to the corpus root); ``kind``: text,
    jsonl, parquet, arrow or hf; ``domain``: the folder rule's domain (records may name their own);
    ``bytes`` / ``mtime``: size and modification time when known (they fingerprint the input);
    ``hf``: for streamed datasets, ``{"name", "config", "split", "data_files", "shard", "shards"}``.
    """

    location: str
    name: str
    kind: str
    domain: str
    bytes: int = 0
    mtime: float | None = None
    hf: Mapping | None = None

    @property
    def is_url(self) -> bool:
        return "://" in self.location

    def to_dict(self) -> dict:
        return {
            "location": self.location,
            "name": self.name,
            "kind": self.kind,
            "domain": self.domain,
            "bytes": self.bytes,
            "mtime": self.mtime,
            **({"hf": dict(self.hf)} if self.hf else {}),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SourceFile":
        return cls(**data)


def open_binary(location: str):
    """A binary file object for a local path or an fsspec URL."""
    if "://" in location:
        import fsspec

        return fsspec.open(location, "rb").open()
    return open(location, "rb")


def compression_of(name: str) -> str | None:
    lower = name.lower()
    return "gzip" if lower.endswith(".gz") else "zstd" if lower.endswith(".zst") else None


# ------------------------------------------------------------------------------------------ reading
class PartReader:
    """Reads documents of source files under one :class:`ReadOptions`, counting into ``stats``."""

    def __init__(self, options: ReadOptions, stats: ReadStats | None = None):
        self.options = options
        self.stats = stats if stats is not None else ReadStats()

    def read(self, source: SourceFile, row_groups: tuple[int, int] | None = None) -> Iterator[Document]:
        """The documents of ``source`` (of row groups ``[start, stop)`` of a Parquet file when given)."""
        readers = {
            "text": self._read_text,
            "jsonl": self._read_jsonl,
            "parquet": self._read_parquet,
            "arrow": self._read_arrow,
            "hf": self._read_hf,
        }
        for doc in (
            readers[source.kind](source, row_groups) if source.kind == "parquet" else readers[source.kind](source)
        ):
            self.stats.documents += 1
            self.stats.bytes += len(doc.text.encode("utf-8"))
            yield doc

    def _skip(self, reason: str, where: str, message: str | None = None) -> None:
        """Count a skipped document; raise instead for bad input under ``on_bad_input="error"``."""
        if message is not None and self.options.on_bad_input == "error":
            raise DataError(
                f"{where}: {message} (set on_bad_input=skip / --on-bad-input skip to skip and count such input)"
            )
        self.stats.skipped[reason] += 1
        self.stats.first_skipped.setdefault(reason, where)

    def _read_text(self, f: SourceFile) -> Iterator[Document]:
        with open_binary(f.location) as fh:
            data = fh.read()
        where = f.location
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
        yield Document(text, f.domain, f.name, f.name)

    def _read_jsonl(self, f: SourceFile) -> Iterator[Document]:
        compression = compression_of(f.location)
        errors = _decompression_errors(compression)
        try:
            with _open_decompressed(f.location, compression) as fh:
                for lineno, raw in enumerate(fh, 1):
                    if not raw.strip():
                        continue
                    where = f"{f.location}:{lineno}"
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
                        self._skip("malformed_json", where, f"expected a JSON object, got {type(record).__name__}")
                        continue
                    doc = self._record(record, where, f, f"{f.name}:{lineno}")
                    if doc is not None:
                        yield doc
        except errors as e:
            kind = {"gzip": "gzip", "zstd": "zstd"}[compression]
            raise DataError(f"{f.location}: not a readable {kind} file ({e})") from None

    def _read_parquet(self, f: SourceFile, row_groups: tuple[int, int] | None) -> Iterator[Document]:
        pq = _import_pyarrow(f.location, "parquet")
        try:
            with open_binary(f.location) as fh:
                table = pq.ParquetFile(fh)
                meta = table.metadata
                groups = range(meta.num_row_groups) if row_groups is None else range(*row_groups)
                first_row = sum(meta.row_group(i).num_rows for i in range(groups.start))
                columns = self._columns(f, table.schema_arrow.names)
                batches = (
                    table.iter_batches(batch_size=_TABLE_BATCH_ROWS, columns=columns, row_groups=list(groups))
                    if len(groups)
                    else ()
                )
                yield from self._read_batches(f, batches, first_row)
        except _arrow_errors() as e:
            raise DataError(f"{f.location}: not a readable Parquet file ({e})") from None

    def _read_arrow(self, f: SourceFile) -> Iterator[Document]:
        pa = _import_pyarrow(f.location, "arrow")
        try:
            with pa.memory_map(str(f.location)) as source:
                reader = pa.ipc.open_stream(source)
                columns = self._columns(f, reader.schema.names)
                yield from self._read_batches(f, (batch.select(columns) for batch in reader))
        except _arrow_errors() as e:
            raise DataError(f"{f.location}: not a readable Arrow stream file ({e})") from None

    def _read_hf(self, f: SourceFile) -> Iterator[Document]:
        dataset = load_streaming_dataset(f.hf).shard(num_shards=f.hf["shards"], index=f.hf["shard"])
        for index, record in enumerate(dataset, 1):
            doc = self._record(record, f"{f.name}: record {index}", f, f"{f.name}:{index}")
            if doc is not None:
                yield doc

    def _columns(self, f: SourceFile, names: list[str]) -> list[str]:
        text_field = self.options.text_field
        if text_field not in names:
            raise DataError(
                f"{f.location}: no {text_field!r} column (columns: {', '.join(names)}); "
                "name the text column with text_field / --text-field"
            )
        wanted = [c for c in (self.options.domain_field, "id") if c]
        return [text_field] + [c for c in dict.fromkeys(wanted) if c in names and c != text_field]

    def _read_batches(self, f: SourceFile, batches: Iterable, first_row: int = 0) -> Iterator[Document]:
        row = first_row
        for batch in batches:
            columns = batch.to_pydict()
            names = list(columns)
            for values in zip(*columns.values()):
                row += 1
                doc = self._record(dict(zip(names, values)), f"{f.location}: row {row}", f, f"{f.name}:{row}")
                if doc is not None:
                    yield doc

    def _record(self, record: Mapping, where: str, f: SourceFile, default_id: str) -> Document | None:
        text_field = self.options.text_field
        text = record.get(text_field)
        if not isinstance(text, str):
            problem = (
                f"no {text_field!r} field (fields: {', '.join(map(str, record)) or 'none'})"
                if text is None
                else f"field {text_field!r} must be a string, got {type(text).__name__}"
            )
            self._skip("bad_record", where, problem)
            return None
        domain = self._domain(record, where, f)
        if domain is None:
            return None
        if not text.strip():
            self._skip("empty", where)
            return None
        for name, value in (("text", text), ("domain", domain)):
            try:  # JSON may escape a lone surrogate ("\ud800"), which no text file can hold
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                self._skip(
                    "invalid_utf8", where, f"field {name!r}: invalid Unicode (a lone surrogate at character {e.start})"
                )
                return None
        doc_id = record.get("id")
        return Document(text, domain, default_id if doc_id is None else str(doc_id), f.name)

    def _domain(self, record: Mapping, where: str, f: SourceFile) -> str | None:
        name = self.options.domain_field
        if name is None:
            return f.domain
        domain = record.get(name)
        if domain is None:
            if self.options.domain_from == "auto":
                return f.domain
            self._skip(
                "bad_record",
                where,
                f"no {name!r} field to take the domain from (domain_from={self.options.domain_from})",
            )
            return None
        if not isinstance(domain, str) or not domain.strip():
            self._skip("bad_record", where, f"field {name!r} must be a non-empty string, got {domain!r}")
            return None
        return domain


def load_streaming_dataset(spec: Mapping):
    """``datasets.load_dataset(name, config, split=..., data_files=..., streaming=True)`` of an ``hf`` source."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading hf:{spec['name']} needs the package datasets: pip install datasets") from None
    kwargs = {"split": spec["split"], "streaming": True}
    if spec.get("data_files"):
        kwargs["data_files"] = spec["data_files"]
    try:
        return datasets.load_dataset(spec["name"], spec.get("config"), **kwargs)
    except Exception as e:  # datasets raises many kinds (FileNotFoundError, DatasetNotFoundError, ValueError)
        raise DataError(f"hf:{spec['name']}: cannot stream the dataset ({type(e).__name__}: {e})") from None


def _open_decompressed(location: str, compression: str | None):
    raw = open_binary(location)
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "zstd":
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise DataError(f"reading {location} needs the package zstandard: pip install zstandard") from None
        return _ClosingReader(io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)))
    return raw


class _ClosingReader:
    """A context manager over a line-iterable binary reader."""

    def __init__(self, reader):
        self.reader = reader

    def __enter__(self):
        return self.reader

    def __exit__(self, *exc) -> None:
        self.reader.close()


def _decompression_errors(compression: str | None) -> tuple[type[BaseException], ...]:
    if compression == "gzip":
        return (gzip.BadGzipFile, EOFError, zlib.error)
    if compression == "zstd":
        import zstandard

        return (zstandard.ZstdError,)
    return ()


def _import_pyarrow(location: str, what: str):
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {location} needs pyarrow: pip install pyarrow") from None
    return pq if what == "parquet" else pyarrow


def _arrow_errors() -> tuple[type[Exception], ...]:
    import pyarrow

    return (pyarrow.ArrowException, OSError)


# ------------------------------------------------------------------------------------------ Corpus
class Corpus:
    """A corpus (one or more inputs, see :func:`diffmoe.data.sources.discover`), iterated as a stream of
    :class:`Document` in ``prepare``'s document order (re-iterable, same order each time)."""

    def __init__(self, path: str | os.PathLike | list, options: ReadOptions | None = None):
        from .sources import discover

        self.options = options or ReadOptions()
        self.options.validate()
        self.specs = [str(p) for p in path] if isinstance(path, (list, tuple)) else [str(path)]
        self.path = Path(self.specs[0]) if len(self.specs) == 1 else None
        found = discover(self.specs, self.options)
        self.files, self.ignored = found.files, found.ignored
        self.stats = ReadStats()

    @property
    def total_bytes(self) -> int:
        """Size of all corpus files on disk (streamed datasets count 0)."""
        return sum(f.bytes for f in self.files)

    def __iter__(self) -> Iterator[Document]:
        self.stats = ReadStats()
        reader = PartReader(self.options, self.stats)
        for f in self.files:
            yield from reader.read(f)
