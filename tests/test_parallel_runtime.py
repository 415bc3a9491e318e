"""Distributed runs end to end (``diffmoe train`` under torchrun, gloo): the trainer on 2 ranks with
FSDP2 + expert parallelism (top-k) and with FSDP2 + Lory's sharded experts gives one process's losses,
held-out evaluation and final weights, across the dense warm-up's switch; its checkpoint resumes on 1
process and on 4 ranks in another layout and continues the uninterrupted losses; evaluation shared out
over ranks equals one process; a rank that raises or hangs ends the whole job quickly, naming the rank."""

import json
import shutil
import time

import pytest
import torch
from conftest import run_torchrun, torchrun
from safetensors.torch import load_file
from test_train import losses, run_config

from diffmoe.cli import main
from diffmoe.config import save_config
from diffmoe.parallel.dcp import model_state
from diffmoe.runs import load_run
from diffmoe.train import train
from diffmoe.train.checkpoint import list_checkpoints
from diffmoe.train.metrics import read_metrics


def torchrun_train(nproc, cfg_path, run_dir, *overrides, resume=False):
    argv = ["-m", "diffmoe.cli", "train", cfg_path, "--run-dir", run_dir, "--quiet", *overrides]
    return torchrun(nproc, argv + (["--resume"] if resume else []))


def heldout(run_dir):
    return [r["all.loss"] for r in read_metrics(run_dir) if r["kind"] == "eval"]


def assert_same_run(run_dir, reference):
    """Same losses, held-out evaluations and final weights as the reference run."""
    assert losses(run_dir) == pytest.approx(losses(reference), rel=1e-5)
    assert heldout(run_dir) == pytest.approx(heldout(reference), rel=1e-5) and heldout(reference)
    got, want = load_run(run_dir)[1].state_dict(), load_run(reference)[1].state_dict()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)


def distributed_config(tiny_dataset, ffn, dense_warmup_frac=0.0, **train_kw):
    cfg = run_config(tiny_dataset, ffn, grad_accum=2, keep_checkpoints=5, **train_kw)
    cfg.model.moe.d_ff = None  # experts of the dense FFN's size, for the dense warm-up
    cfg.train.dense_warmup_frac = dense_warmup_frac
    cfg.data.micro_batch_size = None  # 8 sequences per step: 4 per rank on 2 ranks, 2 on 4, 8 on 1
    cfg.train.parallel.mode = "fsdp"
    return cfg


def test_expert_parallel_run_equals_one_process_and_resumes_on_one_and_on_four(tiny_dataset, tmp_path):
    cfg = distributed_config(
        tiny_dataset, "topk", steps=6, checkpoint_every=3, eval_every=3, dense_warmup_frac=0.34
    )  # the dense-to-MoE switch at step 2
    cfg.train.parallel.ep = 2
    cfg.validate()
    save_config(cfg, str(tmp_path / "cfg.yaml"))
    torchrun_train(2, tmp_path / "cfg.yaml", tmp_path / "full")
    for name in ("one", "four"):
        shutil.copytree(tmp_path / "full", tmp_path / name)
        shutil.rmtree(list_checkpoints(tmp_path / name)[-1])  # "crash" after the checkpoint of step 3
    cfg.train.parallel.mode, cfg.train.parallel.ep = "ddp", 1  # the layout may change on resume
    train(cfg, tmp_path / "single", show_progress=False)
    assert_same_run(tmp_path / "full", tmp_path / "single")
    train(cfg, tmp_path / "one", resume=True, show_progress=False)
    torchrun_train(4, tmp_path / "cfg.yaml", tmp_path / "four", "train.parallel.ep=4", resume=True)
    for name in ("one", "four"):
        assert_same_run(tmp_path / name, tmp_path / "single")


def test_sharded_lory_run_equals_one_process_and_evaluation_is_shared_out(tiny_dataset, tmp_path):
    cfg = distributed_config(tiny_dataset, "lory", steps=3, dense_warmup_frac=0.34)
    cfg.train.parallel.etp = 2
    cfg.data.eval_batches = None  # every held-out row: the last batch is short
    cfg.validate()
    save_config(cfg, str(tmp_path / "cfg.yaml"))
    torchrun_train(2, tmp_path / "cfg.yaml", tmp_path / "etp")
    cfg.train.parallel.mode, cfg.train.parallel.etp = "ddp", 1
    train(cfg, tmp_path / "single", show_progress=False)
    assert_same_run(tmp_path / "etp", tmp_path / "single")
    _, model, path = load_run(tmp_path / "etp")  # the sharded checkpoint, read by one process
    assert main(["consolidate", str(tmp_path / "etp"), "--out", str(tmp_path / "w.safetensors")]) == 0
    weights = load_file(tmp_path / "w.safetensors")
    state = model_state(model)
    assert weights.keys() == state.keys()
    for name, value in weights.items():
        assert torch.equal(value, state[name]), name
    # held-out evaluation shared out over 2 ranks (7 rows per batch: a short last batch) equals one process
    assert main(["eval", str(tmp_path / "etp"), "--batch-size", "7", "--json", str(tmp_path / "one.json")]) == 0
    torchrun(2, ["-m", "diffmoe.cli", "eval", tmp_path / "etp", "--batch-size", "7", "--json", tmp_path / "two.json"])
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one.keys() == two.keys() and one["all"]["tokens"] == two["all"]["tokens"]
    for name in one:
        assert two[name]["loss"] == pytest.approx(one[name]["loss"], rel=1e-6), name


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_a_failing_rank_ends_the_job_naming_the_rank(tiny_dataset, tmp_path, mode):
    cfg = run_config(tiny_dataset, "topk", steps=50, grad_accum=2)
    cfg.train.parallel.mode = "fsdp"
    cfg.train.parallel.timeout_s = 5
    save_config(cfg, str(tmp_path / "cfg.yaml"))
    start = time.perf_counter()
    proc = run_torchrun("fault.py", 2, mode, tmp_path / "cfg.yaml", tmp_path / "run", expect_rc=None)
    elapsed = time.perf_counter() - start
    assert proc.returncode != 0
    assert elapsed < 30, elapsed
    out = proc.stdout + proc.stderr
    if mode == "raise":
        assert "rank 1: error: RuntimeError: injected fault" in out, out[-3000:]
    else:
        assert "rank 0: error:" in out and "imed out" in out, out[-3000:]
