"""Checks of diffmoe.parallel.parallelize (DDP) on a real process group: run by tests/test_parallel.py under
``torchrun --nproc_per_node 2`` (gloo). Every rank runs every check, so a failure stops all ranks alike."""

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

from diffmoe import Decoder, ModelConfig
from diffmoe.parallel.layout import Layout
from diffmoe.parallel.parallelize import ParallelPlan, data_parallel, gradient_sync, parallelize


def ddp_plan(world: int, compile: bool = False) -> ParallelPlan:
    return ParallelPlan(Layout(world, "ddp", dp_replicate=world), compile=compile)


def model_config(ffn: str) -> ModelConfig:
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=32, ffn=ffn)
    cfg.moe.num_experts = 4
    if "lory" in cfg.moe.families:
        cfg.moe.families["lory"].segment_len = 8
    return cfg


def check_unused_parameter_search(world: int) -> None:
    """DDP searches for unused parameters only where a layer may leave some without gradient."""
    for ffn, dense in (
        ("dense", True),
        ("lory", True),
        ("expert_choice", True),
        ("topk", False),
        ("sparsemixer", False),
        (["lory", "topk"], False),
    ):
        ddp = data_parallel(parallelize(Decoder(model_config(ffn)), ddp_plan(world)))
        assert ddp is not None and ddp.find_unused_parameters == (not dense), ffn


def check_accumulation_syncs_once(rank: int, world: int, compile: bool) -> None:
    """Two micro-batches: gradients are all-reduced on the last one only, and equal those of one process
    that sees every rank's rows (also when the DDP model is compiled)."""
    torch.manual_seed(0)
    model = Decoder(model_config("lory"))
    reference = copy.deepcopy(model)
    wrapped = parallelize(model, ddp_plan(world, compile))
    reductions = []
    all_reduce = dist.all_reduce

    def counting_allreduce(tensor, *args, **kwargs):  # what parallelize's summing comm hook calls
        reductions.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_allreduce
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (2 * world, 17), generator=g) for _ in range(2)]  # global micro-batches
    for i, ids in enumerate(batches):
        mine = ids[2 * rank : 2 * rank + 2]
        with gradient_sync(wrapped, enabled=i == len(batches) - 1):
            logits = wrapped(mine[:, :-1])
            (F.cross_entropy(logits.flatten(0, 1), mine[:, 1:].flatten()) / (len(batches) * world)).backward()
        if i == 0:
            assert reductions == [], reductions
    assert reductions, "the last micro-batch did not synchronise"
    dist.all_reduce = all_reduce
    for ids in batches:
        for r in range(world):
            rows = ids[2 * r : 2 * r + 2]
            logits = reference(rows[:, :-1])
            (F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()) / (len(batches) * world)).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        tol = dict(rtol=1e-4, atol=1e-6) if compile else dict(rtol=1e-5, atol=1e-7)  # inductor reorders sums
        torch.testing.assert_close(p.grad, q.grad, **tol, msg=name)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    check_unused_parameter_search(world)
    check_accumulation_syncs_once(rank, world, compile=False)
    check_accumulation_syncs_once(rank, world, compile=True)
    dist.barrier()
    print(f"parallel checks passed on rank {rank}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
