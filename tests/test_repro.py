"""The reproduction suite's machinery at toy size: spec loading and errors, paired statistics against
numpy / scipy, a 2-arm x 2-seed experiment whose report holds the runs' own numbers, and resuming."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import write_fixture_corpus

from diffmoe.config import ConfigError
from diffmoe.repro import stats
from diffmoe.repro.spec import Comparison, Experiments, Term, run_config, run_key
from diffmoe.repro.suite import ReproOptions, run_repro

EXPERIMENTS = Path(__file__).parent.parent / "experiments"


# ------------------------------------------------------------------ shipped definitions
@pytest.mark.parametrize("suite", ["micro", "gpu"])
def test_every_shipped_arm_builds_in_every_suite(suite):
    import torch

    from diffmoe import Decoder

    exp = Experiments(EXPERIMENTS)
    s = exp.suite(suite)
    groups = exp.groups()
    assert [g.name for g in groups] == sorted(g.name for g in groups) and groups[0].name == "00-pilot"
    assert {g.claim for g in groups} >= {"pilot"} | {str(i) for i in range(1, 12)}  # every claim of the issue
    active = {}
    for g in groups:
        for name in g.arms:
            arm = exp.arm(name)
            assert arm.dataset in s.datasets, (name, arm.dataset)
            cfg = run_config(s, arm, 0, "data")
            with torch.device("meta"):
                active[name] = Decoder(cfg.model).parameter_counts()["active"]
    # compared arms have the same active parameters (up to the routers' d x E weights), except the
    # pilot's smaller width
    dense = active.pop("dense")
    for name, n in active.items():
        if "small" not in name:
            assert dense <= n <= 1.02 * dense, (name, n, dense)


def test_run_key_changes_with_the_config_and_the_dataset_recipe():
    exp = Experiments(EXPERIMENTS)
    s = exp.suite("micro")
    lory = exp.arm("lory-8e")
    assert run_key(s, lory, 0) != run_key(s, lory, 1) != run_key(s, exp.arm("lory-16e"), 1)
    assert run_key(s, lory, 0) == run_key(s, lory, 0)
    s.run["train"]["lr"] *= 2
    assert run_key(s, lory, 0) != run_key(exp.suite("micro"), lory, 0)
    s = exp.suite("micro")
    s.datasets["similarity"]["vocab_size"] = 4096
    assert run_key(s, lory, 0) != run_key(exp.suite("micro"), lory, 0)


def _write(root: Path, rel: str, data: dict) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _toy_experiments(root: Path) -> Path:
    _write(
        root,
        "suites/toy.yaml",
        {
            "description": "toy",
            "seeds": 2,
            "corpus_mb": None,
            "datasets": {"similarity": {"context_len": 32, "vocab_size": 384, "heldout_fraction": 0.1}},
            "vars": {"T": 8},
            "run": {
                "model": {"vocab_size": 384, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 48, "max_seq_len": 32},
                "data": {"batch_size": 4, "eval_batches": None},
                "train": {
                    "steps": 6,
                    "lr": 0.003,
                    "log_every": 1,
                    "routing_log_every": 3,
                    "eval_every": 3,
                    "checkpoint_every": 3,
                    "keep_checkpoints": 2,
                    "tensorboard": False,
                },
            },
        },
    )
    _write(root, "arms/dense.yaml", {"description": "dense"})
    _write(
        root,
        "arms/lory.yaml",
        {
            "description": "Lory",
            "run": {"model": {"ffn": "lory", "moe": {"num_experts": 4, "lory": {"segment_len": "$T"}}}},
        },
    )
    _write(
        root,
        "arms/lory-prefix.yaml",
        {
            "description": "Lory, prefix routing",
            "run": {
                "model": {
                    "ffn": "lory",
                    "moe": {
                        "num_experts": 4,
                        "router_init_std": 1.0,  # routing far from uniform
                        "lory": {"segment_len": "$T", "routing": "prefix"},
                    },
                }
            },
        },
    )
    _write(
        root,
        "groups/01-toy.yaml",
        {
            "claim": "1",
            "title": "Lory vs dense",
            "paper": "Lory is better.",
            "arms": ["dense", "lory"],
            "comparisons": [
                {"name": "Lory - dense", "terms": ["lory:loss.all", "-dense:loss.all"], "expect": "negative"},
                {
                    "name": "prompt - segment",
                    "terms": ["lory:prompt.all", "-lory:after_T.all"],
                    "expect": "comparable",
                    "margin": 0.5,
                    "key": False,
                },
            ],
            "plots": ["curves", "domains", "routing", "usage"],
        },
    )
    return root


def test_spec_errors_name_the_file_and_field(tmp_path):
    root = _toy_experiments(tmp_path / "exp")
    exp = Experiments(root)
    _write(
        root,
        "groups/02-bad.yaml",
        {
            "claim": "2",
            "title": "t",
            "paper": "p",
            "arms": ["dense"],
            "comparisons": [{"name": "x", "terms": ["lory:loss.all"], "expect": "negative"}],
        },
    )
    with pytest.raises(ConfigError, match=r"02-bad.yaml: comparisons\[0\]: term 'lory:loss.all' must be"):
        exp.group("02-bad")
    _write(
        root,
        "groups/02-bad.yaml",
        {
            "claim": "2",
            "title": "t",
            "paper": "p",
            "arms": ["dense"],
            "comparisons": [{"name": "x", "terms": ["dense:loss.all"], "expect": "lower"}],
        },
    )
    with pytest.raises(ConfigError, match="expect='lower': choose one of negative, positive, comparable, open"):
        exp.group("02-bad")
    _write(root, "groups/02-bad.yaml", {"claim": "2", "title": "t", "paper": "p", "arms": []})
    with pytest.raises(ConfigError, match="02-bad.yaml: missing field.s. comparisons"):
        exp.group("02-bad")
    with pytest.raises(ConfigError, match="unknown group.s. nope; known: 01-toy, 02-bad"):
        exp.groups(["nope"])
    assert [g.name for g in exp.groups(["toy"])] == ["01-toy"]  # the name without its number works too
    _write(root, "arms/bad.yaml", {"description": "d", "run": {"model": {"d_ff": "$D"}}})
    with pytest.raises(ConfigError, match=r"arm bad.model.d_ff: \$D is not one of the suite's vars \(T\)"):
        run_config(exp.suite("toy"), exp.arm("bad"), 0, "data")
    _write(root, "arms/bad.yaml", {"description": "d", "run": {"model": {"d_ff": -3}}})
    with pytest.raises(ConfigError, match="arm bad in suite toy: invalid config: d_ff=-3"):
        run_config(exp.suite("toy"), exp.arm("bad"), 0, "data")
    with pytest.raises(ConfigError, match="unknown suite 'big'.*known: toy"):
        exp.suite("big")
    with pytest.raises(ConfigError, match="not an experiments directory"):
        Experiments(tmp_path)


# ------------------------------------------------------------------ statistics
def test_t_quantiles_equal_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in range(1, 31):
        assert stats.t95(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=6e-4)
    assert stats.t95(200) == pytest.approx(scipy_stats.t.ppf(0.975, 200), abs=0.02)


def test_summary_equals_numpy():
    values = {0: -0.061, 1: -0.055, 2: -0.058}
    s = stats.summarise(values)
    xs = np.array(list(values.values()))
    assert s.mean == pytest.approx(xs.mean()) and s.sd == pytest.approx(xs.std(ddof=1))
    half = 4.303 * xs.std(ddof=1) / math.sqrt(3)
    assert (s.lo, s.hi) == (pytest.approx(xs.mean() - half), pytest.approx(xs.mean() + half))
    one = stats.summarise({4: 1.5})
    assert one.n == 1 and one.mean == 1.5 and math.isnan(one.sd) and math.isnan(one.lo)
    assert stats.summarise({}) is None


@pytest.mark.parametrize(
    "expect,values,margin,want",
    [
        ("negative", [-0.06, -0.05, -0.055], 0, "yes"),
        ("negative", [0.06, 0.05, 0.055], 0, "no"),
        ("negative", [-0.06, 0.05, -0.01], 0, "inconclusive"),
        ("positive", [0.06, 0.05, 0.055], 0, "yes"),
        ("comparable", [0.001, -0.002, 0.0], 0.02, "yes"),
        ("comparable", [0.1, 0.11, 0.12], 0.02, "no"),
        ("comparable", [0.01, 0.03, 0.02], 0.02, "inconclusive"),
        ("open", [-0.06, -0.05, -0.055], 0, "lower"),
        ("open", [0.06, 0.05, 0.055], 0, "higher"),
        ("open", [-0.06, 0.05, -0.01], 0, "no difference detected"),
        ("negative", [-0.06], 0, "inconclusive (1 seed)"),
    ],
)
def test_verdicts(expect, values, margin, want):
    c = Comparison("c", [Term(1, "a", "loss.all")], expect, margin)
    assert stats.verdict(c, stats.summarise(dict(enumerate(values)))) == want
    assert stats.verdict(c, None) == "not run"


def test_paired_uses_only_seeds_with_every_term():
    c = Comparison("c", [Term(1, "b", "loss.all"), Term(-1, "a", "loss.all")], "negative")
    results = {
        "a": {0: {"metrics": {"loss.all": 3.0}}, 1: {"metrics": {"loss.all": 3.2}}},
        "b": {0: {"metrics": {"loss.all": 2.9}}, 2: {"metrics": {"loss.all": 2.0}}},
    }
    s = stats.paired(c, results, range(3))
    assert s.values == {0: pytest.approx(-0.1)}


# ------------------------------------------------------------------ a toy experiment end to end
def _final_eval_loss(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "eval"][-1]["all.loss"]


def test_toy_experiment_report_numbers_and_resume(tmp_path, monkeypatch):
    root = _toy_experiments(tmp_path / "exp")
    corpus = write_fixture_corpus(tmp_path / "corpus")
    opts = ReproOptions(
        experiments=root, suite="toy", work=tmp_path / "work", out=tmp_path / "out", corpus=corpus, verbose=False
    )
    report = run_repro(opts)

    runs = {
        arm: sorted(p for p in (tmp_path / "work" / "runs" / arm).glob("s*-*") if p.is_dir())
        for arm in ("dense", "lory")
    }
    assert [p.name.split("-")[0] for p in runs["dense"]] == ["s0", "s1"] and len(runs["lory"]) == 2
    # the comparison, per seed, from the runs' own metrics.jsonl (the trainer's last evaluation)
    want = {s: _final_eval_loss(runs["lory"][s]) - _final_eval_loss(runs["dense"][s]) for s in (0, 1)}
    group = report["groups"][0]
    first = group["comparisons"][0]
    assert first["summary"]["values"] == {str(s): pytest.approx(v, abs=1e-12) for s, v in want.items()}
    xs = np.array(list(want.values()))
    assert first["summary"]["mean"] == pytest.approx(xs.mean()) and first["summary"]["sd"] == pytest.approx(
        xs.std(ddof=1)
    )
    assert first["ppl_change"] == pytest.approx(math.expm1(xs.mean()))
    lo, hi = first["summary"]["lo"], first["summary"]["hi"]
    assert first["verdict"] == ("yes" if hi < 0 else "no" if lo > 0 else "inconclusive") == group["verdict"]
    assert first["arms_alone"]["dense:loss.all"]["values"] == {
        str(s): pytest.approx(_final_eval_loss(runs["dense"][s])) for s in (0, 1)
    }
    alone = [np.std([_final_eval_loss(runs[arm][s]) for s in (0, 1)], ddof=1) for arm in ("lory", "dense")]
    assert first["beyond_spread"] == (abs(xs.mean()) > max(alone))
    second = group["comparisons"][1]
    assert not second["key"] and second["summary"]["n"] == 2 and second["verdict"] in ("yes", "no", "inconclusive")

    md = (tmp_path / "out" / "REPORT.md").read_text()
    assert f"| Lory - dense | 2 | {xs.mean():+.4f} | {xs.std(ddof=1):.4f} |" in md
    assert "| 1. Lory vs dense | Lory is better. |" in md and "diffmoe repro --suite toy --only 01-toy" in md
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["groups"][0]["comparisons"][0]["summary"] == first["summary"]
    for plot in group["plots"].values():
        assert (tmp_path / "out" / plot).read_bytes()[:4] == b"\x89PNG"
    assert set(group["plots"]) == {"curves", "domains", "routing lory", "usage"}

    # the first segment and the rest make up the whole sequence
    for run in runs["lory"]:
        m = json.loads((run / "result.json").read_text())["metrics"]
        assert m["first_T.all"] * 8 + m["after_T.all"] * 24 == pytest.approx(m["loss.all"] * 32, rel=1e-9)

    # a second call trains nothing and writes the same report
    import diffmoe.train

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(diffmoe.train, "train", no_training)
    assert run_repro(opts)["groups"] == report["groups"]
    monkeypatch.undo()

    # a run stopped mid-way (its last checkpoint and result gone) resumes from step 3 to the same numbers
    import shutil

    result = runs["lory"][1] / "result.json"
    before = json.loads(result.read_text())["metrics"]
    result.unlink()
    shutil.rmtree(runs["lory"][1] / "checkpoints" / "step-00000006")
    again = run_repro(opts)["groups"][0]["comparisons"][0]["summary"]
    assert {k: again["values"][k] for k in again["values"]} == {
        k: pytest.approx(v, abs=1e-6) for k, v in first["summary"]["values"].items()
    }
    after = json.loads(result.read_text())["metrics"]
    assert set(after) == set(before)
    assert all(
        after[k] == pytest.approx(before[k], abs=1e-6) for k in before if k not in ("seconds_per_step", "train_minutes")
    )

    # a changed arm trains anew in a new directory; the old run stays
    _write(root, "suites/toy.yaml", {**yaml.safe_load((root / "suites/toy.yaml").read_text()), "seeds": 1})
    lory = yaml.safe_load((root / "arms/lory.yaml").read_text())
    lory["run"]["model"]["moe"]["num_experts"] = 2
    _write(root, "arms/lory.yaml", lory)
    changed = run_repro(opts)  # (now seed 0 only)
    assert len([p for p in (tmp_path / "work" / "runs" / "lory").glob("s0-*") if p.is_dir()]) == 2
    assert changed["groups"][0]["comparisons"][0]["summary"]["n"] == 1


def test_run_lock_is_exclusive_and_freed_when_its_holder_dies(tmp_path):
    import subprocess
    import sys

    from diffmoe.repro.runner import file_lock

    lock = tmp_path / "runs" / "a" / "s0-x.lock"
    with file_lock(lock, wait=False) as held:
        assert held
        with file_lock(lock, wait=False) as again:  # another open file: another holder
            assert not again
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
            "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
            str(lock),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with file_lock(lock, wait=False) as held:
        assert not held
    holder.kill()
    holder.wait()
    with file_lock(lock, wait=False) as held:  # the kernel released the dead holder's lock
        assert held


def test_demo_defaults_train_the_suite_arms():
    """The demo's models and recipe are the micro suite's (pilot budget), so the suite's spread applies."""
    from diffmoe.demo import SUITE_ARMS, DemoConfig, model_configs
    from diffmoe.demo import run_config as demo_run_config

    exp = Experiments(EXPERIMENTS)
    suite = exp.suite("micro")
    cfg = DemoConfig()
    models = model_configs(cfg, suite.run["model"]["vocab_size"])
    recipe = suite.datasets["similarity"]
    assert (recipe["context_len"], recipe["vocab_size"], suite.corpus_mb) == (
        cfg.context_len,
        cfg.vocab_size,
        cfg.mb_per_domain,
    )
    for model, arms in SUITE_ARMS.items():
        for name in arms:
            want = run_config(suite, exp.arm(name), cfg.seed, "data")
            got = demo_run_config(cfg, model, models[model], want.train.steps, Path("data"))
            assert got.model == want.model and got.data == want.data, name
            for field in (
                "steps",
                "lr",
                "min_lr_ratio",
                "warmup_frac",
                "betas",
                "weight_decay",
                "grad_clip",
                "bf16",
                "seed",
                "dense_warmup_frac",
            ):
                assert getattr(got.train, field) == getattr(want.train, field), (name, field)
    assert run_config(suite, exp.arm("dense-short"), 0, "d").train.steps == cfg.max_steps


