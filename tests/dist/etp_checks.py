"""Checks of Lory's d_ff-sharded experts (diffmoe.parallel.expert_tensor_parallel) on gloo ranks, run by
tests/test_parallel_etp.py under ``torchrun --nproc_per_node 2`` and ``4``.

Every rank runs every check on its own rows of a global batch (seeded alike on every rank) and compares
with one process computing the whole batch, float32. Loss convention: a rank's loss is its share of
the global sum sum(y * dy), gradient reductions are plain sums. Errors are relative to the reference's
largest entry. Failures are collected and all-reduced, so every rank fails alike (a one-sided assert
would hang the others); on success each rank prints ``etp checks passed``.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from diffmoe import Decoder, ModelConfig
from diffmoe.moe import Experts, LoryConfig, MoEConfig, SwiGLU, build_ffn
from diffmoe.moe.merge import merge_experts
from diffmoe.parallel.expert_tensor_parallel import ShardedFFNExperts, shard_experts_ffn
from diffmoe.parallel.layout import ShardingError

E, D, FF = 4, 8, 24  # experts, d_model, d_ff (d_ff splits evenly over 2 and 4 ranks)
S, T = 3, 4  # segments per rank and tokens per segment for the experts alone
B, L = 2, 16  # sequences per rank and their length for a layer or model (segment_len T: 4 segments)
V = 32  # the decoder's vocabulary
TOL = 1e-5

FAILURES: list[str] = []


def expect(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = TOL) -> None:
    """Record a failure unless max|got - want| <= tol * max|want| (DTensors compared in full)."""
    got = got.full_tensor() if isinstance(got, DTensor) else got
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    if not err <= tol:
        FAILURES.append(f"{name}: relative error {err:.2e} > {tol:.0e}")


def rows(t: torch.Tensor, rank: int, grad: bool = True) -> torch.Tensor:
    """This rank's share of a global batch along dim 0 (a leaf requiring grad, or detached)."""
    n = t.shape[0] // dist.get_world_size()
    return t[rank * n:(rank + 1) * n].detach().clone().requires_grad_(grad)


def expect_same_init(tag: str, experts: ShardedFFNExperts, ref: Experts) -> None:
    """reset_parameters from the same RNG state and copy_from_dense give the 1-process values exactly."""
    dense = SwiGLU(D, FF)
    for init in (lambda m: m.reset_parameters(0.1, 0.05), lambda m: m.copy_from_dense(dense)):
        for module in (ref, experts):
            torch.manual_seed(7)
            init(module)
        for name in ("w1", "w3", "w2"):
            expect(f"{tag} init {name}", getattr(experts, name).detach(), getattr(ref, name).detach(), 0.0)


def scale_init(experts: Experts) -> None:
    """Weights of unit-order outputs, so that relative errors of 1e-5 are meaningful."""
    experts.reset_parameters(std=D ** -0.5, out_std=FF ** -0.5)


def lory_layer() -> torch.nn.Module:
    torch.manual_seed(0)
    layer = build_ffn("lory", D, FF, MoEConfig(num_experts=E, families={"lory": LoryConfig(segment_len=T)}))
    layer.reset_parameters(std=D ** -0.5, out_std=FF ** -0.5, router_std=1.0)
    return layer


def batch(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
def check_experts(rank: int, world: int, etp: DeviceMesh) -> None:
    """(1) forward_merged with etp = world: output, dx, d(weights), expert gradients; the module's
    names, sizes and refusal of dispatched tokens. (4) merge: values and gradients. (5) bf16 autocast.
    reset_parameters, copy_from_dense: the 1-process values."""
    torch.manual_seed(0)
    ref = Experts(E, D, FF)
    scale_init(ref)
    sharded = shard_experts_ffn(copy.deepcopy(ref), etp)
    if sorted(sharded.state_dict()) != ["w1", "w2", "w3"] or sharded.w2.shape != (E, D, FF):
        FAILURES.append(f"state_dict {sorted(sharded.state_dict())}, w2 {tuple(sharded.w2.shape)}")
    x, w, dy = batch(1, world * S, T, D), batch(2, world * S, E).softmax(-1), batch(3, world * S, T, D)

    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y_ref = ref.forward_merged(xr, wr)
    (y_ref * dy).sum().backward()
    xl, wl = rows(x, rank), rows(w, rank)
    y = sharded.forward_merged(xl, wl)
    (y * rows(dy, rank, grad=False)).sum().backward()
    expect("forward_merged y", y, rows(y_ref, rank))
    expect("forward_merged dx", xl.grad, rows(xr.grad, rank))
    expect("forward_merged dweights", wl.grad, rows(wr.grad, rank))
    for name in ("w1", "w3", "w2"):
        expect(f"forward_merged d{name}", getattr(sharded, name).grad, getattr(ref, name).grad)

    ref.zero_grad()
    sharded.zero_grad()
    wr, wl = w.clone().requires_grad_(), rows(w, rank)
    g = [batch(4 + i, world * S, *p.shape[1:]) for i, p in enumerate((ref.w1, ref.w3, ref.w2))]
    merged_ref, merged = merge_experts(wr, ref), sharded.merge(wl)
    sum((m * gi).sum() for m, gi in zip(merged_ref, g)).backward()
    sum((m * rows(gi, rank, grad=False)).sum() for m, gi in zip(merged, g)).backward()
    for name, m, m_ref in zip(("w1", "w3", "w2"), merged, merged_ref):
        expect(f"merge {name}", m, rows(m_ref, rank))
        expect(f"merge d{name}", getattr(sharded, name).grad, getattr(ref, name).grad)
    expect("merge dweights", wl.grad, rows(wr.grad, rank))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        xl = rows(x, rank)
        y = sharded.forward_merged(xl, rows(w, rank))
        y.float().square().sum().backward()
    if y.dtype != torch.bfloat16:
        FAILURES.append(f"autocast: output dtype {y.dtype}")
    expect("bf16 autocast y", y, rows(y_ref, rank), tol=3e-2)
    if not all(torch.isfinite(t).all() for t in (xl.grad, sharded.w1.grad.to_local())):
        FAILURES.append("bf16 autocast: non-finite gradients")

    try:
        sharded(x, None, None, None)
        FAILURES.append("forward with dispatched tokens did not raise")
    except ShardingError as err:
        if "expert parallelism" not in str(err):
            FAILURES.append(f"forward's error does not point to ep: {err}")
    if "etp=" not in repr(sharded):
        FAILURES.append(f"repr without etp size: {sharded!r}")
    expect_same_init("etp", sharded, ref)


def check_layer(rank: int, world: int, etp: DeviceMesh) -> None:
    """(2) A LoryMoE layer with etp = world experts: output, dx and every parameter's gradient (the
    router's all-reduced as data parallelism would)."""
    layer = lory_layer()
    ref = copy.deepcopy(layer)
    layer.experts = shard_experts_ffn(layer.experts, etp)
    x, dy = batch(1, world * B, L, D), batch(2, world * B, L, D)
    xr = x.clone().requires_grad_()
    y_ref = ref(xr)
    (y_ref * dy).sum().backward()
    xl = rows(x, rank)
    y = layer(xl)
    (y * rows(dy, rank, grad=False)).sum().backward()
    dist.all_reduce(layer.router.weight.grad)
    expect("layer y", y, rows(y_ref, rank))
    expect("layer dx", xl.grad, rows(xr.grad, rank))
    for (name, p), p_ref in zip(layer.named_parameters(), ref.parameters()):
        expect(f"layer d{name}", p.grad, p_ref.grad)


def lory_decoder() -> Decoder:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, d_model=D, n_layers=2, n_heads=2, d_ff=FF, max_seq_len=L, ffn="lory",
                      init_std=D ** -0.5)
    cfg.moe.num_experts, cfg.moe.router_init_std, cfg.moe.families["lory"].segment_len = E, 1.0, T
    return Decoder(cfg)


