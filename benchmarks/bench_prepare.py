"""Measure ``diffmoe prepare``: throughput per stage and worker count, the global kNN, ordering quality.

    python benchmarks/bench_prepare.py throughput [--sizes 100000] [--workers 1,2] [--repeats 3]
    python benchmarks/bench_prepare.py ann        [--sizes 100000,1000000] [--dims 384]
    python benchmarks/bench_prepare.py quality    [--minilm-pairs 1000]
    python benchmarks/bench_prepare.py project    --throughput-json T.json --ann-json A.json

throughput: cuts the built-in corpus into short documents (line-aligned pieces of >= 200 characters,
~320 bytes each) and prepares the first N of a seeded shuffle, written as ``--files`` JSON lines files
(TF-IDF similarity batching, BPE 8192, context 512, read tasks of ``--task-mb``) in a fresh process per run, with each worker count in turn, ``--repeats`` times (medians).
Per stage: wall time, documents/s and MB/s of text (over the whole corpus, so the stages' times add up
to the end-to-end time); per run: peak RSS of the coordinator and of the largest worker, and the peak
scratch disk of the work directory per GB of input. ``--baseline SRC`` also runs another checkout's
``prepare`` (its ``src`` folder) on the same corpus, interleaved, for the end-to-end comparison.

ann: synthetic clustered vectors (``--dims``, 1 per 1000 documents as cluster centres, L2-normalised);
for each size, faiss IVF at the default settings (nprobe tuned to recall@10 >= 0.9 on 1000 seeded
queries) against exact search: build and search time for every vector as a query, the index's memory
(computed: 4 n d bytes of vectors, plus ids and centroids for IVF), recall@10 measured on 1000 other
queries. Exact search of every query is timed on 2000 queries and scaled by
n / 2000 when it would take longer than ``--exact-full-max`` documents.

quality: the whole built-in corpus (all MB per domain), prepared with the same tokenizer by: the global
graph (exact at this size), the global graph searched with IVF, the old local ordering (exact within
chunks of ``--chunk-docs``), and random batching. Over pairs of documents adjacent inside a training
row: the mean cosine under embeddings the ordering never used (word TF-IDF; optionally MiniLM on a
sample of pairs), and how often both share a domain. ``--shuffled``: the same documents in one file in a
seeded random order, as in a web crawl where similar documents are far apart in read order.

project: the wall time of a corpus of ``--target-tokens`` on one and on 8 machines of 64 cores, from a
throughput and an ann run: the per-shard stages at their measured MB/s per core (1 worker), times the
cores, times the tokenize stage's measured 2-worker efficiency (assumed to hold at any core count); the kNN search scaled from the largest IVF run by
(documents ratio)^1.5 (IVF with K ~ sqrt(n) lists) and by the dims ratio, over the cores of one machine; the
BPE by its sample size; the TF-IDF fit as measured (a fixed sample); the other global stages linearly in
documents, on one core. An estimate to check against a real run, not a measurement.

Writes markdown tables to stdout and, with ``--json``, the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

from diffmoe.data import (  # noqa: E402
    BuiltinCorpusConfig,
    Corpus,
    OrderingConfig,
    PrepareConfig,
    TokenizerConfig,
    build_builtin_corpus,
    prepare,
    read_manifest,
)


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def table(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:,.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ throughput
def short_documents(corpus: Path, min_chars: int = 200):
    """(text, domain) pieces of the corpus's documents, cut at line ends once >= min_chars."""
    for doc in Corpus(corpus):
        piece, size = [], 0
        for line in doc.text.splitlines(keepends=True):
            piece.append(line)
            size += len(line)
            if size >= min_chars:
                yield "".join(piece), doc.domain
                piece, size = [], 0


_CHILD = """
import json, os, resource, sys, threading, time
sys.path.insert(0, {src!r})
from diffmoe.data import PrepareConfig, TokenizerConfig, prepare
config = PrepareConfig(context_len={context_len}, tokenizer=TokenizerConfig(vocab_size={vocab}))
if hasattr(config.read, "task_mb"):
    config.read.task_mb = {task_mb}
kwargs = {{}}
if {workers} is not None:
    from diffmoe.data import EngineConfig
    kwargs["engine"] = EngineConfig(workers={workers})
work, peak, done = os.path.join({out!r}, ".prepare-tmp"), [0], threading.Event()
def du(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total
def poll():
    while not done.wait(0.25):
        peak[0] = max(peak[0], du(work))
threading.Thread(target=poll, daemon=True).start()
start = time.perf_counter()
result = prepare({corpus!r}, {out!r}, config, overwrite=True, **kwargs)
seconds = time.perf_counter() - start
done.set()
run = result.manifest.get("run", {{}})
print(json.dumps({{"seconds": seconds, "stages": run.get("stages") or result.seconds,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "scratch_bytes": peak[0], "documents": result.manifest["documents"]["read"],
                  "text_bytes": result.manifest["sources"].get("text_bytes")}}))
"""


