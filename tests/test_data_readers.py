"""Reading corpora: layouts, domains, ids, streaming formats, and bad input."""

import gzip
import json

import pytest

from diffmoe.data import Corpus, DataError, ReadOptions


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_directory_domains_ids_and_ignored_files(tmp_path):
    root = tmp_path / "corpus"
    (root / "code" / "pkg").mkdir(parents=True)
    (root / "code" / "pkg" / "a.py").write_text("def f():\n    return 1\n")
    (root / "prose").mkdir()
    (root / "prose" / "b.md").write_text("# Title\nSome prose.")
    (root / "top.txt").write_text("a file at the top")
    (root / "prose" / "image.png").write_bytes(b"\x89PNG")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "c.txt").write_text("never read")
    (root / "prose" / "empty.txt").write_text("  \n\t")

    corpus = Corpus(root)
    docs = list(corpus)
    assert [(d.id, d.domain) for d in docs] == [
        ("top.txt", "corpus"),
        ("code/pkg/a.py", "code"),
        ("prose/b.md", "prose"),
    ]
    assert docs[1].text == "def f():\n    return 1\n"
    assert corpus.ignored == {".png": 1}
    assert corpus.stats.documents == 3 and corpus.stats.skipped == {"empty": 1}
    assert list(corpus) == docs  # re-iterable, same order


def test_jsonl_fields_defaults_and_gzip(tmp_path):
    root = tmp_path / "c"
    write_jsonl(root / "wiki.jsonl", [{"text": "alpha", "id": 7}, {"text": "beta", "domain": "news"}])
    (root / "books").mkdir()
    with gzip.open(root / "books" / "part.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"body": "x", "text": "gamma"}) + "\n\n")
    docs = list(Corpus(root))
    assert [(d.text, d.domain, d.id) for d in docs] == [
        ("alpha", "wiki", "7"),
        ("beta", "news", "wiki.jsonl:2"),
        ("gamma", "books", "books/part.jsonl.gz:1"),
    ]


def test_text_field_option(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"content": "hello"}])
    assert [d.text for d in Corpus(tmp_path / "d.jsonl", ReadOptions(text_field="content"))] == ["hello"]
    with pytest.raises(DataError, match=r"d\.jsonl:1: no 'text' field \(fields: content\)"):
        list(Corpus(tmp_path / "d.jsonl"))


def test_parquet_streams_rows_with_domain_and_id(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table(
        {
            "text": [f"document {i}" for i in range(2500)],
            "domain": ["a", "b"] * 1250,
            "id": list(range(2500)),
            "extra": [0] * 2500,
        }
    )
    pq.write_table(table, tmp_path / "part.parquet", row_group_size=1000)
    docs = list(Corpus(tmp_path / "part.parquet"))
    assert len(docs) == 2500
    assert (docs[1].text, docs[1].domain, docs[1].id) == ("document 1", "b", "1")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: no 'text' column \(columns: body\)"):
        list(Corpus(tmp_path / "bad.parquet"))


def _save_to_disk_layout(directory, texts, domains):
    """The layout datasets' save_to_disk writes: Arrow stream files listed in state.json."""
    pa = pytest.importorskip("pyarrow")
    directory.mkdir(parents=True)
    table = pa.table({"text": texts, "domain": domains})
    with pa.OSFile(str(directory / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (directory / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (directory / "dataset_info.json").write_text("{}")


def test_hf_datasets_directory_and_split(tmp_path):
    _save_to_disk_layout(tmp_path / "dd" / "train", ["t1", "t2"], ["x", "y"])
    _save_to_disk_layout(tmp_path / "dd" / "test", ["e1"], ["x"])
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert [(d.text, d.domain) for d in Corpus(tmp_path / "dd")] == [("t1", "x"), ("t2", "y")]
    assert [d.text for d in Corpus(tmp_path / "dd", ReadOptions(hf_split="test"))] == ["e1"]
    assert [d.text for d in Corpus(tmp_path / "dd" / "test")] == ["e1"]
    with pytest.raises(DataError, match="no split 'validation'.*splits: train, test"):
        Corpus(tmp_path / "dd", ReadOptions(hf_split="validation"))


def test_real_datasets_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one", "two"], "id": ["a", "b"]}).save_to_disk(str(tmp_path / "ds"))
    assert [(d.text, d.id, d.domain) for d in Corpus(tmp_path / "ds")] == [("one", "a", "ds"), ("two", "b", "ds")]


@pytest.mark.parametrize(
    "name, content, reason, message",
    [
        ("bin.txt", b"abc\x00def", "binary", r"bin\.txt: binary file"),
        ("latin.txt", "caf\u00e9".encode("latin-1"), "invalid_utf8", r"latin\.txt: invalid UTF-8 at byte 3"),
    ],
)
def test_bad_text_files_raise_or_skip(tmp_path, name, content, reason, message):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / name).write_bytes(content)
    (tmp_path / "d" / "good.txt").write_text("fine")
    with pytest.raises(DataError, match=message):
        list(Corpus(tmp_path / "d"))
    corpus = Corpus(tmp_path / "d", ReadOptions(on_bad_input="skip"))
    assert [d.text for d in corpus] == ["fine"]
    assert corpus.stats.skipped == {reason: 1}
    assert corpus.stats.first_skipped[reason].endswith(name)


def test_malformed_jsonl_lines_name_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        b'{"text": "ok"}\n{"text": "broken"\n[1, 2]\n{"text": 3}\n{"text": "x", "domain": ""}\n'
        b'{"text": "caf\xe9"}\n{"text": "also ok"}\n'
    )
    with pytest.raises(DataError, match=r"d\.jsonl:2: malformed JSON"):
        list(Corpus(path))
    corpus = Corpus(path, ReadOptions(on_bad_input="skip"))
    assert [d.text for d in corpus] == ["ok", "also ok"]
    assert corpus.stats.skipped == {"malformed_json": 2, "bad_record": 2, "invalid_utf8": 1}
    assert corpus.stats.first_skipped["bad_record"] == f"{path}:4"


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": 3}', r":1: field 'text' must be a string, got int"),
        ('{"text": "a", "domain": 5}', r":1: field 'domain' must be a non-empty string, got 5"),
        ('"just a string"', r":1: expected a JSON object, got str"),
    ],
)
def test_bad_records_are_named(tmp_path, line, message):
    (tmp_path / "d.jsonl").write_text(line + "\n")
    with pytest.raises(DataError, match=message):
        list(Corpus(tmp_path / "d.jsonl"))