def parallelize(model: Decoder, mesh: DeviceMesh, dp: DeviceMesh) -> None:
    """Experts d_ff-sharded on mesh["etp"] and fully_shard-ed over mesh["efsdp"]; every Block, then
    the root, fully_shard-ed over the world ``dp``; sum reductions everywhere."""
    for block in model.blocks:
        experts = block.ffn.experts = shard_experts_ffn(block.ffn.experts, mesh["etp"])
        fully_shard(experts, mesh=mesh["efsdp"])
        for method in ("forward_merged", "merge"):
            register_fsdp_forward_method(experts, method)
        fully_shard(block, mesh=dp)
    fully_shard(model, mesh=dp)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM


def lm_loss(model: Decoder, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of ids [n, L + 1] (a share of the global sum)."""
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")


def check_fsdp(rank: int, world: int, shape: tuple[int, int], dp: DeviceMesh) -> None:
    """(3) A 2-layer Lory decoder on an (efsdp, etp) mesh (:func:`parallelize`): logits, every
    gradient, parameters after 2 AdamW steps, prompt routing (merge), experts' reset_parameters and copy_from_dense."""
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("efsdp", "etp"))
    tag = f"fsdp {shape[0]}x{shape[1]}"
    model = lory_decoder()
    ref = copy.deepcopy(model)
    parallelize(model, mesh, dp)
    opt, opt_ref = (torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, ref))
    for step in range(2):
        ids = torch.randint(V, (world * B, L + 1), generator=torch.Generator().manual_seed(10 + step))
        lm_loss(ref, ids).backward()
        lm_loss(model, rows(ids, rank, grad=False)).backward()
        if step == 0:
            for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
                expect(f"{tag} d{name}", p.grad, p_ref.grad)
        for o in (opt, opt_ref):
            o.step()
            o.zero_grad()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        expect(f"{tag} {name} after 2 AdamW steps", p.detach(), p_ref.detach())
    ids = torch.randint(V, (world * B, L), generator=torch.Generator().manual_seed(30))
    with torch.no_grad():
        expect(f"{tag} logits", model(rows(ids, rank, grad=False)), rows(ref(ids), rank))
        model.set_routing("prompt")
        ref.set_routing("prompt")
        expect(f"{tag} prompt routing logits", model(rows(ids, rank, grad=False), prompt_len=L // 2),
               rows(ref(ids, prompt_len=L // 2), rank))
    for block, ref_block in zip(model.blocks, ref.blocks):
        expect_same_init(f"{tag} layer {block.layer}", block.ffn.experts, ref_block.ffn.experts)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dp = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    check_experts(rank, world, dp)
    check_layer(rank, world, dp)
    for shape in [(1, world), (world, 1)] + ([(2, world // 2)] if world >= 4 else []):
        check_fsdp(rank, world, shape, dp)
    failed = torch.tensor([float(len(FAILURES))])
    dist.all_reduce(failed)
    if FAILURES:
        print(f"rank {rank}:", *FAILURES[:20], sep="\n  ", file=sys.stderr, flush=True)
    assert failed.item() == 0, f"{int(failed.item())} failures over all ranks"
    print("etp checks passed", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skips an occasional abort at interpreter exit after gloo collectives (docs/scaling.md, "Failures and exit")


if __name__ == "__main__":
    main()
