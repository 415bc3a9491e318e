"""Fuzzing (hypothesis) of the three loaders a user feeds files to: the config loader, the corpus readers
and the checkpoint loader. Random and mutated inputs must give the project's error, naming the file,
field or line, and never another exception or a half-written output. Deterministic (derandomize) and
bounded, so that each test takes a few seconds on one core."""

import gzip
import json
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffmoe.config import ConfigError, load_config
from diffmoe.data import Corpus, DataError, ReadOptions

FUZZ = settings(
    derandomize=True, max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "01-tiny-lory-8e.yaml"


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ------------------------------------------------------------------------------------------ configs
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=True), st.text(max_size=8)
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)


def _config_fields(data: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        out += _config_fields(value, name + ".") if isinstance(value, dict) and value else [name]
    return out


BASE = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
FIELDS = _config_fields(BASE)


def _load_or_config_error(path: Path, overrides=()) -> None:
    before = _listing(path.parent)
    try:
        load_config(str(path), list(overrides))
    except ConfigError as err:
        message = str(err)
        assert "\n" not in message, message  # one line, naming the file, the field or the override
        assert str(path) in message or message.startswith(("invalid config: ", "invalid override ")), message
    assert _listing(path.parent) == before  # a config load writes nothing


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(FIELDS), values), min_size=1, max_size=3))
def test_mutated_config_fields_give_a_config_error_naming_the_field(tmp_path_factory, changes):
    data = json.loads(json.dumps(BASE))
    for field, value in changes:
        node = data
        *parents, leaf = field.split(".")
        for part in parents:
            node = node[part] if isinstance(node.get(part), dict) else node.setdefault(part, {})
        node[leaf] = value
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    try:
        load_config(str(path))
    except ConfigError as err:
        leaves = {f.split(".")[-1] for f, _ in changes}
        assert any(leaf in str(err) for leaf in leaves) or "must be a mapping" in str(err), (changes, str(err))


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_random_config_files_give_a_config_error(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_bytes(content)
    _load_or_config_error(path)


@FUZZ
@given(st.integers(0, 2000), st.binary(min_size=1, max_size=4), st.booleans())
def test_mutated_config_files_give_a_config_error(tmp_path_factory, at, junk, truncate):
    text = CONFIG.read_bytes()
    at = at % len(text)
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_bytes(text[:at] if truncate else text[:at] + junk + text[at + len(junk) :])
    _load_or_config_error(path)


override_keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=12))
overrides = st.one_of(
    st.text(max_size=20),
    st.builds(lambda k, v: f"{k}={v}", override_keys, st.text(max_size=10)),
    st.builds(lambda k, v: f"{k}={yaml.safe_dump(v).strip()}", override_keys, values),
)


@FUZZ
@given(st.lists(overrides, min_size=1, max_size=3), st.sampled_from(["base", "list", "scalar", "empty"]))
def test_random_overrides_give_a_config_error(tmp_path_factory, items, base):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(
        {"base": CONFIG.read_text(encoding="utf-8"), "list": "- 1\n", "scalar": "3\n", "empty": ""}[base],
        encoding="utf-8",
    )
    _load_or_config_error(path, items)


# ------------------------------------------------------------------------------------------ corpus readers
def _read_all(path: Path, on_bad_input: str = "error") -> list:
    try:
        docs = list(Corpus(path, ReadOptions(on_bad_input=on_bad_input)))
    except DataError as err:
        message = str(err)
        assert str(path) in message or path.name in message, message
        return []
    for doc in docs:  # documents are valid text: they encode, and name their domain
        doc.text.encode("utf-8")
        doc.domain.encode("utf-8")
        assert doc.text.strip() and doc.domain.strip()
    return docs


jsonl_lines = st.one_of(
    st.builds(
        lambda v: json.dumps(v), st.dictionaries(st.sampled_from(["text", "domain", "id", "x"]), values, max_size=4)
    ),
    st.builds(lambda t, d: json.dumps({"text": t, "domain": d}), st.text(max_size=20), st.text(max_size=5)),
    st.builds(lambda v: json.dumps(v), values),
    st.text(max_size=30),
)


