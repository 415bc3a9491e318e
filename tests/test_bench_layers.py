"""The layer benchmark runs at a toy size and writes a complete table; timings are not asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_layers.py"
TOY = [
    "--tokens",
    "64",
    "--seq-len",
    "32",
    "--d-model",
    "32",
    "--d-ff",
    "64",
    "--experts",
    "4",
    "--segment-len",
    "8",
    "--repeats",
    "2",
    "--warmup",
    "1",
    "--matmul-size",
    "128",
    "--threads",
    "1",
    "--device",
    "cpu",
    "--dtype",
    "float32",
]
ALWAYS = [
    "dense SwiGLU",
    "LoryMoE (T=8, segment)",
    "TopKMoE top-2 [loop]",
    "TopKMoE top-2 [grouped_mm]",
    "SparseMixerMoE top-2 [auto=loop]",
    "ExpertChoiceMoE c=2 [auto=loop]",
    "HF MixtralSparseMoeBlock [eager]",
    "HF PhimoeSparseMoeBlock [eager]",
]


def _load_module(name: str = "layer_specs"):
    import importlib

    return importlib.import_module(f"diffmoe.bench.{name}")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("layers")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *TOY, "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_writes_table_and_json_with_every_row(toy_run):
    out, stdout = toy_run
    assert sorted(p.name for p in out.iterdir()) == ["bench_layers_cpu_float32.json", "bench_layers_cpu_float32.md"]
    result = json.loads((out / "bench_layers_cpu_float32.json").read_text())
    table = (out / "bench_layers_cpu_float32.md").read_text()
    names = [r["name"] for r in result["rows"]]
    assert names[0] == "dense SwiGLU"
    for name in ALWAYS:
        assert name in names, name
    # every transformers implementation is either measured or skipped with a reason
    module = _load_module()
    for label in ("Mixtral", "Phimoe"):
        for impl in module.hf_implementations():
            name = f"HF {label}SparseMoeBlock [{impl}]"
            skipped = {s["name"]: s["reason"] for s in result["skipped"]}
            assert (name in names) != (name in skipped), name
            assert name in names or skipped[name]
    for name in names:
        assert f"| {name} |" in table
    assert table in stdout
    for key in ("cpu", "threads", "torch", "transformers", "device", "dtype", "date"):
        assert result["machine"][key], key
    assert result["machine"]["threads"] == 1


def test_numbers_are_finite_and_positive(toy_run):
    out, _ = toy_run
    result = json.loads((out / "bench_layers_cpu_float32.json").read_text())
    assert math.isfinite(result["matmul_gflops"]) and result["matmul_gflops"] > 0
    for row in result["rows"]:
        assert len(row["times_ms"]) == 2
        for key in ("time_ms", "time_ratio", "ideal_ms", "time_over_ideal", "act_mib", "act_ratio", "flop_factor"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["name"], key, row[key])
        if row["peak_act_mib"] is not None:  # RSS delta minus gradients (Linux only); page-granular, noisy at toy size
            assert math.isfinite(row["peak_act_mib"])
        # the derived columns' values: test_summary_equals_hand_computed_values
        assert row["achieved_tflops"] > 0 and row["mfu"] is None  # no GPU peak on CPU
    dense = result["rows"][0]
    assert dense["time_ratio"] == 1.0 and dense["act_ratio"] == 1.0 and dense["flop_factor"] == 1.0


def test_activation_bytes_of_swiglu_is_exact():
    """SwiGLU saves w1(x), silu(w1 x), w3(x) and their product: 4 [n, d_ff] tensors, plus the output."""
    module = _load_module("measure")
    from diffmoe.moe import SwiGLU

    n, d, f = 16, 8, 24
    layer = SwiGLU(d, f)
    x = torch.randn(n, d, requires_grad=True)
    g = torch.randn(n, d)
    assert module.activation_bytes(layer, x, g) == 4 * (4 * n * f) + 4 * n * d
    assert x.grad is not None and layer.w1.weight.grad is not None


def test_flop_model():
    module = _load_module()
    shape = module.Shape(tokens=4096, seq_len=1024, d_model=512, d_ff=1408, experts=8, segment_len=256)
    assert shape.batch == 4
    assert shape.dense_flops() == 18 * 4096 * 512 * 1408
    # counted, not recomputed: torch's FLOP counter over the benchmark's own step of a dense SwiGLU
    # (3 GEMMs forward, 6 backward, 2 * 6 * 4 * 5 = 240 FLOPs each)
    from torch.utils.flop_counter import FlopCounterMode

    from diffmoe.bench.measure import fwd_bwd
    from diffmoe.moe import SwiGLU

    small = module.Shape(tokens=6, seq_len=3, d_model=4, d_ff=5, experts=2, segment_len=1)
    x = torch.randn(small.batch, small.seq_len, 4, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        fwd_bwd(SwiGLU(4, 5), x, torch.randn_like(x))
    assert counter.get_total_flops() == 9 * 240 == small.dense_flops()
    factors = {s.name: s.flop_factor for s in module.layer_specs(shape, torch.device("cpu"), torch.float32)}
    assert factors["LoryMoE (T=256, segment)"] == pytest.approx(1 + 8 / 256)
    assert factors["TopKMoE top-2 [loop]"] == 2.0
    assert factors["ExpertChoiceMoE c=2 [auto=loop]"] == 2.0


def test_summary_equals_hand_computed_values():
    """summarize() on made-up rounds, checked against values worked out by hand. Shape: 4 tokens,
    d 2, d_ff 3: dense forward+backward = 9 GEMMs x 2*4*2*3 = 432 FLOPs. Matmul: 432,000 FLOPs taking
    0.5, 1 and 2 s in the three rounds (median rate 432,000 FLOP/s: the dense ideal is 1 ms). The
    per-round medians differ from ratios of medians: MoE time / dense is 3 (not 4/2), time / ideal 3
    (not 4/2)."""
    from diffmoe.bench.measure import MIB, Row, summarize

    module = _load_module()
    shape = module.Shape(tokens=4, seq_len=2, d_model=2, d_ff=3, experts=2, segment_len=1)
    dense = Row("dense", "dense", 1.0, "", times_s=[0.001, 0.002, 0.004], act_bytes=MIB, peak_bytes=2 * MIB)
    moe = Row("moe", "moe", 2.0, "x", times_s=[0.003, 0.004, 0.012], act_bytes=3 * MIB, peak_bytes=None)
    d, m = summarize([dense, moe], shape, 432_000, [0.5, 1.0, 2.0], peak_flops=864_000)
    want_d = dict(
        time_ms=2.0,
        time_min_ms=1.0,
        time_max_ms=4.0,
        times_ms=[1.0, 2.0, 4.0],
        time_ratio=1.0,
        time_per_flop_ratio=1.0,
        ideal_ms=1.0,
        time_over_ideal=2.0,
        achieved_tflops=2.16e-7,
        mfu=0.25,
        act_mib=1.0,
        act_ratio=1.0,
        peak_act_mib=2.0,
        peak_act_ratio=1.0,
    )
    want_m = dict(
        time_ms=4.0,
        time_min_ms=3.0,
        time_max_ms=12.0,
        times_ms=[3.0, 4.0, 12.0],
        time_ratio=3.0,
        time_per_flop_ratio=1.5,
        ideal_ms=2.0,
        time_over_ideal=3.0,
        achieved_tflops=2.16e-7,
        mfu=0.25,
        act_mib=3.0,
        act_ratio=3.0,
        peak_act_mib=None,
        peak_act_ratio=None,
    )
    for got, want in ((d, want_d), (m, want_m)):
        for key, value in want.items():
            assert got[key] == (None if value is None else pytest.approx(value, rel=1e-9)), (got["name"], key)
    assert (m["name"], m["column"], m["note"], m["flop_factor"]) == ("moe", "moe", "x", 2.0)
    (no_peak,) = summarize([dense], shape, 432_000, [0.5, 1.0, 2.0], peak_flops=None)
    assert no_peak["mfu"] is None


def test_cli_bench_layers_without_transformers_lists_the_references_as_skipped(tmp_path, monkeypatch):
    from diffmoe.bench import layer_specs
    from diffmoe.cli import main

    monkeypatch.setattr(layer_specs, "hf_implementations", lambda: [])
    assert main(["bench", "layers", *TOY, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_layers_cpu_float32.json").read_text())
    assert [r["name"] for r in result["rows"]][:2] == ["dense SwiGLU", "LoryMoE (T=8, segment)"]
    assert not any(r["name"].startswith("HF") for r in result["rows"])
    assert any("transformers is not installed" in s["reason"] for s in result["skipped"])


def test_fine_grained_shape_leaves_out_top2_only_layers():
    module = _load_module()
    base = module.Shape(tokens=4096, seq_len=1024, d_model=512, d_ff=1408, experts=8, segment_len=256)
    (fine,) = module.SWEEPS["fine"].shapes(base)
    assert (fine.experts, fine.top_k, fine.d_ff, fine.ec_capacity) == (64, 8, 176, 8.0)
    specs = module.layer_specs(fine, torch.device("cpu"), torch.float32)
    names = {s.name: s for s in specs}
    assert names["TopKMoE top-8 [loop]"].flop_factor == 8.0
    assert names["ExpertChoiceMoE c=8 [auto=loop]"].flop_factor == 8.0
    assert not any("SparseMixer" in n or "Phimoe" in n for n in names)  # top-2 only
    assert [s.experts for s in module.SWEEPS["experts"].shapes(base)] == [4, 8, 16, 32, 64]
    assert [s.segment_len for s in module.SWEEPS["segment"].shapes(base)] == [64, 128, 256, 512]
    assert [s.tokens for s in module.SWEEPS["tokens"].shapes(base)] == [1024, 2048, 4096, 8192, 16384]


def test_sweep_runs_each_shape_and_writes_one_table(tmp_path):
    """The segment sweep at toy size: one process per shape, one line per T, a column per layer."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    toy = [a for a in TOY]
    toy[toy.index("--repeats") + 1] = "1"
    toy[toy.index("--warmup") + 1] = "0"
    proc = subprocess.run(
        [sys.executable, "-m", "diffmoe.bench.layers", *toy, "--sweep", "segment", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "sweep_segment_cpu_float32.json").read_text())
    assert [r["shape"]["segment_len"] for r in result["results"]] == [64, 128, 256, 512]
    for res in result["results"]:
        assert [r["column"] for r in res["rows"]] == ["dense SwiGLU", "LoryMoE"]
        assert res["machine"]["threads"] == 1  # options other than the shape reach every process
    table = (tmp_path / "sweep_segment_cpu_float32.md").read_text()
    assert "| Lory segment length T | dense SwiGLU | LoryMoE |" in table
    assert sum(line.startswith("| 512 |") for line in table.splitlines()) == 1


def test_no_switch_column_times_our_layers_in_a_process_without_the_allocator_switch(toy_run):
    """A fresh process with DIFFMOE_MALLOC=default times diffmoe's layers as a user's script runs them."""
    out, _ = toy_run
    result = json.loads((out / "bench_layers_cpu_float32.json").read_text())
    table = (out / "bench_layers_cpu_float32.md").read_text()
    assert result["machine"]["malloc"] == "reuse" and result["no_switch_machine"]["malloc"] == "default"
    assert "| time / dense | time / dense, no switch |" in table
    for row in result["rows"]:
        if row["name"].startswith("HF"):  # transformers' blocks are not timed again
            assert row["time_ratio_no_switch"] is None
        else:
            assert len(row["times_ms_no_switch"]) == 2
            assert math.isfinite(row["time_ratio_no_switch"]) and row["time_ratio_no_switch"] > 0, row["name"]
    assert result["rows"][0]["time_ratio_no_switch"] == 1.0
