"""Lory's d_ff-sharded experts (etp) on 2 and 4 gloo ranks against one process: tests/dist/etp_checks.py."""

import pytest
from conftest import run_torchrun


@pytest.mark.parametrize("nproc", [2, 4])
def test_sharded_experts_equal_one_process(nproc):
    """forward_merged, merge, a Lory layer, FSDP2 over efsdp x etp meshes and AdamW steps: values and
    gradients equal the 1-process reference; bf16 autocast runs."""
    proc = run_torchrun("etp_checks.py", nproc, timeout=120)
    assert proc.stdout.count("etp checks passed") == nproc, (proc.stdout[-2000:], proc.stderr[-4000:])
