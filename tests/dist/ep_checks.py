"""Checks of diffmoe.parallel.expert_parallel on a real process group: run by tests/test_parallel_ep.py
under ``torchrun --nproc_per_node 2|4`` (gloo, CPU).

Every rank runs every check in the same order and compares with a one-process reference that it
computes itself on the concatenation of all ranks' inputs (every rank draws the global batch from the
same seed and keeps its own rows). Each rank's loss is sum(output * R) over its rows for a fixed random
R, so the one-process loss is the sum of the ranks' losses and gradients compare with no factor.
Errors are relative to the reference's largest magnitude. Failures are gathered, not asserted, until a
final all-reduced flag, so that no rank stops alone and leaves the others waiting in a collective.
"""

import copy
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from diffmoe.moe import Experts, MoEConfig, SwiGLU, build_ffn
from diffmoe.parallel.expert_parallel import expert_parallel
from diffmoe.parallel.layout import ShardingError

D_MODEL, D_FF = 16, 24
LOCAL_EXPERTS = 2  # per ep rank
TOL = 1e-5


class Report:
    """Relative errors of named comparisons; ``failures`` lists those over their tolerance."""

    def __init__(self):
        self.errors: dict[str, float] = {}
        self.failures: list[str] = []

    def close(self, name: str, got, want: torch.Tensor, tol: float = TOL) -> None:
        """Compare got (a tensor or DTensor, gathered with full_tensor) with the reference want."""
        if isinstance(got, DTensor):
            got = got.full_tensor()
        if got is None or got.shape != want.shape or got.dtype != want.dtype:
            self.failures.append(f"{name}: got {None if got is None else (got.shape, got.dtype)}, "
                                 f"want {(want.shape, want.dtype)}")
            return
        err = ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item() if want.numel() else 0.0
        self.errors[name] = max(err, self.errors.get(name, 0.0))
        if not err <= tol:
            self.failures.append(f"{name}: relative error {err:.3g} > {tol:g}")

    def true(self, name: str, ok: bool) -> None:
        if not ok:
            self.failures.append(name)


def slices(sizes: list[int]) -> list[slice]:
    """Consecutive slices of the given sizes."""
    out, start = [], 0
    for n in sizes:
        out.append(slice(start, start + n))
        start += n
    return out


def reference_experts(num_experts: int) -> Experts:
    """The same experts on every rank, with weights large enough that errors are not lost in rounding."""
    torch.manual_seed(1)
    experts = Experts(num_experts, D_MODEL, D_FF)
    experts.reset_parameters(std=0.3)
    return experts


def make_assignments(kind: str, tokens: list[int], num_experts: int, g: torch.Generator):
    """Per-rank assignment lists (token_idx into that rank's tokens, expert_idx, gate).

    top2: two distinct experts per token. random: 2 assignments per token on average, to random tokens
    (some used never, some often). zeros: like random, but rank 0 sends nothing and the last ep rank's
    experts receive nothing.
    """
    out = []
    for rank, n in enumerate(tokens):
        if kind == "top2":
            token_idx = torch.arange(n).repeat_interleave(2)
            expert_idx = torch.stack([torch.randperm(num_experts, generator=g)[:2] for _ in range(n)]).view(-1)
        else:
            a = 0 if kind == "zeros" and rank == 0 else 2 * n
            high = num_experts - LOCAL_EXPERTS if kind == "zeros" else num_experts
            token_idx = torch.randint(0, n, (a,), generator=g)
            expert_idx = torch.randint(0, high, (a,), generator=g)
        out.append((token_idx, expert_idx, torch.rand(token_idx.shape[0], generator=g)))
    return out


