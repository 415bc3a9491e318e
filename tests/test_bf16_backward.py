"""bfloat16 backward of Lory's recompute kernel (``SegmentMergedSwiGLU``) and of the dropless dispatch
(``grouped_mm`` and the fused ``loop``), against float32 gradients of the same inputs and weights.

Both ways the library trains in bf16 are covered: ``autocast`` over float32 parameters (``train.bf16``
under DDP) and ``params``, bfloat16 parameters and inputs (FSDP2's mixed precision,
``param_dtype: bfloat16``). The float32 reference runs on the same values (in the ``params`` case
the bf16-rounded ones), so the two differ only by the precision of the computation.

Tolerance. bfloat16 keeps 8 significant bits, unit roundoff u = 2^-8 = 3.9e-3. The backward is a
chain of GEMMs whose inputs (and outputs) are rounded to bf16 while the sums accumulate in float32,
so each gradient element carries a few independent rounding errors of relative size <= u (rms about
0.6u each). Measured here (torch 2.13 CPU) for every gradient, router weights included: the relative
error ||g_bf16 - g_fp32|| / ||g_fp32|| is 1.1u-1.7u, and the largest elementwise error is at most
3.5u of the fp32 gradient's largest element. Bounds: NORM_TOL = 2.5u (a scale error of 2 % on one
gradient fails it) and MAX_TOL = 6u. Bugs injected in a scratch copy of the library all fail: Lory's
expert gradients summed over the 256 one-segment chunks in bf16 (4.5u), the grouped path's weight
gradient summed over the rows of an expert in bf16 per row (8u) or per block of 16 rows (2.8u), and a
1.6 % scale error in bf16 only on the merge-weight gradient or on the gates.
"""

from __future__ import annotations

import copy

import pytest
import torch

from diffmoe.moe import Experts, LoryMoE, TopKMoE
from diffmoe.moe.dispatch import dispatch
from diffmoe.moe.merge import segment_merged_swiglu

U = 2.0**-8  # bfloat16 unit roundoff
NORM_TOL = 2.5 * U
MAX_TOL = 6 * U
MODES = ["autocast", "params"]


def _assert_close_to_fp32(got: dict, want: dict) -> None:
    for name, w in want.items():
        g, w = got[name].float().cpu(), w.cpu()
        assert torch.isfinite(g).all(), name
        scale = w.norm().item()
        assert scale > 0, name  # every gradient is really exercised
        norm_err = (g - w).norm().item() / scale
        max_err = (g - w).abs().max().item() / w.abs().max().item()
        assert norm_err <= NORM_TOL and max_err <= MAX_TOL, (name, norm_err / U, max_err / U)


def _experts(E, d, f, gen, bf16_values, device):
    ex = Experts(E, d, f)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            if bf16_values:
                p.copy_(p.bfloat16().float())
    return ex.to(device)


def _grads(mode, precision, experts, inputs, fn, dy):
    """Gradients of sum(fn(*inputs, experts) * dy) w.r.t. the inputs and the expert stacks."""
    ex = copy.deepcopy(experts)
    xs = [t.clone() for t in inputs]
    if precision == "bf16" and mode == "params":
        ex = ex.bfloat16()
        xs = [t.bfloat16() for t in xs]
    xs = [t.requires_grad_(True) for t in xs]
    device = dy.device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16" and mode == "autocast"):
        y = fn(*xs, ex)
    assert y.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    (y.float() * dy).sum().backward()
    grads = {f"input{i}": t.grad for i, t in enumerate(xs)}
    grads.update(w1=ex.w1.grad, w3=ex.w3.grad, w2=ex.w2.grad)
    param_dtype = torch.bfloat16 if precision == "bf16" and mode == "params" else torch.float32
    assert all(grads[k].dtype == param_dtype for k in ("w1", "w3", "w2"))  # master weights keep theirs
    return grads


def _bf16_values(mode, *tensors):
    return tuple(t.bfloat16().float() for t in tensors) if mode == "params" else tensors