def run_child(src: Path, corpus: Path, out: Path, workers, args) -> dict:
    code = _CHILD.format(
        src=str(src),
        corpus=str(corpus),
        out=str(out),
        context_len=args.context_len,
        vocab=args.vocab_size,
        workers=workers,
        task_mb=args.task_mb,
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stage_seconds(result: dict) -> dict[str, float]:
    stages = result["stages"]
    if isinstance(stages, dict):  # a baseline checkout: {stage: seconds}
        return dict(stages)
    return {s["stage"]: s["seconds"] for s in stages if s["stage"] != "total"}


def throughput(args) -> dict:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_prepare_"))
    corpus = work / "corpus"
    if not corpus.exists():
        build_builtin_corpus(corpus, BuiltinCorpusConfig(max_mb_per_domain=None))
    pieces = list(short_documents(corpus))
    order = np.random.default_rng(0).permutation(len(pieces))
    workers = [int(w) for w in args.workers.split(",")]
    sections = []
    for n in (int(s) for s in args.sizes.split(",")):
        if n > len(pieces):
            raise SystemExit(f"the built-in corpus gives only {len(pieces)} short documents")
        path = work / f"docs_{n}"  # args.files JSON lines files, as a real corpus comes in many files
        if not path.exists():
            path.mkdir()
            for f, part in enumerate(np.array_split(order[:n], args.files)):
                with open(path / f"part-{f:05d}.jsonl", "w", encoding="utf-8") as fh:
                    for i in part:
                        fh.write(json.dumps({"text": pieces[i][0], "domain": pieces[i][1]}, ensure_ascii=False) + "\n")
        entries = [(f"{w} worker{'s' * (w > 1)}", SRC, w) for w in workers]
        if args.baseline:
            entries.append(("baseline", Path(args.baseline), None))
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in entries}
        for r in range(args.repeats):  # interleaved, rotated: drift hits every entry alike
            for name, src, w in entries[r % len(entries) :] + entries[: r % len(entries)]:
                runs[name].append(run_child(src, path, work / f"out_{n}", w, args))
                print(json.dumps({"documents": n, "entry": name, **runs[name][-1]}), file=sys.stderr)
        sections.append(summarise(n, sum(p.stat().st_size for p in path.iterdir()), runs))
    for section in sections:
        print(
            f"\n### {section['documents']:,} documents, {section['mb']:.1f} MB ({machine()}; medians of "
            f"{args.repeats})\n"
        )
        print(table(section["stages"]) + "\n")
        print(table(section["runs"]))
    return {"sections": sections}


def summarise(n: int, size: int, runs: dict[str, list[dict]]) -> dict:
    mb = size / 1e6
    stage_rows, run_rows = [], []
    names = list(runs)
    stages = list(stage_seconds(runs[names[0]][0]))
    for stage in stages + ["total"]:
        row = {"stage": stage}
        for name in names:
            times = [stage_seconds(r).get(stage, 0.0) if stage != "total" else r["seconds"] for r in runs[name]]
            t = statistics.median(times)
            row[f"{name} s"] = round(t, 2)
            row[f"{name} docs/s"] = round(n / t) if t > 0 else ""
            row[f"{name} MB/s"] = round(mb / t, 2) if t > 0 else ""
        if len(names) > 1 and names[0].startswith("1 worker"):
            base = row[f"{names[0]} s"]
            for name in names[1:]:
                row[f"speed-up {name}"] = round(base / row[f"{name} s"], 2) if row[f"{name} s"] else ""
        stage_rows.append(row)
    for name in names:
        rs = runs[name]
        run_rows.append(
            {
                "entry": name,
                "seconds": round(statistics.median(r["seconds"] for r in rs), 1),
                "docs/s": round(n / statistics.median(r["seconds"] for r in rs)),
                "coordinator peak RSS MB": round(max(r["rss_mb"] for r in rs)),
                "largest worker peak RSS MB": round(max(r.get("worker_rss_mb", 0) for r in rs)),
                "scratch GB per GB of input": round(max(r.get("scratch_bytes", 0) for r in rs) / size, 2),
            }
        )
    return {"documents": n, "mb": mb, "stages": stage_rows, "runs": run_rows, "raw": runs}