def test_demo_prints_the_suite_spread(tmp_path):
    from diffmoe.demo import suite_spread

    def runs(losses, steps):
        return {"runs": {str(s): {"steps": steps, "metrics": {"loss.all": v}} for s, v in enumerate(losses)}}

    report = tmp_path / "report.json"
    report.write_text(
        json.dumps(
            {
                "arms": {
                    "dense-short": runs([3.70, 3.74, 3.66], 1000),
                    "lory-8e-short": runs([3.64, 3.69, 3.60], 1000),
                    "dense": runs([3.5, 3.6, 3.55], 2000),
                }
            }
        )
    )
    text = suite_spread(report, 1000)
    d = np.array([3.70, 3.74, 3.66])
    assert f"dense alone: held-out loss {d.mean():.4f} +- {d.std(ddof=1):.4f} nats over 3 seeds" in text
    diff = np.array([3.64, 3.69, 3.60]) - d
    assert f"Lory - dense, paired by seed: {diff.mean():+.4f} +- {diff.std(ddof=1):.4f} nats" in text
    assert "sparsemixer" not in text
    assert "dense alone: held-out loss 3.5500" in suite_spread(report, 2000)
    assert suite_spread(report, 1500) is None and suite_spread(tmp_path / "missing.json", 1000) is None


