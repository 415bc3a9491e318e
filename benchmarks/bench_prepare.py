"""Measure ``diffmoe prepare``: ordering quality, and throughput / memory as the corpus grows.

    python benchmarks/bench_prepare.py quality    [--max-mb-per-domain all] [--context-len 512]
    python benchmarks/bench_prepare.py throughput [--sizes 10000,30000,100000]

quality: builds the built-in corpus, prepares it twice with the same seed and tokenizer — random and
similarity batching — and reports, over pairs of documents adjacent inside a training sequence, the
mean cosine similarity under an embedding the ordering never saw (word-level TF-IDF fitted on the
documents; optionally all-MiniLM-L6-v2 on a sample of pairs), and how often both share a domain.

throughput: cuts the built-in corpus into short documents (line-aligned pieces of >= 200 characters),
and for each size prepares the first N of a seeded shuffle with TF-IDF similarity batching in a fresh
process, reporting documents/s, seconds per stage and peak RSS.

Writes a markdown table to stdout and, with --json, the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

from diffmoe.data import (BuiltinCorpusConfig, Corpus, OrderingConfig, PrepareConfig,  # noqa: E402
                          TokenizerConfig, build_builtin_corpus, prepare, read_manifest)


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


# ------------------------------------------------------------------------------------------ quality
def adjacent_pairs(dataset: Path) -> np.ndarray:
    """int64 [P, 2]: document indices (a, b) where b follows a inside one training row."""
    manifest = read_manifest(dataset)
    row_len, tokens = manifest["row_len"], manifest["splits"]["train"]["tokens"]
    placed = np.load(dataset / "train.docs.npy")
    boundary = placed[1:, 1]  # where the next document starts; the previous one's separator is just before
    inside = (boundary < tokens) & (boundary % row_len != 0)
    return np.stack([placed[:-1, 0][inside], placed[1:, 0][inside]], axis=1)


def pair_cosines(vectors, pairs: np.ndarray) -> np.ndarray:
    a, b = vectors[pairs[:, 0]], vectors[pairs[:, 1]]
    if hasattr(a, "multiply"):
        return np.asarray(a.multiply(b).sum(axis=1)).ravel()
    return np.einsum("pd,pd->p", a, b)


def quality(args) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_prepare_"))
    corpus = work / "corpus"
    if not corpus.exists():
        build_builtin_corpus(corpus, BuiltinCorpusConfig(max_mb_per_domain=args.max_mb_per_domain))
    texts, domains = zip(*((d.text, d.domain) for d in Corpus(corpus)))  # index order = prepare's order
    results = {}
    tokenizer = TokenizerConfig(vocab_size=args.vocab_size)
    for batching in ("similarity", "random"):
        out = work / batching
        config = PrepareConfig(context_len=args.context_len, seed=args.seed, tokenizer=tokenizer,
                               ordering=OrderingConfig(batching=batching))
        start = time.perf_counter()
        prepare(corpus, out, config, overwrite=True)
        seconds = time.perf_counter() - start
        tokenizer = TokenizerConfig(source=str(out / "tokenizer.json"))  # the same tokenizer for both
        results[batching] = {"pairs": adjacent_pairs(out), "seconds": seconds}
    word_tfidf = TfidfVectorizer(sublinear_tf=True, min_df=2, max_features=200_000).fit_transform(texts)
    domain_of = np.array(domains)
    rng = np.random.default_rng(0)
    rows = []
    for batching, r in results.items():
        pairs = r["pairs"]
        cos = pair_cosines(word_tfidf, pairs)
        row = {"batching": batching, "adjacent_pairs": len(pairs), "word_tfidf_cosine": float(cos.mean()),
               "same_domain": float((domain_of[pairs[:, 0]] == domain_of[pairs[:, 1]]).mean()),
               "prepare_seconds": round(r["seconds"], 1)}
        if args.minilm_pairs:
            sample = pairs[rng.choice(len(pairs), size=min(args.minilm_pairs, len(pairs)), replace=False)]
            row["minilm_cosine"] = float(minilm_pair_cosines(texts, sample).mean())
        rows.append(row)
    print(f"\nOrdering quality on the built-in corpus ({len(texts)} documents, context {args.context_len}; {machine()})\n")
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return {"documents": len(texts), "context_len": args.context_len, "rows": rows}


def minilm_pair_cosines(texts, pairs: np.ndarray) -> np.ndarray:
    from diffmoe.data.embed import minilm_embedding

    docs = np.unique(pairs)
    position = {d: i for i, d in enumerate(docs.tolist())}
    vectors = minilm_embedding([texts[d][:2000] for d in docs]).vectors
    return pair_cosines(vectors, np.vectorize(position.get)(pairs))


# ------------------------------------------------------------------------------------------ throughput
def short_documents(corpus: Path, min_chars: int = 200):
    """(text, domain) pieces of the corpus's documents, cut at line ends once >= min_chars."""
    for doc in Corpus(corpus):
        piece = []
        size = 0
        for line in doc.text.splitlines(keepends=True):
            piece.append(line)
            size += len(line)
            if size >= min_chars:
                yield "".join(piece), doc.domain
                piece, size = [], 0


