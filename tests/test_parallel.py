"""parallelize and gradient accumulation under DDP, on two gloo processes (tests/parallel_checks.py)."""

import os
import subprocess
import sys
from pathlib import Path


def test_ddp_searches_unused_parameters_only_when_needed_and_accumulation_syncs_once():
    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(here / "parallel_checks.py"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("parallel checks passed") == 2