def test_prefix_arm_is_measured_with_prefix_routing(tmp_path):
    from diffmoe.data import PackedDataset
    from diffmoe.eval.perplexity import evaluate
    from diffmoe.repro.runner import ensure_data, run_arm
    from diffmoe.runs import load_run

    root = _toy_experiments(tmp_path / "exp")
    exp = Experiments(root)
    suite = exp.suite("toy")
    ensure_data(tmp_path / "work", suite, ["similarity"], write_fixture_corpus(tmp_path / "corpus"))
    result = run_arm(tmp_path / "work", suite, exp.arm("lory-prefix"), 0, verbose=False)
    run = next(p for p in (tmp_path / "work" / "runs" / "lory-prefix").iterdir() if p.is_dir())
    _, model, _ = load_run(run)
    heldout = PackedDataset(tmp_path / "work" / "data" / "similarity", "heldout")
    prefix = evaluate(model, heldout, 4, routing="prefix")["all"]["loss"]
    segment = evaluate(model, heldout, 4, routing="segment")["all"]["loss"]
    assert abs(prefix - segment) > 1e-5  # the modes differ (a little, after 6 steps), so the checks can fail
    assert result["metrics"]["loss.all"] == pytest.approx(prefix, abs=1e-8)
    assert _final_eval_loss(run) == pytest.approx(prefix, abs=1e-8)  # the trainer's evaluations too