@FUZZ
@given(st.lists(jsonl_lines, max_size=6), st.binary(max_size=8), st.sampled_from(["error", "skip"]))
def test_random_jsonl_gives_documents_or_a_data_error_naming_the_line(tmp_path_factory, lines, junk, policy):
    path = tmp_path_factory.mktemp("jsonl") / "c.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + b"\n" + junk)
    _read_all(path, policy)


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 400), st.booleans())
def test_mutated_gzip_jsonl_gives_a_data_error(tmp_path_factory, junk, at, truncate):
    raw = gzip.compress(b"".join(json.dumps({"text": f"document {i} " * 5}).encode() + b"\n" for i in range(20)))
    at = at % len(raw)
    path = tmp_path_factory.mktemp("gz") / "c.jsonl.gz"
    path.write_bytes(raw[:at] if truncate else raw[:at] + junk + raw[at + len(junk) :])
    _read_all(path)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["a", "b", ".hidden", "__pycache__"]),
        st.dictionaries(
            st.sampled_from(["x.txt", "y.md", "z.py", "w.jsonl", "v.bin"]),
            st.binary(max_size=40) | st.text(max_size=40).map(str.encode),
            max_size=3,
        ),
        max_size=3,
    ),
    st.sampled_from(["error", "skip"]),
)
def test_random_text_directories_give_documents_or_a_data_error(tmp_path_factory, tree, policy):
    root = tmp_path_factory.mktemp("dir") / "corpus"
    root.mkdir()
    for folder, files in tree.items():
        (root / folder).mkdir()
        for name, content in files.items():
            (root / folder / name).write_bytes(content)
    _read_all(root, policy)