def check_experts_forward(report: Report, rank: int, world: int, mesh: DeviceMesh, efsdp_mesh=None, step=False):
    """ExpertParallelExperts = Experts on all ranks' tokens: outputs, dx, dgate, expert gradients (and,
    with ``step``, the parameters after one AdamW step); experts FSDP2-sharded on ``efsdp_mesh`` if given."""
    ep = mesh.size()
    E = LOCAL_EXPERTS * ep
    g = torch.Generator().manual_seed(2)
    tokens = [3 + r for r in range(world)]
    for kind in ("top2", "random", "zeros"):
        for impl in ("loop", "grouped_mm"):
            tag = f"{kind}/{impl}" + ("/fsdp" if efsdp_mesh is not None else "")
            x_all = torch.randn(sum(tokens), D_MODEL, generator=g)
            probe = torch.randn(sum(tokens), D_MODEL, generator=g)
            assignments = make_assignments(kind, tokens, E, g)
            ref = reference_experts(E)
            model = expert_parallel(copy.deepcopy(ref), mesh)
            if efsdp_mesh is not None:
                fsdp_sum_reductions(fully_shard(model, mesh=efsdp_mesh))
            rows = slices(tokens)
            token_idx, expert_idx, gate = assignments[rank]
            x, gate = x_all[rows[rank]].clone().requires_grad_(), gate.clone().requires_grad_()
            y = model(x, token_idx, expert_idx, gate, impl)
            (y * probe[rows[rank]]).sum().backward()

            x_ref = x_all.clone().requires_grad_()
            offsets = [s.start for s in rows]
            ti = torch.cat([t + o for (t, _, _), o in zip(assignments, offsets)])
            ei = torch.cat([e for _, e, _ in assignments])
            gate_ref = torch.cat([gt for _, _, gt in assignments]).requires_grad_()
            y_ref = ref(x_ref, ti, ei, gate_ref, impl)
            (y_ref * probe).sum().backward()

            report.close(f"y {tag}", y, y_ref[rows[rank]])
            report.close(f"dx {tag}", x.grad, x_ref.grad[rows[rank]])
            gate_rows = slices([len(t) for t, _, _ in assignments])[rank]
            report.close(f"dgate {tag}", gate.grad, gate_ref.grad[gate_rows])
            for name, p in model.named_parameters():
                report.close(f"d{name} {tag}", p.grad, ref.get_parameter(name).grad)
            if step:
                adamw_step_matches(report, tag, model, ref)


def check_module_surface(report: Report, mesh: DeviceMesh):
    """State-dict keys unchanged, copy_from_dense on the shards, Lory's entry points refused."""
    E = LOCAL_EXPERTS * mesh.size()
    ref = reference_experts(E)
    model = expert_parallel(copy.deepcopy(ref), mesh)
    report.true("state_dict keys", list(model.state_dict()) == list(ref.state_dict()))
    torch.manual_seed(3)
    dense = SwiGLU(D_MODEL, D_FF)
    ref.copy_from_dense(dense)
    model.copy_from_dense(dense)
    for name, p in model.named_parameters():
        report.close(f"copy_from_dense {name}", p.detach(), ref.get_parameter(name).detach(), tol=0.0)
    for call in (lambda: model.forward_merged(torch.zeros(1, 2, D_MODEL), torch.zeros(1, E)),
                 lambda: model.merge(torch.zeros(1, E))):
        try:
            call()
            report.true("forward_merged/merge must raise", False)
        except ShardingError:
            pass


def check_autocast(report: Report, rank: int, world: int, mesh: DeviceMesh):
    """Under bf16 autocast the output is bf16 and matches Experts.forward under the same autocast."""
    E = LOCAL_EXPERTS * mesh.size()
    g = torch.Generator().manual_seed(4)
    tokens = [4] * world
    x_all = torch.randn(sum(tokens), D_MODEL, generator=g)
    assignments = make_assignments("top2", tokens, E, g)
    ref = reference_experts(E)
    model = expert_parallel(copy.deepcopy(ref), mesh)
    rows = slices(tokens)
    ti = torch.cat([t + r.start for (t, _, _), r in zip(assignments, rows)])
    ei = torch.cat([e for _, e, _ in assignments])
    gate = torch.cat([gt for _, _, gt in assignments])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x_all[rows[rank]], *assignments[rank])
        y_ref = ref(x_all, ti, ei, gate)
    report.close("autocast y", y, y_ref[rows[rank]], tol=1e-2)