# ------------------------------------------------------------------------------------------ projection
PARALLEL = {"sample", "tokenize", "embed", "score", "write", "documents"}
"""Stages that run as tasks (per-shard): their time falls with the cores running them."""


def project(args) -> dict:
    """Wall time of ``prepare`` on a corpus of ``--target-tokens`` from measured rates (see the docstring)."""
    measured = json.loads(Path(args.throughput_json).read_text())["sections"][-1]
    ann_rows = json.loads(Path(args.ann_json).read_text())["rows"]
    one = measured["raw"]["1 worker"]
    two = measured["raw"].get("2 workers")
    n_docs, text_mb = one[0]["documents"], one[0]["text_bytes"] / 1e6
    target_mb, target_docs = args.target_text_gb * 1e3, args.target_docs
    ivf = max((r for r in ann_rows if r["search"] != "exact"), key=lambda r: r["documents"])

    def median_time(runs, stage):
        return statistics.median(stage_seconds(r)[stage] for r in runs)

    # the parallel efficiency of the largest per-shard stage (the smaller ones are dominated by the fixed
    # cost of starting a pool, which does not grow with the corpus)
    efficiency = min(1.0, median_time(one, "tokenize") / median_time(two, "tokenize") / 2) if two else 1.0
    rows = []
    for stage in stage_seconds(one[0]):
        t1 = median_time(one, stage)
        if stage in PARALLEL:
            per_core_mb_s = text_mb / t1
            model = f"{per_core_mb_s:.2f} MB/s per core (1 worker) x cores x {efficiency:.2f} (tokenize's 2-worker efficiency)"
            times = [target_mb / (per_core_mb_s * c * efficiency) for c in args.cores]
        elif stage == "knn":
            scale = (target_docs / ivf["documents"]) ** 1.5 * (args.target_dims / ivf["dims"])
            base = ivf["build + search s (all n queries)"]
            model = (
                f"IVF at {ivf['documents']:,} x {ivf['dims']}: {base:.0f} s on 2 cores, x (n ratio)^1.5 x dims "
                "ratio, / cores (one machine: the global stages run on one)"
            )
            times = [base * scale * 2 / args.cores[0]] * len(args.cores)
        elif stage in ("fit", "tokenizer"):
            model = "a fixed-size sample: as measured"
            times = [t1] * len(args.cores)
        elif stage == "bpe":
            sample_mb = min(args.train_mb, text_mb)
            model = f"linear in its sample ({sample_mb:.0f} MB here, {args.train_mb:.0f} MB at the target)"
            times = [t1 * args.train_mb / sample_mb] * len(args.cores)
        else:
            model = f"one process, linear in documents ({n_docs / max(t1, 1e-9):,.0f} docs/s measured)"
            times = [t1 * target_docs / n_docs] * len(args.cores)
        rows.append(
            {
                "stage": stage,
                "model": model,
                **{f"{c} cores (h)": round(t / 3600, 2) for c, t in zip(args.cores, times)},
            }
        )
    rows.append(
        {
            "stage": "total",
            "model": "",
            **{f"{c} cores (h)": round(sum(r[f"{c} cores (h)"] for r in rows), 2) for c in args.cores},
        }
    )
    print(
        f"\nProjected prepare wall time: {args.target_tokens:.3g} tokens, {args.target_text_gb:g} GB of text, "
        f"{target_docs:.3g} documents, {args.target_dims}-d search vectors; cores {args.cores} (8 x 64 = 512: "
        "the per-shard stages spread over 8 machines, the global ones on one)\n"
    )
    print(table(rows))
    return {"rows": rows}


# ------------------------------------------------------------------------------------------ ann
def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(n // 1000, 16), d)).astype(np.float32)
    x = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 1 << 16):
        m = min(1 << 16, n - start)
        x[start : start + m] = centres[rng.integers(0, len(centres), m)] + 0.6 * rng.normal(size=(m, d)).astype(
            np.float32
        )
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