def check_merge_bf16_backward(mode: str, chunk: int | None, device: str = "cpu") -> None:
    """256 segments of 16 tokens through ``segment_merged_swiglu``: x, merge-weight and expert
    gradients (also run on CUDA by tests/test_cuda.py)."""
    gen = torch.Generator().manual_seed(1)
    S, T, d, f, E = 256, 16, 64, 128, 8
    experts = _experts(E, d, f, gen, mode == "params", device)
    x = torch.randn(S, T, d, generator=gen)
    w = torch.softmax(2 * torch.randn(S, E, generator=gen), -1)
    x, w = (t.to(device) for t in _bf16_values(mode, x, w))
    dy = torch.randn(S, T, d, generator=gen).to(device)
    fn = lambda x, w, ex: segment_merged_swiglu(x, w, ex, chunk=chunk)  # noqa: E731
    want = _grads(mode, "fp32", experts, (x, w), fn, dy)
    got = _grads(mode, "bf16", experts, (x, w), fn, dy)
    _assert_close_to_fp32(got, want)


def check_dispatch_bf16_backward(mode: str, impl: str, device: str = "cpu") -> None:
    """Top-2 assignments of 2048 tokens to 4 experts (about 1024 rows per expert GEMM), random gates:
    x, gate and expert gradients (also run on CUDA by tests/test_cuda.py)."""
    gen = torch.Generator().manual_seed(2)
    N, d, f, E, k = 2048, 64, 128, 4, 2
    experts = _experts(E, d, f, gen, mode == "params", device)
    x = torch.randn(N, d, generator=gen)
    gate = torch.rand(N * k, generator=gen)
    x, gate = (t.to(device) for t in _bf16_values(mode, x, gate))
    tok = torch.arange(N).repeat_interleave(k).to(device)
    eid = torch.randint(0, E, (N * k,), generator=gen).to(device)
    dy = torch.randn(N, d, generator=gen).to(device)
    fn = lambda x, g, ex: dispatch(x, ex, tok, eid, g, impl)  # noqa: E731
    want = _grads(mode, "fp32", experts, (x, gate), fn, dy)
    got = _grads(mode, "bf16", experts, (x, gate), fn, dy)
    _assert_close_to_fp32(got, want)


@pytest.mark.parametrize("chunk", [1, None])  # segments merged at a time: 1 (256 chunks to sum) or E (32)
@pytest.mark.parametrize("mode", MODES)
def test_segment_merged_swiglu_bf16_gradients_match_float32(mode, chunk):
    check_merge_bf16_backward(mode, chunk)


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
@pytest.mark.parametrize("mode", MODES)
def test_dispatch_bf16_gradients_match_float32(mode, impl):
    check_dispatch_bf16_backward(mode, impl)


LAYERS = {
    "lory": lambda: LoryMoE(64, 128, 8, segment_len=16),
    "topk-grouped_mm": lambda: TopKMoE(64, 128, 8, dispatch_impl="grouped_mm"),
}


def check_layer_bf16_backward(name: str, mode: str, device: str = "cpu") -> None:
    """Whole layers in training mode: the router's gradient goes through Lory's merge weights (the
    recompute kernel's dweights) or through top-k's gates (the grouped path's gate gradient).
    Also run on CUDA by tests/test_cuda.py."""
    torch.manual_seed(3)
    layer = LAYERS[name]().train()
    torch.nn.init.normal_(layer.router.weight, std=0.5)
    layer = layer.to(device)
    x = torch.randn(4, 64, 64, device=device)
    dy = torch.randn(4, 64, 64, device=device)
    if mode == "params":
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(p.bfloat16().float())
        x = x.bfloat16().float()
    grads = {}
    for precision in ("fp32", "bf16"):
        lay = copy.deepcopy(layer)
        xx = x.clone()
        if precision == "bf16" and mode == "params":
            lay, xx = lay.bfloat16(), xx.bfloat16()
        xx.requires_grad_(True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16" and mode == "autocast"):
            y = lay(xx)
        assert y.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        (y.float() * dy).sum().backward()
        grads[precision] = {"x": xx.grad, **{n: p.grad for n, p in lay.named_parameters()}}
    assert set(grads["bf16"]) == {"x", "router.weight", "experts.w1", "experts.w3", "experts.w2"}
    _assert_close_to_fp32(grads["bf16"], grads["fp32"])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_bf16_gradients_match_float32_router_included(name, mode):
    check_layer_bf16_backward(name, mode)