_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {src!r})
from diffmoe.data import OrderingConfig, PrepareConfig, TokenizerConfig, prepare
start = time.perf_counter()
result = prepare({corpus!r}, {out!r}, PrepareConfig(context_len={context_len}, tokenizer=TokenizerConfig(vocab_size={vocab})),
                 overwrite=True)
print(json.dumps({{"seconds": time.perf_counter() - start, "stages": result.seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "documents": result.manifest["documents"], "train_tokens": result.manifest["splits"]["train"]["tokens"]}}))
"""


def throughput(args) -> dict:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_prepare_"))
    corpus = work / "corpus"
    if not corpus.exists():
        build_builtin_corpus(corpus, BuiltinCorpusConfig(max_mb_per_domain=None))
    pieces = list(short_documents(corpus))
    order = np.random.default_rng(0).permutation(len(pieces))
    sizes = [int(s) for s in args.sizes.split(",")]
    if max(sizes) > len(pieces):
        raise SystemExit(f"the built-in corpus gives only {len(pieces)} short documents")
    rows = []
    for n in sizes:
        path = work / f"docs_{n}.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            for i in order[:n]:
                fh.write(json.dumps({"text": pieces[i][0], "domain": pieces[i][1]}, ensure_ascii=False) + "\n")
        code = _CHILD.format(src=str(SRC), corpus=str(path), out=str(work / f"out_{n}"),
                             context_len=args.context_len, vocab=args.vocab_size)
        result = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                           text=True).stdout.strip().splitlines()[-1])
        rows.append({"documents": n, "MB": round(path.stat().st_size / 1e6, 1),
                     "seconds": round(result["seconds"], 1), "docs_per_s": round(n / result["seconds"]),
                     "peak_rss_mb": round(result["peak_rss_mb"]), **result["stages"],
                     "near_duplicates": result["documents"]["near_duplicates"]})
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"\nprepare throughput, TF-IDF similarity batching ({machine()})\n")
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")
    return {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["quality", "throughput"])
    parser.add_argument("--workdir", help="keep corpora and datasets here (default: a new temporary folder)")
    parser.add_argument("--max-mb-per-domain", type=lambda v: None if v == "all" else float(v), default=None,
                        help="quality: cap on the built-in corpus per domain, or 'all' (default)")
    parser.add_argument("--context-len", type=int, default=512)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minilm-pairs", type=int, default=0,
                        help="quality: also score this many sampled pairs with all-MiniLM-L6-v2")
    parser.add_argument("--sizes", default="10000,30000,100000", help="throughput: corpus sizes in documents")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    numbers = quality(args) if args.what == "quality" else throughput(args)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), **numbers}, indent=2) + "\n")


if __name__ == "__main__":
    main()
