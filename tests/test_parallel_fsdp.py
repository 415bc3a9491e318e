"""FSDP2, HSDP, expert parallelism and Lory's sharded experts train like one process: every layer kind
in every layout that applies to it, 3 AdamW steps on 2 and 4 gloo ranks (tests/dist/train_equivalence.py)."""

import pytest
from conftest import run_torchrun


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("equivalence")
    proc = run_torchrun("train_equivalence.py", 1, out, "reference")
    assert "reference written" in proc.stdout
    return out


@pytest.mark.parametrize("ranks, pairs", [(2, 32), (4, 38)])
def test_every_layout_equals_one_process(reference, ranks, pairs):
    proc = run_torchrun("train_equivalence.py", ranks, reference, "check", expect_rc=None)
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-3000:])
    assert proc.stdout.count("train equivalence passed on rank") == ranks
    assert f"{pairs} (kind, layout) pairs" in proc.stdout
