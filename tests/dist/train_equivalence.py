"""N ranks in every layout train like one process: run by tests/test_parallel_fsdp.py.

    torchrun --nproc_per_node 1 train_equivalence.py OUT reference   writes OUT/ref-<kind>-<micro>.safetensors
    torchrun --nproc_per_node N train_equivalence.py OUT check       compares every layout with it

For each layer kind and layout: 3 AdamW steps (grad clipping on) of the trainer's ``Stepper`` on a global batch of
8 sequences, then the losses, the reported auxiliary loss and every parameter (gathered from its
shards) must equal the one-process run (fp32, 1e-5). The one-process reference takes the global batch
as one micro-batch, except for expert choice, whose selection is per micro-batch by definition: its
reference runs the ranks' micro-batches one after another. SparseMixer-v2 samples per rank, so it is
compared with eval-mode (deterministic) routing. Every rank runs every check; failures are collected
and all-reduced so that all ranks fail alike.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from diffmoe import Decoder, ModelConfig
from diffmoe.config import ParallelConfig, TrainConfig
from diffmoe.parallel.parallelize import ParallelPlan, parallelize
from diffmoe.parallel.distributed import DistEnv
from diffmoe.train.loop import full_state
from diffmoe.train.optim import build_optimizer
from diffmoe.train.step import Stepper

KINDS = ("dense", "lory", "topk", "sparsemixer", "expert_choice")
GLOBAL, SEQ, STEPS = 8, 16, 3
TOL = dict(rtol=1e-5, atol=1e-5)
BF16_TOL = dict(rtol=2e-2, atol=0.0)  # losses only


def model_config(kind: str) -> ModelConfig:
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=32, ffn=kind,
                      tie_embeddings=kind == "lory")
    cfg.moe.num_experts = 4
    if "lory" in cfg.moe.families:
        cfg.moe.families["lory"].segment_len = 4
    cfg.moe.balance_coef = 0.05
    cfg.moe.z_loss_coef = 0.01
    return cfg


def layouts(world: int) -> list[tuple[str, dict]]:
    """(name, train.parallel fields) for this world size; each applies to the kinds that allow it."""
    out = [("ddp", {}), ("fsdp", {"mode": "fsdp"}), ("fsdp+ac", {"mode": "fsdp", "activation_checkpointing": "block"}),
           ("fsdp accum 2", {"mode": "fsdp", "micro": GLOBAL // (2 * world)}),
           ("ddp accum 2", {"mode": "ddp", "micro": GLOBAL // (2 * world)}),
           ("ddp+ac", {"mode": "ddp", "activation_checkpointing": "block"})]
    out += [(f"fsdp+ep{n}", {"mode": "fsdp", "ep": n}) for n in (2, 4) if world % n == 0]
    out += [(f"fsdp+etp{n}", {"mode": "fsdp", "etp": n}) for n in (2, 4) if world % n == 0]
    if world == 4:
        out.append(("hsdp 2x2", {"mode": "fsdp", "dp_replicate": 2}))
        out += [(f"hsdp 2x2+{x}2", {"mode": "fsdp", "dp_replicate": 2, x: 2}) for x in ("ep", "etp")]
    else:  # FSDP2 mixed precision: bf16 compute, fp32 reduction (compared loosely)
        out.append(("fsdp bf16", {"mode": "fsdp", "param_dtype": "bfloat16"}))
    return out


def applies(kind: str, fields: dict) -> bool:
    from diffmoe.moe import FAMILIES

    sharding = getattr(FAMILIES[kind].layer, "expert_sharding", None)
    for name in ("ep", "etp"):
        if fields.get(name, 1) > 1 and sharding != name:
            return False
    if "micro" in fields and kind in ("topk", "sparsemixer", "expert_choice"):
        return False  # accumulation changes what "global" balance and per-micro-batch selection mean
    return True


def batches(world: int, rank: int, micro: int):
    """Micro-batches of this rank, in the trainer's order: step s, micro m takes global rows
    ((s * accum + m) * world + rank) * micro ..."""
    data = torch.randint(0, 64, (STEPS * GLOBAL, SEQ + 1), generator=torch.Generator().manual_seed(1))
    accum = GLOBAL // (micro * world)
    for s in range(STEPS):
        for m in range(accum):
            start = ((s * accum + m) * world + rank) * micro
            rows = data[start:start + micro]
            yield rows[:, :-1], rows[:, 1:]


def run(kind: str, world: int, rank: int, micro: int, fields: dict) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Decoder(model_config(kind))
    if kind == "sparsemixer":
        model.eval()
    pc = ParallelConfig(**{k: v for k, v in fields.items() if k != "micro"})
    pc.validate(model.cfg)
    plan = ParallelPlan.build(pc, world, "cpu") if world > 1 else ParallelPlan.build(ParallelConfig(), 1, "cpu")
    wrapped = parallelize(model, plan)
    router_dtypes = []
    for _, layer in model.moe_layers():  # the dtype routers compute in (float32 under any mixed precision)
        layer.router.register_forward_pre_hook(lambda m, args: router_dtypes.append(m.weight.dtype))
    tc = TrainConfig(lr=1e-2, grad_clip=0.5)
    optimizer = build_optimizer(model, tc)
    env = DistEnv(rank, world, torch.device("cpu"))
    stream = batches(world, rank, micro)
    out = {}
    accum = GLOBAL // (micro * world)
    for s in range(STEPS):
        torch.manual_seed(100 + s)
        result = Stepper(wrapped, optimizer, plan, env, tc.grad_clip).step(stream, accum)
        out[f"loss.{s}"] = torch.tensor(result.loss)
        out[f"aux.{s}"] = torch.tensor(result.aux_loss)
        out[f"grad_norm.{s}"] = torch.tensor(result.grad_norm)
    out.update({f"param.{k}": v for k, v in full_state(model).items()})
    assert all(dtype == torch.float32 for dtype in router_dtypes), set(router_dtypes)
    return out


def reference(out: Path) -> None:
    for kind in KINDS:
        micros = (2, 4) if kind == "expert_choice" else (GLOBAL,)
        for micro in micros:
            save_file(run(kind, 1, 0, micro, {}), str(out / f"ref-{kind}-{micro}.safetensors"))


def check(out: Path, world: int, rank: int) -> tuple[int, list[str]]:
    """(number of (kind, layout) pairs compared, failures)."""
    failures, compared = [], 0
    for kind in KINDS:
        ref_micro = GLOBAL // world if kind == "expert_choice" else GLOBAL
        expected = load_file(str(out / f"ref-{kind}-{ref_micro}.safetensors"))
        for name, fields in layouts(world):
            if not applies(kind, fields):
                continue
            compared += 1
            try:
                got = run(kind, world, rank, fields.get("micro", GLOBAL // world), fields)
                assert got.keys() == expected.keys(), sorted(set(got) ^ set(expected))
                tol = BF16_TOL if fields.get("param_dtype") == "bfloat16" else TOL
                if tol is BF16_TOL:  # really computed in bf16
                    assert got["loss.0"] != expected["loss.0"], "bf16 gave the fp32 loss exactly"
                for key, value in expected.items():
                    if tol is BF16_TOL and not key.startswith("loss"):
                        continue
                    torch.testing.assert_close(got[key], value, **tol, msg=lambda m, key=key: f"{key}: {m}")
            except Exception as err:  # noqa: BLE001 - reported by every rank alike below
                failures.append(f"{kind} / {name}: {type(err).__name__}: {str(err)[:600]}")
                if os.environ.get("DIFFMOE_TEST_TRACEBACK"):
                    traceback.print_exc()
    return compared, failures


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "reference":
        reference(out)
        print("reference written", flush=True)
        return
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # a one-sided failure ends soon
    rank = dist.get_rank()
    compared, failures = check(out, world, rank)
    flag = torch.tensor([len(failures)])
    dist.all_reduce(flag)
    for line in failures:
        print(f"rank {rank} FAIL {line}", flush=True)
    if flag.item() == 0:
        print(f"train equivalence passed on rank {rank}: {compared} (kind, layout) pairs", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0 if flag.item() == 0 else 1)  # gloo + FSDP2 may abort at interpreter exit (docs/scaling.md, "Failures and exit")


if __name__ == "__main__":
    main()