def test_missing_and_unsupported_paths(tmp_path):
    with pytest.raises(DataError, match="corpus not found"):
        Corpus(tmp_path / "nope")
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(DataError, match=r"unsupported corpus file .*x\.bin"):
        Corpus(tmp_path / "x.bin")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="not a readable gzip file"):
        list(Corpus(tmp_path / "bad.jsonl.gz"))
    with pytest.raises(DataError, match="on_bad_input"):
        Corpus(tmp_path, ReadOptions(on_bad_input="ignore"))


def test_domain_from_top_dir_field_and_none(tmp_path):
    write_jsonl(
        tmp_path / "c" / "web" / "a.jsonl",
        [{"text": "one", "domain": "news", "lang": "en"}, {"text": "two", "lang": "fr"}],
    )
    (tmp_path / "c" / "books").mkdir()
    (tmp_path / "c" / "books" / "b.txt").write_text("three")

    def domains(domain_from):
        return [d.domain for d in Corpus(tmp_path / "c", ReadOptions(domain_from=domain_from))]

    assert domains("auto") == ["books", "news", "web"]  # the record's domain field, else the folder
    assert domains("top-dir") == ["books", "web", "web"]
    assert domains("field:lang") == ["books", "en", "fr"]  # text files have no fields: their folder
    assert domains("none") == ["corpus", "corpus", "corpus"]
    write_jsonl(tmp_path / "c" / "web" / "b.jsonl", [{"text": "four"}])
    with pytest.raises(DataError, match=r"b\.jsonl:1: no 'lang' field to take the domain from"):
        list(Corpus(tmp_path / "c", ReadOptions(domain_from="field:lang")))
    with pytest.raises(DataError, match="invalid domain_from='folder'"):
        Corpus(tmp_path / "c", ReadOptions(domain_from="folder"))


def test_several_specs_globs_and_a_damaged_zstd_stream(tmp_path):
    zstd = pytest.importorskip("zstandard")
    write_jsonl(tmp_path / "a" / "x.jsonl", [{"text": "from a"}])
    write_jsonl(tmp_path / "b" / "sub" / "y.jsonl", [{"text": "from b"}])
    (tmp_path / "b" / "sub" / "z.txt").write_text("not matched")
    docs = list(Corpus([tmp_path / "a", str(tmp_path / "b" / "**" / "*.jsonl")]))
    assert [(d.text, d.source, d.id, d.domain) for d in docs] == [
        ("from a", "a/x.jsonl", "a/x.jsonl:1", "x"),
        ("from b", "b/sub/y.jsonl", "b/sub/y.jsonl:1", "sub"),
    ]
    with pytest.raises(DataError, match=r"the pattern matches no file"):
        Corpus(str(tmp_path / "a" / "*.parquet"))
    raw = zstd.ZstdCompressor().compress(b'{"text": "a document"}\n' * 200)
    (tmp_path / "bad.jsonl.zst").write_bytes(raw[:20] + b"\x00" * 16 + raw[36:])
    with pytest.raises(DataError, match=r"bad\.jsonl\.zst: not a readable zstd file"):
        list(Corpus(tmp_path / "bad.jsonl.zst"))