_ANN_CHILD = """
import json, sys, time
import numpy as np
sys.path.insert(0, {src!r})
sys.path.insert(0, {bench!r})
from bench_prepare import clustered
from diffmoe.data.knn import SearchOptions, exact_neighbours, recall_at_k, search
x = clustered({n}, {d})
queries = np.sort(np.random.default_rng(99).choice({n}, 1000, replace=False))
out = np.zeros(({n}, 10), dtype=np.int64)
result = {{"n": {n}, "d": {d}, "method": {method!r}}}
if {method!r} == "exact":  # faiss IndexFlatIP, as prepare's exact search: every query, or a sample scaled
    import faiss
    sample = np.sort(np.random.default_rng(98).choice({n}, min({n}, {exact_queries}), replace=False))
    start = time.perf_counter()
    index = faiss.IndexFlatIP({d})
    index.add(x)
    for s in range(0, len(sample), 32768):
        index.search(x[sample[s:s + 32768]], 11)
    t = time.perf_counter() - start
    result.update(search_s=t * {n} / len(sample), timed_queries=len(sample), build_s=0.0, recall=1.0)
else:
    start = time.perf_counter()
    info = search(x, SearchOptions(k=10, index={method!r}), out, progress=None)
    total = time.perf_counter() - start
    truth = exact_neighbours(x, queries, 10)
    result.update(info=info, total_s=total, recall=recall_at_k(out[queries], truth))
print(json.dumps(result))
"""


def index_bytes(method: str, n: int, d: int, nlist: int | None) -> int:
    """Memory of the index: float32 vectors (flat codes), plus ids and centroids for IVF."""
    return 4 * n * d + (8 * n + 4 * nlist * d if method != "exact" else 0)


def ann(args) -> dict:
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        for method in ("ivf-flat", "exact"):
            exact_queries = n if n <= args.exact_full_max else 2000
            code = _ANN_CHILD.format(
                src=str(SRC),
                bench=str(Path(__file__).parent),
                n=n,
                d=args.dims,
                method=method,
                exact_queries=exact_queries,
            )
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(r), file=sys.stderr)
            info = r.get("info", {})
            rows.append(
                {
                    "documents": n,
                    "dims": args.dims,
                    "search": method
                    if method == "exact"
                    else f"IVF{info.get('nlist')},Flat nprobe {info.get('nprobe')}",
                    "build + search s (all n queries)": round(r.get("total_s", r.get("search_s", 0)), 1),
                    "timed": "all"
                    if method != "exact" or r.get("timed_queries") == n
                    else f"{r['timed_queries']} queries, scaled",
                    "index MB (computed)": round(index_bytes(method, n, args.dims, info.get("nlist")) / 1e6),
                    "recall@10": round(r["recall"], 4),
                    "tuning recall@10": info.get("recall_at_k", ""),
                }
            )
    print(f"\nGlobal kNN: faiss IVF (defaults) vs exact ({machine()})\n")
    print(table(rows))
    return {"rows": rows}


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
    if args.shuffled:  # the same documents in one file, in a seeded random order: neighbours far apart
        shuffled = work / "corpus_shuffled"
        if not shuffled.exists():
            docs = list(Corpus(corpus))
            shuffled.mkdir()
            with open(shuffled / "all.jsonl", "w", encoding="utf-8") as fh:
                for i in np.random.default_rng(0).permutation(len(docs)):
                    fh.write(json.dumps({"text": docs[i].text, "domain": docs[i].domain}, ensure_ascii=False) + "\n")
        corpus = shuffled
    texts, domains = zip(*((d.text, d.domain) for d in Corpus(corpus)))  # index order = prepare's order
    arms = {
        "global exact": OrderingConfig(),
        "global IVF": OrderingConfig(knn_index="ivf-flat"),
        f"chunks of {args.chunk_docs} (old, exact)": OrderingConfig(chunk_docs=args.chunk_docs),
        "random": OrderingConfig(batching="random"),
    }
    tokenizer = TokenizerConfig(vocab_size=args.vocab_size)
    results = {}
    for i, (name, ordering) in enumerate(arms.items()):
        out = work / f"arm{i}{'-shuffled' if args.shuffled else ''}"
        config = PrepareConfig(context_len=args.context_len, seed=args.seed, tokenizer=tokenizer, ordering=ordering)
        start = time.perf_counter()
        result = prepare(corpus, out, config, overwrite=True)
        seconds = time.perf_counter() - start
        if i == 0:
            tokenizer = TokenizerConfig(source=str(out))  # the first arm's tokenizer for every other arm
        graph = result.manifest["ordering"]["graph"]
        results[name] = {"pairs": adjacent_pairs(out), "seconds": seconds, "search": (graph or {}).get("search")}
    word_tfidf = TfidfVectorizer(sublinear_tf=True, min_df=2, max_features=200_000).fit_transform(texts)
    domain_of = np.array(domains)
    rng = np.random.default_rng(0)
    rows = []
    for name, r in results.items():
        pairs = r["pairs"]
        row = {
            "ordering": name,
            "adjacent pairs": len(pairs),
            "word TF-IDF cosine": float(pair_cosines(word_tfidf, pairs).mean()),
            "same domain": float((domain_of[pairs[:, 0]] == domain_of[pairs[:, 1]]).mean()),
            "prepare s": round(r["seconds"], 1),
            "kNN recall@10": (r["search"] or {}).get("recall_at_k", "exact" if r["search"] else ""),
        }
        if args.minilm_pairs:
            sample = pairs[rng.choice(len(pairs), size=min(args.minilm_pairs, len(pairs)), replace=False)]
            row["MiniLM cosine"] = float(minilm_pair_cosines(texts, sample).mean())
        rows.append(row)
    print(
        f"\nOrdering quality on the built-in corpus ({len(texts)} documents, context {args.context_len}; {machine()})\n"
    )
    print(table(rows))
    return {"documents": len(texts), "context_len": args.context_len, "rows": rows}


