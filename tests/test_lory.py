"""LoryMoE against an explicit per-segment reference, and its defining identities."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffmoe.moe import LoryMoE, SwiGLU

D, FF, E = 16, 24, 4


def reference(layer: LoryMoE, x: torch.Tensor) -> torch.Tensor:
    """Plain loop: for every sequence and segment, merge experts by an explicit weighted sum."""
    B, L, _ = x.shape
    T = layer.segment_len
    N = math.ceil(L / T)
    out = torch.empty_like(x)
    ex = layer.experts
    for b in range(B):
        segs = [x[b, k * T : (k + 1) * T] for k in range(N)]
        probs = [torch.softmax(layer.router(s.mean(0)), -1) for s in segs]
        for k, seg in enumerate(segs):
            if k == 0:
                e = torch.full((E,), 1 / E) if layer.first_segment == "uniform" else probs[0].detach()
            elif layer.routing == "prefix":
                e = probs[0]
            else:
                e = probs[k - 1]
            w1 = sum(e[i] * ex.w1[i] for i in range(E))
            w3 = sum(e[i] * ex.w3[i] for i in range(E))
            w2 = sum(e[i] * ex.w2[i] for i in range(E))
            out[b, k * T : (k + 1) * T] = F.linear(F.silu(F.linear(seg, w1)) * F.linear(seg, w3), w2)
    return out


def grads(layer, fn, x, g):
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    y = fn(x)
    (y * g).sum().backward()
    params = (layer.router.weight, layer.experts.w1, layer.experts.w3, layer.experts.w2, x)
    return y.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


@pytest.mark.parametrize("first_segment", ["uniform", "own_mean"])
@pytest.mark.parametrize("routing", ["segment", "prefix"])
@pytest.mark.parametrize("L", [24, 29, 5])  # multiple of T, ragged last segment, shorter than T
def test_matches_per_segment_reference(first_segment, routing, L):
    layer = LoryMoE(D, FF, E, segment_len=8, first_segment=first_segment, routing=routing).double()
    torch.nn.init.normal_(layer.router.weight, std=0.5)  # non-trivial routing
    x = torch.randn(3, L, D, dtype=torch.float64)
    g = torch.randn_like(x)
    y, gr = grads(layer, layer, x, g)
    y_ref, gr_ref = grads(layer, lambda t: reference(layer, t), x, g)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(gr, gr_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_identical_experts_equal_dense_whatever_the_router():
    dense = SwiGLU(D, FF)
    layer = LoryMoE(D, FF, E, segment_len=8, first_segment="own_mean")
    layer.experts.copy_from_dense(dense)
    torch.nn.init.normal_(layer.router.weight, std=3.0)
    x = torch.randn(2, 30, D)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-6)
    layer.routing = "prompt"
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-6)


def test_one_expert_is_dense():
    layer = LoryMoE(D, FF, 1, segment_len=4)
    dense = SwiGLU(D, FF)
    with torch.no_grad():
        dense.w1.weight.copy_(layer.experts.w1[0])
        dense.w3.weight.copy_(layer.experts.w3[0])
        dense.w2.weight.copy_(layer.experts.w2[0])
    x = torch.randn(2, 13, D)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-6)


def test_first_segment_weights_get_no_gradient_under_paper_policy():
    """With own_mean, only the first segment's loss reaches the router through segment 1's own mean;
    the stop-gradient means a loss on segment 1 alone gives the router no gradient at all."""
    layer = LoryMoE(D, FF, E, segment_len=8, first_segment="own_mean")
    x = torch.randn(2, 24, D, requires_grad=True)
    y = layer(x)
    y[:, :8].square().sum().backward()
    assert layer.router.weight.grad is None or torch.count_nonzero(layer.router.weight.grad) == 0
    # ... whereas a loss on segment 2 trains the router through segment 1's mean
    layer.zero_grad()
    layer(x)[:, 8:16].square().sum().backward()
    assert torch.count_nonzero(layer.router.weight.grad) > 0


def test_prompt_routing_uses_prompt_mean_for_every_position():
    layer = LoryMoE(D, FF, E, segment_len=8, routing="prompt")
    torch.nn.init.normal_(layer.router.weight, std=0.5)
    x = torch.randn(2, 20, D)
    from diffmoe.moe import RoutingContext

    y = layer(x, RoutingContext(prompt_len=6))
    e = torch.softmax(layer.router(x[:, :6].mean(1)), -1)  # [B, E]
    for b in range(2):
        w1 = torch.einsum("e,eij->ij", e[b], layer.experts.w1)
        w3 = torch.einsum("e,eij->ij", e[b], layer.experts.w3)
        w2 = torch.einsum("e,eij->ij", e[b], layer.experts.w2)
        ref = F.linear(F.silu(F.linear(x[b], w1)) * F.linear(x[b], w3), w2)
        torch.testing.assert_close(y[b], ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="prompt_len"):
        layer(x, RoutingContext(prompt_len=21))


def test_routing_statistics():
    layer = LoryMoE(D, FF, E, segment_len=4)
    torch.nn.init.normal_(layer.router.weight, std=2.0)
    layer(torch.randn(3, 16, D))
    st = layer.stats
    assert st["routing_weights"].shape == (3, 4, E)
    routed = st["routing_weights"][:, 1:].reshape(-1, E)  # uniform first segment is not routed
    torch.testing.assert_close(st["mean_weight"], routed.mean(0))
    torch.testing.assert_close(st["usage"], (routed > 2 / E).float().mean(0))
    torch.testing.assert_close(st["routing_weights"][:, 0], torch.full((3, E), 1 / E))
    assert layer.aux_loss.item() == 0.0


def test_invalid_routing_mode():
    layer = LoryMoE(D, FF, E)
    with pytest.raises(ValueError, match="routing"):
        layer.routing = "token"


def test_recompute_path_equals_plain_autograd_path():
    """The merged weights recomputed in backward give the plain path's outputs and gradients
    (float64 gradcheck; float32 tight; bfloat16 autocast loose), with any segment chunking."""
    from diffmoe.moe import Experts
    from diffmoe.moe.merge import SegmentMergedSwiGLU, merge_experts, merged_swiglu, segment_merged_swiglu

    ex = Experts(4, 6, 10).double()
    x = torch.randn(5, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.softmax(torch.randn(5, 4, dtype=torch.float64), -1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: SegmentMergedSwiGLU.apply(*a, 2), (x, w, ex.w1, ex.w3, ex.w2))

    ex = Experts(E, D, FF)
    x = torch.randn(6, 8, D)
    w = torch.softmax(torch.randn(6, E), -1)
    g = torch.randn(6, 8, D)
    outs = []
    for fn in (
        lambda x, w: merged_swiglu(x, merge_experts(w, ex)),
        lambda x, w: segment_merged_swiglu(x, w, ex, chunk=4),
    ):
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        ex.zero_grad()
        y = fn(xx, ww)
        (y * g).sum().backward()
        outs.append([y, xx.grad, ww.grad, ex.w1.grad.clone(), ex.w3.grad.clone(), ex.w2.grad.clone()])
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = segment_merged_swiglu(x, w, ex)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), outs[0][0].detach(), rtol=5e-2, atol=2e-2)
