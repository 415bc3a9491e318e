"""Distributed runs end to end (``diffmoe train`` under torchrun, gloo): 2 FSDP2 ranks train like one
process across the dense warm-up's switch, their checkpoint resumes on 1 process and on 4 ranks and
continues the uninterrupted loss curve; a rank that
raises or hangs ends the whole job quickly, naming the rank."""

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file
from conftest import run_torchrun

from diffmoe.cli import main
from diffmoe.config import save_config
from diffmoe.train import train
from diffmoe.train.checkpoint import list_checkpoints, load_run

from test_train import losses, run_config


def torchrun_train(nproc, cfg_path, run_dir, *extra, resume=False):
    args = ["-m", "diffmoe.cli", "train", cfg_path, "--run-dir", run_dir, "--quiet", *extra]
    return run_torchrun_module(nproc, args + (["--resume"] if resume else []))


def run_torchrun_module(nproc, args):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def test_checkpoint_of_two_fsdp_ranks_resumes_on_one_and_on_four(tiny_dataset, tmp_path):
    cfg = run_config(tiny_dataset, "lory", steps=6, grad_accum=2, checkpoint_every=3, keep_checkpoints=5,
                     dense_warmup_frac=0.34)  # the dense-to-MoE switch at step 2, under FSDP2
    cfg.data.micro_batch_size = None  # 8 sequences per step: 4 per rank on 2 ranks, 2 on 4, 8 on 1
    cfg.train.parallel.mode = "fsdp"
    save_config(cfg, str(tmp_path / "cfg.yaml"))
    torchrun_train(2, tmp_path / "cfg.yaml", tmp_path / "full")
    full = losses(tmp_path / "full")
    assert len(full) == 6
    for name in ("one", "four"):
        shutil.copytree(tmp_path / "full", tmp_path / name)
        shutil.rmtree(list_checkpoints(tmp_path / name)[-1])  # "crash" after the checkpoint of step 3
    cfg.train.parallel.mode = "ddp"  # the layout may change on resume
    train(cfg, tmp_path / "one", resume=True, show_progress=False)
    train(cfg, tmp_path / "single", show_progress=False)
    assert losses(tmp_path / "single") == pytest.approx(full, rel=1e-5)  # 2 FSDP2 ranks = 1 process
    torchrun_train(4, tmp_path / "cfg.yaml", tmp_path / "four", resume=True)
    for name in ("one", "four"):
        assert losses(tmp_path / name) == pytest.approx(full, rel=1e-5), name
    _, model, path = load_run(tmp_path / "full")  # evaluation reads the sharded checkpoint in one process
    assert path.name == "step-00000006"
    assert main(["consolidate", str(tmp_path / "full"), "--out", str(tmp_path / "w.safetensors")]) == 0
    weights = load_file(tmp_path / "w.safetensors")
    state = model.state_dict()
    assert set(weights) == set(state) - {"lm_head.weight"} or set(weights) == set(state)
    for name, value in weights.items():
        assert torch.equal(value, state[name]), name
    # held-out evaluation shared out over 2 ranks equals one process
    assert main(["eval", str(tmp_path / "full"), "--batch-size", "3", "--json", str(tmp_path / "one.json")]) == 0
    run_torchrun_module(2, ["-m", "diffmoe.cli", "eval", str(tmp_path / "full"), "--batch-size", "3",
                            "--json", str(tmp_path / "two.json")])
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
