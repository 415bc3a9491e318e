"""``diffmoe export`` and ``diffmoe import`` from the command line: a trained top-k run exports to
transformers' Mixtral with its tokenizer, and importing that directory gives back a run whose logits
equal the original's (offline)."""

import os

import pytest
import torch
from test_train import run_config

from diffmoe.cli import main
from diffmoe.runs import load_run
from diffmoe.train import train

transformers = pytest.importorskip("transformers")


def test_export_then_import_round_trip(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = run_config(tiny_dataset, "topk", steps=2)  # top-2, renormalised, dropless: Mixtral
    train(cfg, tmp_path / "run", show_progress=False)
    assert main(["export", str(tmp_path / "run"), "--hf", str(tmp_path / "hf")]) == 0
    assert sorted(os.listdir(tmp_path / "hf")) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    _, original, _ = load_run(tmp_path / "run")
    _, back, _ = load_run(tmp_path / "back")
    ids = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = original(ids)
        torch.testing.assert_close(back(ids), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(hf(ids).logits, want, rtol=0, atol=1e-5)


def test_native_export_of_a_layer_without_a_native_class_is_a_clear_error(tiny_dataset, tmp_path, capsys):
    train(run_config(tiny_dataset, "lory", steps=1), tmp_path / "run", show_progress=False)
    assert main(["export", str(tmp_path / "run"), "--hf", str(tmp_path / "hf"), "--format", "native"]) == 2
    assert "cannot export natively" in capsys.readouterr().err and not (tmp_path / "hf").exists()