def test_definitions_are_checked_before_training(tmp_path):
    from diffmoe.repro.spec import check_group

    root = _toy_experiments(tmp_path / "exp")
    _write(
        root,
        "groups/02-late.yaml",
        {
            "claim": "2",
            "title": "t",
            "paper": "p",
            "arms": ["dense", "lory"],
            "comparisons": [{"name": "x", "terms": ["lory:at40.all", "-dense:at40.all"], "expect": "negative"}],
        },
    )
    exp = Experiments(root)
    arms = {"dense": exp.arm("dense"), "lory": exp.arm("lory")}
    with pytest.raises(ConfigError, match="lory:at40.all: arm lory in suite toy evaluates at 50 %, 100 % of its steps"):
        check_group(exp.suite("toy"), exp.group("02-late"), arms)
    for terms, match in (
        (["lory:perplexity.all"], "unknown metric .perplexity.all."),
        ([{"lory": "loss.all"}], "must be a string"),
        ([], "non-empty list"),
    ):
        _write(
            root,
            "groups/02-late.yaml",
            {
                "claim": "2",
                "title": "t",
                "paper": "p",
                "arms": ["lory"],
                "comparisons": [{"name": "x", "terms": terms, "expect": "negative"}],
            },
        )
        with pytest.raises(ConfigError, match=match):
            exp.group("02-late")
    _write(
        root,
        "groups/02-late.yaml",
        {
            "claim": "2",
            "title": "t",
            "paper": "p",
            "arms": ["lory"],
            "plots": ["pie"],
            "comparisons": [{"name": "x", "terms": ["lory:loss.all"], "expect": "negative"}],
        },
    )
    with pytest.raises(ConfigError, match="unknown plot.s. pie"):
        exp.group("02-late")


