"""Expert parallelism (diffmoe.parallel.expert_parallel) on gloo processes: tests/dist/ep_checks.py
compares it with one process on every rank's inputs — experts alone (top-2, random and empty splits,
both dispatch implementations, autocast), TopKMoE and SparseMixerMoE layers, and with 4 ranks a
(efsdp=2, ep=2) mesh with FSDP2 on efsdp and one AdamW step."""

import pytest
from conftest import run_torchrun


@pytest.mark.parametrize("nproc", [2, 4])
def test_expert_parallel_equals_one_process(nproc):
    proc = run_torchrun("ep_checks.py", nproc, timeout=120)
    assert proc.stdout.count("ep checks passed") == nproc, (proc.stdout[-2000:], proc.stderr[-4000:])