def test_deeply_nested_json_is_a_data_error(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n' + "[" * 100_000 + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"c\.jsonl:2: "):
        list(Corpus(path))


def test_a_lone_surrogate_in_jsonl_is_a_data_error_naming_the_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(
        '{"text": "fine"}\n{"text": "bad \\ud800 text"}\n{"text": "x", "domain": "\\udfff"}\n', encoding="utf-8"
    )
    with pytest.raises(DataError, match=r"c\.jsonl:2: field 'text': invalid Unicode"):
        list(Corpus(path))
    corpus = Corpus(path, ReadOptions(on_bad_input="skip"))
    assert [d.text for d in corpus] == ["fine"] and corpus.stats.skipped["invalid_utf8"] == 2


def test_a_damaged_gzip_stream_is_a_data_error(tmp_path):
    raw = gzip.compress(b'{"text": "a document"}\n' * 50)
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(raw[:4] + b"\x00" * 7 + raw[11:])
    with pytest.raises(DataError, match=r"c\.jsonl\.gz: not a readable gzip file"):
        list(Corpus(path))


# ------------------------------------------------------------------------------------------ prepare
@settings(derandomize=True, max_examples=10, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.lists(jsonl_lines, min_size=1, max_size=4), st.binary(max_size=6))
def test_a_failed_prepare_leaves_no_dataset(tmp_path_factory, lines, junk):
    from diffmoe.data import PrepareConfig, TokenizerConfig, prepare

    base = tmp_path_factory.mktemp("prep")
    (base / "corpus" / "prose").mkdir(parents=True)
    for i in range(12):
        (base / "corpus" / "prose" / f"d{i}.txt").write_text(f"document {i}: " + "some words here " * 20)
    (base / "corpus" / "prose" / "z.jsonl").write_bytes("\n".join(lines).encode() + b"\n" + junk)
    try:
        prepare(
            base / "corpus",
            base / "data",
            PrepareConfig(context_len=16, heldout_fraction=0.2, tokenizer=TokenizerConfig(vocab_size=300)),
        )
    except DataError as err:
        assert "z.jsonl" in str(err) and "\n" not in str(err), str(err)
        assert not (base / "data" / "manifest.json").exists()
        assert not (base / "data").exists() or not any((base / "data").iterdir())
    else:
        assert (base / "data" / "manifest.json").is_file()


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def tiny_run(tiny_dataset, tmp_path_factory):
    from test_train import run_config

    from diffmoe.train import train

    run_dir = tmp_path_factory.mktemp("fuzz") / "run"
    train(run_config(tiny_dataset, "topk", steps=2, checkpoint_every=2), run_dir, show_progress=False)
    return run_dir


def _copy(run_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    from diffmoe.train.checkpoint import latest_checkpoint

    copy = tmp_path_factory.mktemp("ck") / "run"
    shutil.copytree(run_dir, copy)
    return copy, latest_checkpoint(copy)


def _load_or_checkpoint_error(run: Path, ckpt: Path, damaged: Path) -> None:
    """Every loader either loads or raises a one-line CheckpointError naming the damaged file (or its
    checkpoint); no other exception."""
    import warnings

    from diffmoe.config import load_config
    from diffmoe.model import Decoder
    from diffmoe.runs import load_run
    from diffmoe.train.checkpoint import CheckpointError, load_checkpoint, read_trainer_state
    from diffmoe.train.optim import build_optimizer

    def attempt(load):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                load()
        except CheckpointError as err:
            message = str(err)
            assert "\n" not in message.strip(), message
            assert str(damaged) in message or str(ckpt) in message or str(run) in message, message

    attempt(lambda: read_trainer_state(ckpt))
    attempt(lambda: load_run(run))
    attempt(lambda: load_run(run, ckpt))
    cfg = load_config(str(run / "config.yaml"))
    model = Decoder(cfg.model)
    attempt(lambda: load_checkpoint(ckpt, model, build_optimizer(model, cfg.train)))


def _mutate(data: bytes, at: int, junk: bytes, mode: str) -> bytes:
    at = at % max(len(data), 1)
    if mode == "truncate":
        return data[:at]
    if mode == "insert":
        return data[:at] + junk + data[at:]
    return data[:at] + junk + data[at + len(junk) :]


CKPT = settings(
    derandomize=True, max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)


@CKPT
@given(
    st.one_of(values, st.binary(max_size=40)),
    st.sampled_from(["whole", "field", "drop", "bytes"]),
    st.integers(0, 10**6),
    st.binary(min_size=1, max_size=4),
)
def test_mutated_trainer_json_gives_a_checkpoint_error(tiny_run, tmp_path_factory, value, mode, at, junk):
    run, ckpt = _copy(tiny_run, tmp_path_factory)
    path = ckpt / "trainer.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    keys = sorted(meta)
    if mode == "whole":
        path.write_bytes(value if isinstance(value, bytes) else json.dumps(value).encode())
    elif mode in ("field", "drop"):
        key = keys[at % len(keys)]
        if mode == "drop":
            del meta[key]
        else:
            meta[key] = value.hex() if isinstance(value, bytes) else value
        path.write_text(json.dumps(meta), encoding="utf-8")
    else:
        path.write_bytes(_mutate(path.read_bytes(), at, junk, "overwrite"))
    _load_or_checkpoint_error(run, ckpt, path)


@CKPT
@given(
    st.integers(0, 10**6),
    st.binary(min_size=1, max_size=8),
    st.sampled_from(["truncate", "insert", "overwrite"]),
    st.integers(0, 100),
    st.booleans(),
)
def test_mutated_safetensors_give_a_checkpoint_error(tiny_run, tmp_path_factory, at, junk, mode, pick, header):
    run, ckpt = _copy(tiny_run, tmp_path_factory)
    files = sorted(ckpt.rglob("*.safetensors"))
    path = files[pick % len(files)]
    data = path.read_bytes()
    if header:  # aim at the JSON header, where a flipped byte breaks parsing rather than a weight
        at = at % (8 + int.from_bytes(data[:8], "little"))
    path.write_bytes(_mutate(data, at, junk, mode))
    _load_or_checkpoint_error(run, ckpt, path)