def test_claim_verdict_shows_a_disagreement_even_when_rows_are_missing():
    from diffmoe.repro.spec import Group

    comparisons = [Comparison(f"c{i}", [Term(1, "a", "loss.all")], "negative") for i in range(3)]
    group = Group("g", "1", "t", "p", ["a"], comparisons)
    assert stats.claim_verdict(group, ["yes", "not run", "no"]) == "no"
    assert stats.claim_verdict(group, ["yes", "not run", "yes"]) == "partly run"
    assert stats.claim_verdict(group, ["yes", "inconclusive", "yes"]) == "inconclusive"
    assert stats.claim_verdict(group, ["yes"] * 3) == "yes"
    assert stats.claim_verdict(group, ["not run"] * 3) == "not run"


def test_committed_report_is_the_markdown_of_its_json():
    """experiments/results/micro/REPORT.md is exactly what its report.json renders to (no hand edits),
    and every plot it shows is there."""
    from diffmoe.repro.report import markdown

    out = EXPERIMENTS / "results" / "micro"
    if not (out / "report.json").is_file():
        pytest.skip("no committed micro report")
    report = json.loads((out / "report.json").read_text())
    assert (out / "REPORT.md").read_text() == markdown(report)
    for group in report["groups"]:
        for plot in group["plots"].values():
            assert (out / plot).is_file(), plot


def test_report_only_before_any_run(tmp_path):
    root = _toy_experiments(tmp_path / "exp")
    report = run_repro(
        ReproOptions(
            experiments=root,
            suite="toy",
            work=tmp_path / "work",
            out=tmp_path / "new" / "out",
            report_only=True,
            verbose=False,
        )
    )
    assert [c["verdict"] for c in report["groups"][0]["comparisons"]] == ["not run", "not run"]
    assert report["groups"][0]["verdict"] == "not run" and report["groups"][0]["plots"] == {}
    assert "| Lory - dense | 0 |" in (tmp_path / "new" / "out" / "REPORT.md").read_text()
    assert not (tmp_path / "work").exists()  # nothing was prepared or trained
