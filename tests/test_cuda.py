"""CUDA correctness (skipped without a GPU): every layer on CUDA equals its CPU result, the grouped-GEMM
dispatch equals the loop in bf16, bf16 gradients match float32 (the bounds of test_bf16_backward.py),
and KV-cache decoding equals the full forward on the GPU. Each test runs without TF32 and restores
the process-wide setting after."""

import copy

import pytest
import torch
from conftest import tiny_model_config
from test_bf16_backward import check_dispatch_bf16_backward, check_layer_bf16_backward, check_merge_bf16_backward

from diffmoe import Decoder
from diffmoe.moe import ExpertChoiceMoE, LoryMoE, SparseMixerMoE, SwiGLU, TopKMoE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 matmuls in full precision (no TF32) for each test; the process-wide setting is restored
    afterwards. torch >= 2.9 has ``fp32_precision`` (mixing it with the legacy ``allow_tf32`` is an
    error there); older versions only ``allow_tf32``."""
    matmul = torch.backends.cuda.matmul
    name, off = ("fp32_precision", "ieee") if hasattr(matmul, "fp32_precision") else ("allow_tf32", False)
    old = getattr(matmul, name)
    setattr(matmul, name, off)
    try:
        yield
    finally:
        setattr(matmul, name, old)


D, FF, E = 64, 96, 8
LAYERS = {
    "dense": lambda: SwiGLU(D, FF),
    "lory": lambda: LoryMoE(D, FF, E, segment_len=16),
    "lory-own-mean-prefix": lambda: LoryMoE(D, FF, E, segment_len=16, first_segment="own_mean", routing="prefix"),
    "topk-grouped": lambda: TopKMoE(D, FF, E, dispatch_impl="grouped_mm"),
    "topk-loop": lambda: TopKMoE(D, FF, E, dispatch_impl="loop"),
    "topk-capacity": lambda: TopKMoE(D, FF, E, capacity_factor=1.0),
    "sparsemixer": lambda: SparseMixerMoE(D, FF, E, jitter_eps=0.1).eval(),
    "expert-choice": lambda: ExpertChoiceMoE(D, FF, E, capacity_factor=2.0),
    "expert-choice-segment": lambda: ExpertChoiceMoE(D, FF, E, granularity="segment", segment_len=16),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_cuda_fp32_equals_cpu(name):
    cpu = LAYERS[name]()
    if hasattr(cpu, "router"):
        torch.nn.init.normal_(cpu.router.weight, std=0.3)
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(2, 70, D)
    g = torch.randn_like(x)
    outs = []
    for layer, dev in ((cpu, "cpu"), (gpu, "cuda")):
        xx = x.to(dev).detach().requires_grad_(True)
        y = layer(xx)
        (y * g.to(dev)).sum().backward()
        grads = [torch.zeros(p.shape) if p.grad is None else p.grad.cpu() for p in layer.parameters()]
        outs.append([y.detach().cpu(), xx.grad.cpu()] + grads)
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_grouped_mm_equals_loop_in_bf16_on_cuda():
    layer = TopKMoE(D, FF, E, dispatch_impl="grouped_mm").cuda().to(torch.bfloat16)
    ref = copy.deepcopy(layer)
    ref.dispatch_impl = "loop"
    x = torch.randn(4, 128, D, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), ref(x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("mode", ["autocast", "params"])
def test_bf16_backward_matches_fp32_on_cuda(mode):
    """The bf16 gradient checks of tests/test_bf16_backward.py (same bounds) on the GPU kernels: Lory's
    recompute kernel, the grouped GEMMs (the path ``auto`` takes on CUDA) and whole layers."""
    check_merge_bf16_backward(mode, 1, "cuda")
    check_dispatch_bf16_backward(mode, "grouped_mm", "cuda")
    for name in ("lory", "topk-grouped_mm"):
        check_layer_bf16_backward(name, mode, "cuda")


def test_lory_bf16_close_to_fp32_on_cuda():
    layer = LoryMoE(D, FF, E, segment_len=32).cuda()
    x = torch.randn(2, 128, D, device="cuda")
    want = layer(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = layer(x)
    torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-3)


def test_kv_cache_decoding_on_cuda():
    cfg = tiny_model_config(ffn=["lory", "sparsemixer"])
    cfg.moe.families["lory"].segment_len = 8
    model = Decoder(cfg).cuda().eval()
    ids = torch.randint(0, 97, (2, 24), device="cuda")
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2)
        inc = torch.cat(
            [model(ids[:, :5], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(5, 24)], 1
        )
    torch.testing.assert_close(inc, full, rtol=1e-4, atol=1e-4)


def test_fsdp_on_one_gpu_trains_like_the_plain_model():
    """FSDP2 on a one-process NCCL group (the GPU benchmark's layout) gives the plain model's losses."""
    import itertools

    from diffmoe.config import ParallelConfig, TrainConfig
    from diffmoe.parallel import distributed
    from diffmoe.parallel.parallelize import ParallelPlan, parallelize
    from diffmoe.train.optim import build_optimizer
    from diffmoe.train.step import Stepper

    env = distributed.setup("cuda", need_group=True)
    cfg = tiny_model_config(ffn="lory")
    ids = torch.randint(0, cfg.vocab_size, (4, 33), device="cuda")
    losses = {}
    for mode in ("ddp", "fsdp"):
        torch.manual_seed(0)
        model = Decoder(cfg)
        plan = ParallelPlan.build(ParallelConfig(mode=mode), 1, "cuda")
        wrapped = parallelize(model, plan, "cuda")
        optimizer = build_optimizer(model, TrainConfig(lr=1e-2))
        batches = itertools.repeat((ids[:, :-1], ids[:, 1:]))
        stepper = Stepper(wrapped, optimizer, plan, env, grad_clip=1.0)
        losses[mode] = [stepper.step(batches, 1).loss for _ in range(3)]
    distributed.teardown(env)
    assert losses["fsdp"] == pytest.approx(losses["ddp"], rel=1e-5)
