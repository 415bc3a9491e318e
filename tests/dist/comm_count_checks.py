"""CommCounter against the byte convention, one collective kind at a time (torchrun, 2 ranks, gloo).

Every rank computes its own expectation and records mismatches instead of asserting, so that no rank
leaves the collectives early; the failures are summed over the ranks at the end and every rank raises
together. Rank 0 prints ``comm count checks passed``.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from diffmoe.parallel.comm_count import CommCounter

# differentiable all-gather / reduce-scatter, renamed in torch 2.13 (the old names warn)
_all_gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
_reduce_scatter = getattr(funcol, "reduce_scatter_single_autograd", None) or funcol.reduce_scatter_tensor_autograd

FAILURES: list[str] = []
F32 = 4


def expect(comm: CommCounter, what: str, kinds: dict[str, tuple[int, int]]) -> None:
    """Record a failure unless ``comm.counts`` is exactly ``kinds`` (kind -> (calls, bytes))."""
    got = {k: (v["calls"], v["bytes"]) for k, v in comm.counts.items()}
    if got != kinds:
        FAILURES.append(f"rank {dist.get_rank()} {what}: expected {kinds}, counted {got}")


def ring(n: int, g: int, factor: int = 1) -> int:
    return factor * (g - 1) * n // g


def check_c10d(G: int, rank: int) -> None:
    n = 6  # float32 elements per rank
    with CommCounter() as c:
        dist.all_reduce(torch.ones(n))
    expect(c, "all_reduce", {"all_reduce": (1, ring(n * F32, G, 2))})

    with CommCounter() as c:
        dist.all_gather_single(torch.empty(G * n), torch.ones(n))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            dist.all_gather_into_tensor(torch.empty(G * n), torch.ones(n))
    expect(c, "all_gather_single / all_gather_into_tensor", {"all_gather": (2, 2 * ring(G * n * F32, G))})

    with CommCounter() as c:
        dist.reduce_scatter_single(torch.empty(n), torch.ones(G * n))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            dist.reduce_scatter_tensor(torch.empty(n), torch.ones(G * n))
    expect(c, "reduce_scatter_single / reduce_scatter_tensor", {"reduce_scatter": (2, 2 * ring(G * n * F32, G))})

    with CommCounter() as c:  # equal splits: the own chunk stays
        dist.all_to_all_single(torch.empty(G * n), torch.ones(G * n))
    expect(c, "all_to_all_single (equal)", {"all_to_all": (1, (G - 1) * n * F32)})

    # uneven splits of rows of 3 floats: rank r sends r + 1 + j rows to rank j
    send = [rank + 1 + j for j in range(G)]
    recv = [j + 1 + rank for j in range(G)]
    with CommCounter() as c:
        dist.all_to_all_single(torch.empty(sum(recv), 3), torch.ones(sum(send), 3), recv, send)
    expect(c, "all_to_all_single (uneven)", {"all_to_all": (1, (sum(send) - send[rank]) * 3 * F32)})

    with CommCounter() as c:
        dist.all_gather([torch.empty(n) for _ in range(G)], torch.ones(n))
        dist.broadcast(torch.ones(n), src=0)
        dist.reduce_scatter(torch.empty(n), [torch.ones(n) for _ in range(G)])
        dist.barrier()
    expect(c, "all_gather / broadcast / reduce_scatter / barrier",
           {"all_gather": (1, ring(G * n * F32, G)), "broadcast": (1, ring(n * F32, G)),
            "reduce_scatter": (1, ring(G * n * F32, G)), "barrier": (1, 0)})


def check_group_size(G: int, rank: int) -> None:
    """A collective on a group of one rank sends nothing; the group size comes from the call's group."""
    singles = [dist.new_group([r]) for r in range(G)]  # every rank creates every group
    with CommCounter() as c:
        dist.all_reduce(torch.ones(5), group=singles[rank])
    expect(c, "all_reduce on a group of 1", {"all_reduce": (1, 0)})
    if c.by_group and list(c.by_group.values())[0]["size"] != 1:
        FAILURES.append(f"rank {rank}: by_group size {c.by_group}")