def check_layers(report: Report, rank: int, world: int, mesh: DeviceMesh, efsdp_mesh=None, dp_mesh=None):
    """TopKMoE (training) and SparseMixerMoE (eval routing) with expert-parallel experts = the one-process
    layer on every rank's rows: outputs, dx and every parameter gradient. With ``efsdp_mesh`` the experts
    are fully_shard-ed on it and then the whole layer on ``dp_mesh``, and one AdamW step is compared."""
    E = LOCAL_EXPERTS * mesh.size()
    g = torch.Generator().manual_seed(5)
    batch, seq = 2, 5
    for kind in ("topk", "sparsemixer"):
        tag = kind + ("/fsdp" if efsdp_mesh is not None else "")
        torch.manual_seed(6)
        ref = build_ffn(kind, D_MODEL, D_FF, MoEConfig(num_experts=E, global_balance=False))
        ref.reset_parameters(std=0.3)
        ref.train(kind == "topk")
        layer = copy.deepcopy(ref)
        layer.experts = expert_parallel(layer.experts, mesh)
        if efsdp_mesh is not None:
            fsdp_sum_reductions(fully_shard(layer.experts, mesh=efsdp_mesh))
            fsdp_sum_reductions(fully_shard(layer, mesh=dp_mesh))
        x_all = torch.randn(world * batch, seq, D_MODEL, generator=g)
        probe = torch.randn(world * batch, seq, D_MODEL, generator=g)
        mine = slice(rank * batch, (rank + 1) * batch)
        x = x_all[mine].clone().requires_grad_()
        out = layer(x)
        (out * probe[mine]).sum().backward()
        x_ref = x_all.clone().requires_grad_()
        out_ref = ref(x_ref)
        (out_ref * probe).sum().backward()

        report.close(f"layer out {tag}", out, out_ref[mine])
        report.close(f"layer dx {tag}", x.grad, x_ref.grad[mine])
        for name, p in layer.named_parameters():
            grad = p.grad
            if not isinstance(grad, DTensor):  # the router, replicated: data-parallel sum
                grad = grad.clone()
                dist.all_reduce(grad)
            report.close(f"layer d{name} {tag}", grad, ref.get_parameter(name).grad)
        if efsdp_mesh is not None:
            adamw_step_matches(report, tag, layer, ref)


def fsdp_sum_reductions(module) -> None:
    """Plain gradient sums (the loss is already each rank's share); gloo needs the forced sum."""
    module.set_gradient_divide_factor(1.0)
    module.set_force_sum_reduction_for_comms(True)


def adamw_step_matches(report: Report, tag: str, model, ref) -> None:
    """One AdamW step on the parallel model and the reference gives the same parameters."""
    for m in (model, ref):
        torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1).step()
    for name, p in model.named_parameters():
        report.close(f"adamw {name} {tag}", p.detach(), ref.get_parameter(name).detach())


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report = Report()
    ep_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    check_module_surface(report, ep_mesh)
    check_experts_forward(report, rank, world, ep_mesh)
    check_autocast(report, rank, world, ep_mesh)
    check_layers(report, rank, world, ep_mesh)
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("efsdp", "ep"))  # (1, 2) or (2, 2)
    check_experts_forward(report, rank, world, mesh["ep"], mesh["efsdp"], step=True)
    check_layers(report, rank, world, mesh["ep"], mesh["efsdp"], mesh._flatten("dp"))

    failed = torch.tensor(float(bool(report.failures)))
    dist.all_reduce(failed)
    if rank == 0:
        worst = max(report.errors.values())
        print(f"{len(report.errors)} comparisons, largest relative error {worst:.2g}")
    if report.failures:
        print(f"rank {rank} FAILED:\n  " + "\n  ".join(report.failures), flush=True)
    assert not failed.item(), "ep checks failed (see each rank's failures above)"
    print("ep checks passed", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # torch 2.13 sometimes aborts at exit after functional collectives (docs/scaling.md, "Failures and exit")


if __name__ == "__main__":
    main()
