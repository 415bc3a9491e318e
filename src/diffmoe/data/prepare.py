"""``prepare``: a corpus in, a tokenized, ordered, packed dataset out, at any scale.

Per-shard stages run as tasks of an engine (datatrove's executors, :mod:`.engine`); global stages run
once, here, over compact per-document arrays (:mod:`.workdir` has the work directory's rules):

1. plan: list the inputs and cut them into read tasks (:mod:`.sources`);
2. tokenizer: sample documents per task and train a BPE once, or load a pretrained one;
3. **tokenize** (per task): read, tokenize and hash every document; merge their tables (global);
4. exact duplicates and the held-out split (global, by content hash);
5. for similarity batching or dedup: fit the embedding on a seeded sample (global), **embed** (per task),
   k nearest neighbours over the whole corpus (global, exact or faiss IVF, recall measured), **score**
   each edge exactly (per task), near-duplicates and the greedy walk (global);
6. pack: place each split's documents in its stream, shuffle the training rows (global);
   **write** each output shard (per task) and the **documents** list (per task);
7. ``documents.jsonl``, ``sources.jsonl``, ``tokenizer.json`` and, last, ``manifest.json``.

Every global decision sorts by stable keys and every random choice is seeded by ``seed``, so the output
is byte-identical for any number of workers and any engine, and after any interruption: run the same
command again and it resumes from the finished tasks (on one machine and set of library versions).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..console import say
from . import order as od
from . import pack as pk
from . import store as st
from .config import PrepareConfig
from .embed import MINILM_DIMS, fit_tfidf
from .engine import Engine, EngineConfig
from .errors import DataError
from .knn import load_neighbours, search
from .progress import StageProgress, Timings
from .readers import ReadStats
from .sources import Found, compression_summary, discover, plan_tasks
from .split import heldout_mask, mix64
from .stages import DocumentsStage, EmbedStage, SampleStage, ScoreStage, TokenizeStage, WriteStage, sample_texts
from .tokenizer import Vocab, resolve
from .tokens import DocumentTable, merge_tasks
from .workdir import WORKDIR, GlobalStages, build_plan, claim, remove_ours

MANY_DOMAINS = 100


@dataclass
class PrepareResult:
    """What ``prepare`` wrote: the dataset directory, its manifest, seconds per stage, whether it resumed."""

    out: Path
    manifest: dict
    seconds: dict[str, float]
    resumed: bool = False
    timings: Timings = field(default_factory=Timings)


def prepare(
    corpus,
    out: str | os.PathLike,
    config: PrepareConfig | None = None,
    overwrite: bool = False,
    verbose: bool = False,
    engine: EngineConfig | None = None,
    save_neighbours: str | os.PathLike | None = None,
    keep_work: bool = False,
) -> PrepareResult:
    """Prepare ``corpus`` (a path, glob, URL or ``hf:NAME``, or a list of them) into the dataset directory
    ``out`` (layout: :mod:`diffmoe.data.store`).

    ``out`` must be new, empty, hold a previous dataset (replaced only with ``overwrite``) or an interrupted
    run of the same command, which is resumed. ``engine`` runs the per-shard stages (default: all local
    cores). ``save_neighbours`` also writes the kNN graph (``.npz``, the layout ``--neighbours`` reads);
    ``keep_work`` keeps the work directory (``OUT/.prepare-tmp``: markers, per-task logs) after success.
    Raises :class:`DataError` for bad input or options, and then leaves nothing in ``out``; any other
    failure keeps the work done so far for a resume. ``verbose`` shows each stage's progress.
    """
    config = config or PrepareConfig()
    config.validate()
    engine = engine or EngineConfig()
    engine.validate()
    specs = [str(c) for c in corpus] if isinstance(corpus, (list, tuple)) else [str(corpus)]
    if config.ordering.neighbours is not None and not Path(config.ordering.neighbours).is_file():
        raise DataError(f"neighbours file not found: {config.ordering.neighbours}")
    found = discover(specs, config.read)
    tasks = plan_tasks(found.files, config.read.task_mb)
    out = Path(out)
    resumed = claim(out, overwrite, build_plan(specs, config, found.files, found.ignored, tasks))
    work = out / WORKDIR
    if resumed:
        say(f"resuming the interrupted prepare in {out}", verbose)
    run = _Run(out, work, config, specs, found, tasks, Engine(engine, work, verbose), verbose, save_neighbours)
    try:
        manifest = run.execute(resumed)
    except DataError:
        remove_ours(out)  # bad input or options: nothing worth resuming
        raise
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    seconds = {s.stage: round(s.seconds, 3) for s in run.timings.stages}
    return PrepareResult(out, manifest, seconds, resumed, run.timings)


class _Run:
    """One ``prepare`` run over its work directory: the stages, in order, each skipped when already done."""

    def __init__(
        self,
        out: Path,
        work: Path,
        config: PrepareConfig,
        specs: list[str],
        found: Found,
        tasks,
        engine: Engine,
        verbose: bool,
        save_neighbours,
    ):
        self.out, self.work, self.config, self.specs = out, work, config, specs
        self.files, self.ignored, self.tasks = found.files, found.ignored, tasks
        self.engine, self.verbose, self.save_neighbours = engine, verbose, save_neighbours
        self.globals = GlobalStages(work)
        self.g = work / "global"
        self.g.mkdir(exist_ok=True)
        self.timings = Timings()
        self.documents, self.text_bytes = 0, 0
        self.globals_run: list[str] = []

    # ------------------------------------------------------------------------------------------ helpers
    def _timed(self, name: str, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        self.timings.add(name, time.perf_counter() - start, self.documents or None, self.text_bytes or None)
        return result

    def _global(self, name: str, fn) -> dict:
        """Run global stage ``name`` unless its marker exists; returns what it recorded."""
        if not self.globals.done(name):
            self.globals.mark(name, fn() or {})
            self.globals_run.append(name)
        return self.globals.info(name)

    def _say(self, message: str) -> None:
        say(message, self.verbose)

    # ------------------------------------------------------------------------------------------ the run
    def execute(self, resumed: bool) -> dict:
        cfg = self.config
        self._say(
            f"prepare: {len(self.files)} input files ({sum(f.bytes for f in self.files) / 1e6:,.1f} MB) in "
            f"{len(self.tasks)} read tasks; {self.engine.config.executor} executor, "
            f"{self.engine.workers or 'unlimited'} workers"
        )
        if self.ignored:
            self._say("warning: not read: " + ", ".join(f"{n} {ext}" for ext, n in sorted(self.ignored.items())))
        vocab = self._tokenizer()
        infos = self._timed("tokenize", self.engine.run, TokenizeStage(self.work, cfg, self.files, self.tasks))
        stats = ReadStats()
        for info in infos:
            stats.add(info["stats"])
        self.documents, self.text_bytes = stats.documents, stats.bytes
        for timing in self.timings.stages:  # every stage's rates are over the whole corpus, now known
            timing.documents, timing.bytes = stats.documents, stats.bytes
        merged = self._global("merge", lambda: merge_tasks(self.work, len(self.tasks)))
        if merged["documents"] == 0:
            raise DataError(self._empty_message(stats))
        if len(merged["domains"]) > MANY_DOMAINS:
            self._say(
                f"warning: {len(merged['domains'])} domains (one per top-level file or folder); pass "
                "--domain-from none or field:NAME for fewer"
            )
        self._timed("split", self._global, "split", self._split)
        graph = self._order(vocab) if cfg.ordering.needs_graph else None
        if graph is None:
            self._timed("order", self._global, "order", self._order_without_graph)
        packed = self._timed("pack", self._global, "pack", lambda: self._pack(vocab))
        dtype = packed["dtype"]
        shards = [s for info in packed["splits"].values() for s in info["shards"]]
        written = self._timed(
            "write", self.engine.run, WriteStage(self.work, self.out, shards, dtype, vocab.eod_id, cfg.context_len + 1)
        )
        self._timed("documents", self.engine.run, DocumentsStage(self.work, cfg))
        manifest = self._timed("finish", self._finish, vocab, infos, stats, graph, packed, written, resumed)
        say(self.timings.table(stats.documents, stats.bytes), self.verbose)
        return manifest

    def _tokenizer(self) -> Vocab:
        if not self.globals.done("tokenizer"):
            tc = self.config.tokenizer
            info = {}
            if tc.source == "train":
                total = sum(f.bytes for f in self.files)
                rate = min(1.0, tc.train_mb * 1e6 / total) if total else 1.0
                limit = int(rate * 2**64) if rate < 1 else None
                sampled = self._timed(
                    "sample", self.engine.run, SampleStage(self.work, self.config, self.files, self.tasks, limit)
                )
                info = {
                    "sample_documents": sum(s["documents"] for s in sampled),
                    "sample_bytes": sum(s["bytes"] for s in sampled),
                }
                self._say(
                    f"training a byte-level BPE of {tc.vocab_size} tokens on {info['sample_bytes'] / 1e6:,.1f} "
                    f"MB of text"
                )
                cap = None if total else tc.train_mb * 1e6  # streamed datasets: the first train_mb of text
                vocab = self._timed("bpe", resolve, tc, lambda: sample_texts(self.work, len(self.tasks), cap))
            else:
                vocab = self._timed("tokenizer", resolve, tc)
            vocab.save(self.work)
            self.globals.mark("tokenizer", info)
        shutil.rmtree(self.work / "sample", ignore_errors=True)  # scratch space: the BPE is trained
        return Vocab.load(self.work)

    def _empty_message(self, stats: ReadStats) -> str:
        details = [f"{count} {reason}" for reason, count in sorted(stats.skipped.items())]
        if self.ignored:
            details.append(
                "ignored files by extension: " + ", ".join(f"{ext} ({n})" for ext, n in sorted(self.ignored.items()))
            )
        where = self.specs[0] if len(self.specs) == 1 else ", ".join(self.specs)
        return (
            f"empty corpus: no documents in {where} ({len(self.files)} readable files"
            + (f"; skipped: {'; '.join(details)}" if details else "")
            + ")"
        )

    # ------------------------------------------------------------------------------------------ global
    def _split(self) -> dict:
        table = DocumentTable(self.work)
        keys, domain_ids = np.asarray(table.keys), np.asarray(table.domain_ids)
        status, duplicate_of = od.exact_duplicates(keys)
        held = heldout_mask(domain_ids, keys, status == od.TRAIN, self.config.heldout_fraction, self.config.seed)
        status[held] = od.HELDOUT
        np.save(self.g / "status.npy", status)
        np.save(self.g / "duplicate_of.npy", duplicate_of)
        return {"exact_duplicates": int((status == od.EXACT_DUP).sum())}

    def _order_without_graph(self) -> dict:
        status = np.load(self.g / "status.npy")
        np.save(self.g / "final_status.npy", status)
        np.save(self.g / "final_duplicate_of.npy", np.load(self.g / "duplicate_of.npy"))
        np.save(self.g / "train_order.npy", od.shuffled(np.flatnonzero(status == od.TRAIN), self.config.seed))
        return {}

    def _order(self, vocab: Vocab) -> dict:
        """The kNN graph (imported, or embedded and searched), near-duplicates and the training order;
        returns what the manifest records of them."""
        if self.globals.done("order"):  # resumed after the order was decided: nothing before it is needed
            return self.globals.info("order")
        ordering = self.config.ordering
        status = np.load(self.g / "status.npy")
        candidates = np.flatnonzero(status != od.EXACT_DUP)
        table = DocumentTable(self.work)
        per_task = np.searchsorted(candidates, table.task_docs)  # first candidate row of each read task
        np.save(self.g / "candidates.npy", candidates)
        np.save(self.g / "candidate_tasks.npy", per_task)
        imported = None
        if ordering.neighbours is not None:
            imported = self._global("import", lambda: self._import_graph(candidates, len(table)))
        graph = {"embedding": None, "search": None, "imported": imported is not None}
        if imported is None or not imported["sims"]:
            graph["embedding"] = self._embed(vocab, candidates)
        if imported is None:
            graph["search"] = self._timed("knn", self._global, "knn", lambda: self._search(len(candidates)))
        if imported is None or not imported["sims"]:
            self._timed("score", self.engine.run, ScoreStage(self.work, self.config))
            sims = np.concatenate([np.load(self.work / "sim" / f"{t:05d}.npy") for t in range(len(self.tasks))])
        else:
            sims = np.load(self.g / "knn_sims.npy")
        if self.save_neighbours is not None:
            self._export_graph(candidates, len(table), sims)
        result = self._timed(
            "order", self._global, "order", lambda: {**graph, **self._dedup_and_walk(candidates, sims)}
        )
        shutil.rmtree(self.work / "sim", ignore_errors=True)  # scratch space: the order is decided
        return result

    def _embed(self, vocab: Vocab, candidates: np.ndarray) -> dict:
        ordering = self.config.ordering
        fit = {}
        if ordering.embedding == "tfidf":
            fit = self._timed("fit", self._global, "fit", lambda: self._fit_tfidf(vocab, candidates))
        start = time.perf_counter()
        infos = self.engine.run(EmbedStage(self.work, self.config))
        dims = ordering.lsa_dims if ordering.embedding == "tfidf" else MINILM_DIMS

        def concatenate() -> dict:
            parts = [np.load(self.work / "emb" / f"{t:05d}.npy", mmap_mode="r") for t in range(len(self.tasks))]
            d = next((p.shape[1] for p in parts if len(p)), dims)
            vectors = np.lib.format.open_memmap(
                self.g / "vectors.npy", mode="w+", dtype=np.float32, shape=(sum(len(p) for p in parts), d)
            )
            row = 0
            for p in parts:
                vectors[row : row + len(p)] = p
                row += len(p)
            vectors.flush()
            return {"dims": d}

        vectors = self._global("vectors", concatenate)
        shutil.rmtree(self.work / "emb", ignore_errors=True)  # (scratch space: every vector is in vectors.npy)
        self.timings.add("embed", time.perf_counter() - start, self.documents, self.text_bytes)
        return {
            "method": ordering.embedding,
            **fit,
            "dims": vectors["dims"],
            "documents": sum(i["documents"] for i in infos),
        }

    def _fit_tfidf(self, vocab: Vocab, candidates: np.ndarray) -> dict:
        ordering, table = self.config.ordering, DocumentTable(self.work)
        sample = candidates
        if len(candidates) > ordering.fit_docs:  # a seeded sample, by content hash (independent of order)
            score = mix64(np.asarray(table.keys)[candidates] ^ np.uint64(self.config.seed * 0x9E3779B97F4A7C15 % 2**64))
            sample = np.sort(candidates[np.lexsort((candidates, score))[: ordering.fit_docs]])
        model = fit_tfidf(table.docs(sample), vocab.vocab_size, ordering.lsa_dims, self.config.seed)
        model.save(self.g)
        return {"fit_documents": int(len(sample)), "dims": 1 if model.components is None else len(model.components)}

    def _search(self, n: int) -> dict:
        ordering = self.config.ordering
        vectors = np.load(self.g / "vectors.npy", mmap_mode="r")
        k = min(ordering.knn_k, max(n - 1, 0))
        path = self.g / "knn_ids.npy"
        ids = np.lib.format.open_memmap(path, mode="w+", dtype=np.int64, shape=(n, k))
        display = StageProgress("knn", n, "docs", self.verbose)
        options = ordering.search_options(self.config.seed)
        if ordering.chunk_docs is None:
            info = search(vectors, options, ids, progress=display.update)
        else:  # the old local behaviour: exact search within each chunk of documents
            options.index = "exact"
            info = {"index": "exact", "chunk_docs": ordering.chunk_docs, "k": k, "documents": n}
            for start in range(0, n, ordering.chunk_docs):
                stop = min(start + ordering.chunk_docs, n)
                local = np.full((stop - start, min(k, stop - start - 1)), -1, dtype=np.int64)
                info["backend"] = search(vectors[start:stop], options, local)["backend"]
                ids[start:stop] = -1
                ids[start:stop, : local.shape[1]] = np.where(local >= 0, local + start, -1)
                display.update(stop)
        display.close()
        ids.flush()
        return info

    def _import_graph(self, candidates: np.ndarray, documents: int) -> dict:
        """Rows of the imported graph for the candidates, in candidate positions (-1: none), self and
        exact duplicates dropped, order kept."""
        ids, sims = load_neighbours(self.config.ordering.neighbours, documents)
        position = np.full(documents + 1, -1, dtype=np.int64)  # position[-1] (an empty slot) stays -1
        position[candidates] = np.arange(len(candidates))
        rows = ids[candidates]
        nbr = position[rows]
        nbr[rows == candidates[:, None]] = -1
        order = np.argsort(nbr < 0, axis=1, kind="stable")
        np.save(self.g / "knn_ids.npy", np.take_along_axis(nbr, order, 1))
        if sims is not None:
            s = np.where(nbr >= 0, sims[candidates], np.nan).astype(np.float32)
            np.save(self.g / "knn_sims.npy", np.take_along_axis(s, order, 1))
        return {"sims": sims is not None, "k": int(ids.shape[1])}

    def _export_graph(self, candidates: np.ndarray, documents: int, sims: np.ndarray) -> None:
        nbr = np.load(self.g / "knn_ids.npy")
        ids = np.full((documents, nbr.shape[1]), -1, dtype=np.int64)
        out_sims = np.full((documents, nbr.shape[1]), np.nan, dtype=np.float32)
        ids[candidates] = np.where(nbr >= 0, candidates[np.maximum(nbr, 0)], -1)
        out_sims[candidates] = sims
        path = Path(self.save_neighbours)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = st.tmp_path(path)
        with open(tmp, "wb") as fh:
            np.savez(fh, ids=ids, sims=out_sims)
        st.commit(tmp, path)

    def _dedup_and_walk(self, candidates: np.ndarray, sims: np.ndarray) -> dict:
        ordering = self.config.ordering
        status, duplicate_of = np.load(self.g / "status.npy"), np.load(self.g / "duplicate_of.npy")
        nbr = np.load(self.g / "knn_ids.npy", mmap_mode="r")
        sims = np.nan_to_num(sims, nan=-np.inf)
        if ordering.dedup_threshold is not None:
            od.remove_near_duplicates(candidates, np.asarray(nbr), sims, status, duplicate_of, ordering.dedup_threshold)
        if ordering.batching == "similarity":
            chunks = (
                None
                if ordering.chunk_docs is None
                else [
                    slice(s, min(s + ordering.chunk_docs, len(candidates)))
                    for s in range(0, len(candidates), ordering.chunk_docs)
                ]
            )
            train = od.walk(candidates, np.asarray(nbr), sims, status, ordering.max_chain_docs, chunks)
        else:
            train = od.shuffled(np.flatnonzero(status == od.TRAIN), self.config.seed)
        np.save(self.g / "final_status.npy", status)
        np.save(self.g / "final_duplicate_of.npy", duplicate_of)
        np.save(self.g / "train_order.npy", train)
        return {"near_duplicates": int((status == od.NEAR_DUP).sum())}

    # ------------------------------------------------------------------------------------------ packing
    def _pack(self, vocab: Vocab) -> dict:
        cfg = self.config
        table = DocumentTable(self.work)
        status = np.load(self.g / "final_status.npy")
        orders = {
            "train": np.load(self.g / "train_order.npy"),
            "heldout": od.order_heldout(np.asarray(table.domain_ids), status, len(table.domains), cfg.seed),
        }
        row_len = cfg.context_len + 1
        plans = {split: pk.plan(table.lengths, order, row_len) for split, order in orders.items()}
        _check_sizes(plans, cfg)
        dtype = np.dtype(np.uint16 if vocab.vocab_size <= 1 << 16 else np.uint32)
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 2]))
        rows_per_shard = max(1, cfg.shard_tokens // row_len)
        splits = {}
        for split, plan in plans.items():
            row_order = rng.permutation(plan.rows) if split == "train" else np.arange(plan.rows, dtype=np.int64)
            np.save(self.g / f"{split}.order.npy", plan.order)
            np.save(self.g / f"{split}.starts.npy", plan.starts)
            np.save(self.g / f"{split}.row_order.npy", row_order.astype(np.int64))
            domain_tokens = pk.domain_tokens(plan, table.domain_ids, len(table.domains))[row_order]
            names = {
                "domain_tokens_file": f"{split}.domain_tokens.npy",
                "row_order_file": f"{split}.row_order.npy",
                "docs_file": f"{split}.docs.npy",
            }
            st.write_npy_atomic(self.out / names["domain_tokens_file"], domain_tokens)
            st.write_npy_atomic(self.out / names["row_order_file"], row_order.astype(np.int64))
            st.write_npy_atomic(
                self.out / names["docs_file"], np.stack([plan.order, plan.starts], axis=1).astype(np.int64)
            )
            per_domain = domain_tokens.sum(axis=0)
            split_domains = np.asarray(table.domain_ids)[plan.order]
            shards = [
                {
                    "split": split,
                    "file": f"{split}-{j:05d}.npy",
                    "first": first,
                    "rows": min(rows_per_shard, plan.rows - first),
                }
                for j, first in enumerate(range(0, plan.rows, rows_per_shard))
            ]
            splits[split] = {
                "rows": plan.rows,
                "tokens": plan.rows * row_len,
                "documents": len(plan.order),
                "dropped_tail_tokens": plan.dropped_tail_tokens,
                "documents_per_domain": {name: int((split_domains == d).sum()) for d, name in enumerate(table.domains)},
                "tokens_per_domain": {name: int(per_domain[d]) for d, name in enumerate(table.domains)},
                "shards": shards,
                **names,
            }  # the order of the manifest's split entries
        return {"dtype": dtype.name, "splits": splits}

    # ------------------------------------------------------------------------------------------ finish
    def _finish(
        self,
        vocab: Vocab,
        infos: list[dict],
        stats: ReadStats,
        graph: dict | None,
        packed: dict,
        written: list[dict],
        resumed: bool,
    ) -> dict:
        cfg, out = self.config, self.out
        table = DocumentTable(self.work)
        st.write_bytes_atomic(out / "tokenizer.json", vocab.to_str().encode("utf-8"))
        _concatenate([self.work / "docs" / f"{t:05d}.jsonl" for t in range(len(self.tasks))], out / "documents.jsonl")
        sources = [s for info in infos for s in info["sources"]]
        st.write_lines_atomic(out / "sources.jsonl", (json.dumps(s, ensure_ascii=False) for s in sources))
        sha256 = {w["file"]: w["sha256"] for w in written}
        splits = {
            name: {
                **info,
                "shards": [{"file": s["file"], "rows": s["rows"], "sha256": sha256[s["file"]]} for s in info["shards"]],
            }
            for name, info in packed["splits"].items()
        }
        files = {
            name: st.sha256_file(out / name)
            for name in ["tokenizer.json", "documents.jsonl", "sources.jsonl"]
            + [info[k] for info in splits.values() for k in ("domain_tokens_file", "row_order_file", "docs_file")]
        }
        files.update({s["file"]: s["sha256"] for info in splits.values() for s in info["shards"]})
        status = np.load(self.g / "final_status.npy")
        manifest = {
            "format": st.FORMAT,
            "format_version": st.FORMAT_VERSION,
            "tokenizer": self._tokenizer_info(vocab),
            "context_len": cfg.context_len,
            "row_len": cfg.context_len + 1,
            "dtype": packed["dtype"],
            "domains": table.domains,
            "seed": cfg.seed,
            "heldout_fraction": cfg.heldout_fraction,
            "ordering": self._ordering_info(graph),
            "documents": {
                "read": len(table),
                "skipped": dict(sorted(stats.skipped.items())),
                "exact_duplicates": int((status == od.EXACT_DUP).sum()),
                "near_duplicates": int((status == od.NEAR_DUP).sum()),
                "train": int((status == od.TRAIN).sum()),
                "heldout": int((status == od.HELDOUT).sum()),
            },
            "splits": splits,
            "sources": {
                "corpus": self.specs[0] if len(self.specs) == 1 else self.specs,
                "files": len(sources),
                "bytes": sum(s.get("bytes", 0) for s in sources),
                "sha256": _sources_digest(sources),
                "list": "sources.jsonl",
                "kinds": compression_summary(self.files),
                "ignored": dict(sorted(self.ignored.items())),
                "text_bytes": stats.bytes,
                "read_options": asdict(cfg.read),
            },
            "files": files,
        }
        manifest["run"] = self._run_info(resumed)
        st.write_json_atomic(out / st.MANIFEST, manifest)  # last: only now is `out` a dataset
        return manifest

    def _tokenizer_info(self, vocab: Vocab) -> dict:
        tc = self.config.tokenizer
        info = {"file": "tokenizer.json", **vocab.info()}
        if tc.source == "train":
            info.update(
                requested_vocab_size=tc.vocab_size,
                train_mb=tc.train_mb,
                min_frequency=tc.min_frequency,
                **self.globals.info("tokenizer"),
            )
        return info

    def _ordering_info(self, graph: dict | None) -> dict:
        ordering = asdict(self.config.ordering)
        search = None if graph is None else graph["search"]
        ordering["knn_backend"] = None if search is None else search.get("backend")
        if self.config.ordering.embedding != "tfidf":
            ordering.pop("lsa_dims")
            ordering.pop("fit_docs")
        ordering["graph"] = None if graph is None else {k: graph[k] for k in ("embedding", "search", "imported")}
        return ordering

    def _run_info(self, resumed: bool) -> dict:
        """What records how this run went (timing, workers, versions): the only part of the manifest that
        differs between runs that wrote the same bytes."""
        import tokenizers

        versions = {"python": sys.version.split()[0], "numpy": np.__version__, "tokenizers": tokenizers.__version__}
        for name in ("faiss", "sklearn", "datatrove", "scipy"):
            module = sys.modules.get(name)
            if module is not None:
                versions[name] = getattr(module, "__version__", None)
        return {
            **self.engine.describe(),
            "resumed": resumed,
            "read_tasks": len(self.tasks),
            "tasks": self.engine.tasks_run,
            "global_stages_run": self.globals_run,
            "stages": self.timings.rows(self.documents, self.text_bytes),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "versions": versions,
        }


def _check_sizes(plans: dict, config: PrepareConfig) -> None:
    row_len = config.context_len + 1
    train, held = plans["train"], plans["heldout"]
    if train.tokens < row_len:
        raise DataError(
            f"context_len={config.context_len} needs {row_len} tokens per row, but the training "
            f"split has only {train.tokens} tokens ({len(train.order)} documents); lower context_len "
            "or add data"
        )
    if config.heldout_fraction > 0 and held.tokens < row_len:
        raise DataError(
            f"context_len={config.context_len} needs {row_len} tokens per row, but the held-out "
            f"split has only {held.tokens} tokens ({len(held.order)} documents); lower "
            "context_len, raise heldout_fraction, or set it to 0"
        )


def _concatenate(parts: list[Path], path: Path) -> None:
    tmp = st.tmp_path(path)
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as fh:
                shutil.copyfileobj(fh, out, 1 << 22)
    st.commit(tmp, path)


def _sources_digest(sources: list[dict]) -> str:
    """One sha256 over every corpus file's path, size and content hash."""
    import hashlib

    h = hashlib.sha256()
    for s in sources:
        h.update(f"{s['path']}\0{s.get('bytes', '')}\0{s.get('sha256', '')}\n".encode("utf-8"))
    return h.hexdigest()