def minilm_pair_cosines(texts, pairs: np.ndarray) -> np.ndarray:
    from diffmoe.data.embed import minilm_vectors

    docs = np.unique(pairs)
    position = {d: i for i, d in enumerate(docs.tolist())}
    vectors = minilm_vectors([texts[d][:2000] for d in docs], device="cpu")
    return pair_cosines(vectors, np.vectorize(position.get)(pairs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["throughput", "ann", "quality", "project"])
    parser.add_argument("--workdir", help="keep corpora and datasets here (default: a new temporary folder)")
    parser.add_argument("--sizes", help="documents (throughput: 100000; ann: 100000,1000000)")
    parser.add_argument("--workers", default="1,2", help="throughput: worker counts, side by side")
    parser.add_argument("--repeats", type=int, default=3, help="throughput: runs of every entry (medians)")
    parser.add_argument("--baseline", help="throughput: also run the prepare of this src folder (another checkout)")
    parser.add_argument("--files", type=int, default=16, help="throughput: the corpus is cut into this many files")
    parser.add_argument("--task-mb", type=float, default=8.0, help="throughput: MB of input per read task")
    parser.add_argument("--dims", type=int, default=384, help="ann: vector dimensions")
    parser.add_argument(
        "--exact-full-max",
        type=int,
        default=100_000,
        help="ann: time exact search of every query up to this size, else 2000 queries scaled",
    )
    parser.add_argument(
        "--max-mb-per-domain",
        type=lambda v: None if v == "all" else float(v),
        default=None,
        help="quality: cap on the built-in corpus per domain, or 'all' (default)",
    )
    parser.add_argument("--chunk-docs", type=int, default=2500, help="quality: chunk of the old local ordering")
    parser.add_argument(
        "--shuffled", action="store_true", help="quality: the corpus's documents in one file in a seeded random order"
    )
    parser.add_argument("--context-len", type=int, default=512)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--minilm-pairs", type=int, default=0, help="quality: also score this many sampled pairs with all-MiniLM-L6-v2"
    )
    parser.add_argument("--throughput-json", help="project: the --json of a throughput run")
    parser.add_argument("--ann-json", help="project: the --json of an ann run")
    parser.add_argument("--target-tokens", type=float, default=150e9, help="project: corpus tokens (Lory: 150B)")
    parser.add_argument("--target-text-gb", type=float, default=600, help="project: GB of text (~4 bytes per token)")
    parser.add_argument("--target-docs", type=float, default=230e6, help="project: documents (~650 tokens each)")
    parser.add_argument("--target-dims", type=int, default=128, help="project: search vector dims (LSA: 128)")
    parser.add_argument("--train-mb", type=float, default=256, help="project: BPE training sample MB")
    parser.add_argument(
        "--cores",
        type=lambda v: [int(c) for c in v.split(",")],
        default=[64, 512],
        help="project: core counts (default 64 = one machine, 512 = 8 machines)",
    )
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    args.sizes = args.sizes or ("100000" if args.what == "throughput" else "100000,1000000")
    numbers = {"throughput": throughput, "ann": ann, "quality": quality, "project": project}[args.what](args)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), **numbers}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
