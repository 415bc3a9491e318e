"""``diffmoe train`` with a fault injected on rank 1 at step 2: run by tests/test_parallel_runtime.py.

    torchrun --nproc_per_node 2 fault.py raise|hang CONFIG RUN_DIR
"""

import os
import sys
import time

from diffmoe.cli import main
from diffmoe.train.step import Stepper

mode, config, run_dir = sys.argv[1:4]
real_step = Stepper.step
calls = []


def faulty_step(*args, **kwargs):
    calls.append(1)
    if int(os.environ["RANK"]) == 1 and len(calls) == 2:
        if mode == "raise":
            raise RuntimeError("injected fault")
        time.sleep(600)
    return real_step(*args, **kwargs)


Stepper.step = faulty_step
sys.exit(main(["train", config, "--run-dir", run_dir, "--quiet"]))
