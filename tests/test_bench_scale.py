"""``diffmoe bench scale`` at toy size on 2 gloo processes: every layout runs, and the bytes each rank
sends through collectives in a step (counted) equal ``diffmoe plan``'s model of that layout (exactly
where routing does not matter; expert parallelism's all-to-all depends on the routing, the plan
assumes a uniform one). No timing asserts."""

import json

import pytest

from diffmoe.cli import main

TOY = [
    "model.n_layers=2",
    "model.d_model=32",
    "model.n_heads=2",
    "model.d_ff=64",
    "model.max_seq_len=32",
    "model.vocab_size=512",
    "data.batch_size=4",
    "model.moe.lory.segment_len=8",
]


def test_measured_bytes_equal_the_plan_for_every_layout(tmp_path):
    assert (
        main(
            [
                "bench",
                "scale",
                "configs/01-tiny-lory-8e.yaml",
                "configs/03-tiny-topk-8e.yaml",
                "--procs",
                "2",
                "--repeats",
                "1",
                "--warmup",
                "1",
                "--out",
                str(tmp_path),
                "--set",
                *TOY,
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "bench_scale_cpu.json").read_text())["rows"]
    assert [(r["config"], r["layout"]) for r in rows] == [
        ("01-tiny-lory-8e", "ddp"),
        ("01-tiny-lory-8e", "fsdp"),
        ("01-tiny-lory-8e", "fsdp+etp2"),
        ("03-tiny-topk-8e", "ddp"),
        ("03-tiny-topk-8e", "fsdp"),
        ("03-tiny-topk-8e", "fsdp+ep2"),
    ]
    for r in rows:
        assert r["bytes"] > 0 and len(r["ranks"]) == 2
        for rank in r["ranks"]:
            measured = {k: v["bytes"] for k, v in rank["comm"]["counts"].items() if v["bytes"]}
            planned = {k: v for k, v in r["plan_by_kind"].items() if v}
            assert measured.keys() == planned.keys(), (r["layout"], measured, planned)
            for kind, value in planned.items():
                tolerance = 0.2 if kind == "all_to_all" else 1e-9  # routed rows vs a uniform router
                assert measured[kind] == pytest.approx(value, rel=tolerance), (r["layout"], kind, measured, planned)
