"""A run directory written by diffmoe at commit f588cd4, before the plain configs (its config.yaml and
checkpoint hold every family's section, the unused ones too), still loads, computes the logits it
computed then, and resumes. ``tests/fixtures/make_old_run.py`` wrote it (run with that commit's ``src`` on
PYTHONPATH)."""

import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from diffmoe.config import load_config
from diffmoe.runs import load_run
from diffmoe.train import train
from diffmoe.train.metrics import read_metrics

FIXTURE = Path(__file__).parent / "fixtures" / "run-f588cd4"


def test_an_old_run_loads_with_only_its_families_and_computes_its_logits():
    assert "sparsemixer" in yaml.safe_load((FIXTURE / "config.yaml").read_text())["model"]["moe"]
    cfg, model, _ = load_run(FIXTURE)
    assert cfg.model.ffn == ["lory", "topk"] and list(cfg.model.moe.families) == ["lory", "topk"]
    assert cfg.model.moe.families["lory"].segment_len == 8
    expected = load_file(str(FIXTURE / "expected_logits.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(expected["ids"]), expected["logits"])


def test_an_old_run_resumes(tiny_dataset, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    shutil.copytree(tiny_dataset, tmp_path / "data")  # the run's data.path is the relative "data"
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(run / "config.yaml"))
    summary = train(cfg, run, resume=True, show_progress=False)  # finished: nothing to train, no change
    assert summary["step"] == 2 and not list(run.glob("config.before-*"))
    cfg.train.steps = 3
    summary = train(cfg, run, resume=True, show_progress=False, accept_config_change=True)
    assert summary["step"] == 3
    change = [r for r in read_metrics(run) if r["kind"] == "config_change"]
    assert [list(r["changes"]) for r in change] == [["train.steps"]]  # the old unused sections are no change
