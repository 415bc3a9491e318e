"""``diffmoe bench model`` and ``diffmoe bench generate`` at toy size: complete tables, no timing asserts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from diffmoe.bench import generate as bench_generate
from diffmoe.cli import main
from diffmoe.config import ModelConfig, MoEConfig
from diffmoe.model import Decoder
from diffmoe.train.metrics import flops_per_token

ROOT = Path(__file__).resolve().parents[1]
TINY = [str(ROOT / "configs" / f"{n}.yaml") for n in ("00-tiny-dense", "01-tiny-lory-8e", "03-tiny-topk-8e")]
TOY_SET = ["--set", "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.d_ff=64"]


def test_bench_model_writes_a_row_per_config(tmp_path):
    assert (
        main(
            [
                "bench",
                "model",
                *TINY,
                *TOY_SET,
                "--compile",
                "off",
                "--batch-size",
                "2",
                "--seq-len",
                "32",
                "--repeats",
                "2",
                "--warmup",
                "1",
                "--threads",
                "1",
                "--matmul-size",
                "64",
                "--device",
                "cpu",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "bench_model_cpu_float32.json").read_text())
    table = (tmp_path / "bench_model_cpu_float32.md").read_text()
    rows = result["rows"]
    assert [(r["config"], r["mode"]) for r in rows] == [(Path(c).stem, "eager") for c in TINY]
    for r in rows:
        assert len(r["steps_ms"]) == 2 and r["batch"] == 2 and r["seq_len"] == 32
        for key in ("step_ms", "tokens_per_s", "gflop_per_token", "achieved_tflops", "matmul_share", "time_vs_dense"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["config"], key)
        assert r["mfu"] is None  # no GPU peak on CPU
        assert f"| {r['config']} | eager | ddp | off |" in table
    assert rows[0]["time_vs_dense"] == 1.0
    assert result["settings"]["overrides"] == TOY_SET[1:]
    assert result["machine"]["threads"] == 1


def test_bench_model_under_fsdp_with_and_without_activation_checkpointing(tmp_path):
    """The GPU check's layout (FSDP2 on a one-process group, AC on and off) runs at toy size on CPU."""
    assert (
        main(
            [
                "bench",
                "model",
                *TINY[1:2],
                *TOY_SET,
                "--compile",
                "off",
                "--layout",
                "fsdp",
                "--ac",
                "both",
                "--batch-size",
                "2",
                "--seq-len",
                "32",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--threads",
                "1",
                "--matmul-size",
                "64",
                "--device",
                "cpu",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "bench_model_cpu_float32_fsdp.json").read_text())["rows"]
    assert [(r["layout"], r["activation_checkpointing"]) for r in rows] == [("fsdp", False), ("fsdp", True)]
    assert all(math.isfinite(r["step_ms"]) and r["peak_mem_gb"] > 0 for r in rows)  # CPU: peak-RSS growth


@pytest.mark.parametrize("tied", [False, True])
def test_model_flops_per_token_counts_active_parameters(tied):
    """The FLOPs the trainer's records and ``bench model`` count: 6 N + 12 L d T, N = active matmul parameters: the embedding lookup is excluded, the LM head is not
    (also when it is tied to the embedding), and a top-2 layer of 4 experts counts 2 of them."""
    cfg = ModelConfig(
        vocab_size=100,
        d_model=16,
        n_layers=2,
        n_heads=2,
        d_ff=32,
        max_seq_len=64,
        ffn="topk",
        moe=MoEConfig(num_experts=4),
        tie_embeddings=tied,
    )
    model = Decoder(cfg)
    all_but_embedding = sum(p.numel() for name, p in model.named_parameters() if name != "embed.weight")
    inactive = cfg.n_layers * (4 - 2) * 3 * 16 * 32
    n = all_but_embedding - inactive + (100 * 16 if tied else 0)
    assert flops_per_token(model, 64) == 6 * n + 12 * 2 * 16 * 64


def test_bench_generate_compares_lory_prompt_routing_with_dense(tmp_path):
    assert (
        main(
            [
                "bench",
                "generate",
                *TINY,
                *TOY_SET,
                "--prompt-len",
                "8",
                "--new-tokens",
                "4",
                "--lory-segment",
                "--repeats",
                "2",
                "--warmup",
                "1",
                "--threads",
                "1",
                "--device",
                "cpu",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "bench_generate_cpu_float32.json").read_text())
    rows = result["rows"]
    assert [(r["config"], r["routing"]) for r in rows] == [
        ("00-tiny-dense", None),
        ("01-tiny-lory-8e", "prompt"),
        ("01-tiny-lory-8e", "segment"),
        ("03-tiny-topk-8e", None),
    ]
    for r in rows:
        assert len(r["token_runs_ms"]) == 2 and len(r["prefill_runs_ms"]) == 2
        for key in ("prefill_ms", "token_ms", "tokens_per_s", "token_vs_dense", "prefill_vs_dense"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["config"], key)
    assert rows[0]["token_vs_dense"] == 1.0
    assert "| 01-tiny-lory-8e | prompt |" in (tmp_path / "bench_generate_cpu_float32.md").read_text()


def test_bench_generate_rejects_a_prompt_longer_than_the_model(tmp_path, capsys):
    assert main(["bench", "generate", TINY[0], "--prompt-len", "300", "--new-tokens", "4", "--out", str(tmp_path)]) == 2
    assert "--prompt-len 300 + --new-tokens 4 exceeds model.max_seq_len=256" in capsys.readouterr().err


def test_bench_generate_decodes_what_generate_decodes(monkeypatch):
    """The benchmark drives the same generate_stream as ``diffmoe generate`` (greedy, prompt routing),
    and records one prefill and one per-token time per generation."""
    from diffmoe.eval.generate import generate

    cfg = ModelConfig(
        vocab_size=64,
        d_model=16,
        n_layers=1,
        n_heads=2,
        d_ff=32,
        max_seq_len=32,
        ffn="lory",
        moe=MoEConfig(num_experts=4),
    )
    cfg.moe.families["lory"].segment_len = 4
    torch.manual_seed(0)
    model = Decoder(cfg).eval()
    prompt = torch.randint(0, 64, (1, 8))
    calls, tokens = [], []
    original = bench_generate.generate_stream

    def recording(*args, **kwargs):
        calls.append(kwargs)
        for token in original(*args, **kwargs):
            tokens.append(token)
            yield token

    monkeypatch.setattr(bench_generate, "generate_stream", recording)
    entry = bench_generate.Entry("x", "lory", "prompt", model, prompt, 5)
    assert entry() > 0 and len(entry.token_s) == 1 and len(entry.prefill_s) == 1
    assert calls == [{"routing": "prompt"}]
    assert torch.equal(torch.cat([prompt[0], torch.cat(tokens)]), generate(model, prompt, 5)[0])


def test_reuse_freed_memory_switch(tmp_path):
    """The compute commands keep freed memory in glibc's heap; DIFFMOE_MALLOC=default opts out."""
    import os
    import subprocess
    import sys

    code = "from diffmoe.runtime import reuse_freed_memory, malloc_mode; print(reuse_freed_memory(), malloc_mode())"
    outs = {}
    for mode in ("reuse", "default"):
        env = {**os.environ, "DIFFMOE_MALLOC": mode}
        outs[mode] = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout.split()
    assert outs["default"] == ["False", "default"]
    if sys.platform.startswith("linux"):
        assert outs["reuse"] == ["True", "reuse"]
