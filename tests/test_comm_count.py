"""CommCounter (diffmoe.parallel.comm_count): byte counts of every collective kind, checked under
torchrun on 2 gloo ranks by tests/dist/comm_count_checks.py; and its behaviour without a process group."""

import torch
from conftest import run_torchrun

from diffmoe.parallel.comm_count import CommCounter


def test_counts_match_the_byte_convention_on_two_ranks():
    proc = run_torchrun("comm_count_checks.py", 2)
    assert "comm count checks passed" in proc.stdout, proc.stdout[-2000:]


def test_no_collectives_counts_nothing_and_passes_results_through():
    x = torch.randn(3, 4, requires_grad=True)
    with CommCounter(record=True) as comm:
        (x @ x.t()).sum().backward()  # = |sum of rows|^2
    assert torch.allclose(x.grad, 2 * x.detach().sum(0, keepdim=True).expand_as(x))
    assert comm.counts == {} and comm.total_bytes == 0 and comm.total_calls == 0 and comm.calls == []
    assert comm.as_dict() == {"counts": {}, "by_group": {}, "total_bytes": 0, "total_calls": 0}