def check_functional(G: int, rank: int) -> None:
    """Functional collectives and the collectives their backward runs."""
    group = dist.group.WORLD
    x = torch.ones(4, 3, requires_grad=True)
    with CommCounter() as c:
        y = funcol.all_to_all_single_autograd(x, None, None, group)
        (y * 1.0).sum().backward()
    a2a = (G - 1) * (4 // G) * 3 * F32
    expect(c, "all_to_all_single_autograd fwd+bwd", {"all_to_all": (2, 2 * a2a)})

    x = torch.ones(4, 3, requires_grad=True)
    with CommCounter() as c:
        y = _all_gather(x, 0, group)
        (y * 1.0).sum().backward()
    expect(c, "all-gather autograd fwd+bwd", {"all_gather": (1, ring(G * 12 * F32, G)),
                                                     "reduce_scatter": (1, ring(G * 12 * F32, G))})

    x = torch.ones(4, 3, requires_grad=True)
    with CommCounter() as c:
        y = _reduce_scatter(x, "sum", 0, group)
        (y * 1.0).sum().backward()
    expect(c, "reduce-scatter autograd fwd+bwd", {"reduce_scatter": (1, ring(12 * F32, G)),
                                                         "all_gather": (1, ring(12 * F32, G))})

    with CommCounter() as c:
        funcol.wait_tensor(funcol.all_reduce(torch.ones(7), "sum", group))
    expect(c, "functional all_reduce", {"all_reduce": (1, ring(7 * F32, G, 2))})


def check_fsdp(G: int, rank: int, mp: bool) -> None:
    """FSDP2: a non-root Linear unit (reshard_after_forward=True) is all-gathered in forward and again in
    backward; the root unit once (not resharded after forward); each unit reduce-scattered once."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16, bias=False), nn.Linear(16, 4, bias=False))
    policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if mp else MixedPrecisionPolicy()
    fully_shard(model[0], reshard_after_forward=True, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    x = torch.ones(3, 8)
    model(x).sum().backward()  # lazy initialisation happens in the first forward
    with CommCounter() as c:
        model(x).sum().backward()
    pbytes = 2 if mp else F32
    inner, root = 16 * 8, 4 * 16
    expect(c, f"fully_shard Linear fwd+bwd (mp={mp})",
           {"all_gather": (3, 2 * ring(inner * pbytes, G) + ring(root * pbytes, G)),
            "reduce_scatter": (2, ring(inner * F32, G) + ring(root * F32, G))})


class _WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("scale", torch.ones(10), persistent=False)

    def forward(self, x):
        return self.lin(x) * self.scale[0]


def check_ddp(G: int, rank: int) -> None:
    """DDP without a comm hook (the C++ reducer): one all-reduce of the fp32 gradients on the syncing
    micro-batch, and one broadcast of the module buffers, in the forward of that micro-batch only (DDP
    syncs buffers when ``require_backward_grad_sync``, which ``no_sync`` clears)."""
    ddp = nn.parallel.DistributedDataParallel(_WithBuffer())
    x = torch.ones(2, 4)
    with CommCounter() as c:
        with ddp.no_sync():
            ddp(x).sum().backward()
        ddp(x).sum().backward()
    params = 4 * 3 + 3
    expect(c, "DDP two micro-batches", {"all_reduce": (1, ring(params * F32, G, 2)),
                                        "broadcast": (1, ring(10 * F32, G))})


def main() -> None:
    dist.init_process_group("gloo")
    G, rank = dist.get_world_size(), dist.get_rank()
    check_c10d(G, rank)
    check_group_size(G, rank)
    check_functional(G, rank)
    check_fsdp(G, rank, mp=False)
    check_fsdp(G, rank, mp=True)
    check_ddp(G, rank)
    failed = torch.tensor([len(FAILURES)])
    dist.all_reduce(failed)
    for line in FAILURES:
        print(line, flush=True)
    if failed.item():
        raise SystemExit(f"rank {rank}: {int(failed.item())} comm count check(s) failed")
    if rank == 0:
        print("comm count checks passed", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # torch 2.13 may abort at interpreter exit after FSDP2 (docs/scaling.md, "Failures and exit")


if __name__ == "__main__":
    main()
