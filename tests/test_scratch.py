"""Scratch buffers (diffmoe.runtime.scratch): Lory's merged weights reuse one buffer per name across
calls and between forward and backward, without ever aliasing what autograd saved."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffmoe import runtime
from diffmoe.moe import LoryMoE
from diffmoe.moe import merge as merge_module

D, FF, E, T = 32, 24, 4, 8  # merged W1;W3 [E, 2 FF, D] larger than any activation


class Allocations(TorchDispatchMode):
    """Element counts of the fresh tensors (``empty``-family ops) created inside the block."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.startswith(("empty", "new_empty")):
            self.sizes.append(out.numel())
        return out


def _grads(layer, *xs):
    return [x.grad.clone() for x in xs] + [p.grad.clone() for p in layer.parameters()]


@pytest.fixture(autouse=True)
def _fresh_pool():
    runtime.release_scratch()
    yield
    runtime.release_scratch()


def test_two_calls_in_flight_give_what_fresh_buffers_give(monkeypatch):
    """Two forwards before either backward (as gradient accumulation over two graphs would), with
    different inputs and shapes: outputs and every gradient bitwise equal to fresh allocations."""
    layer = LoryMoE(D, FF, E, segment_len=T)
    a = torch.randn(2, 4 * T, D)
    b = torch.randn(2, 2 * T + 3, D)  # fewer segments: served by the buffers a used
    ga, gb = torch.randn_like(a), torch.randn_like(b)

    def run():
        layer.zero_grad(set_to_none=True)
        xa, xb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        ya, yb = layer(xa), layer(xb)
        (ya * ga).sum().backward()
        (yb * gb).sum().backward()
        return [ya.detach(), yb.detach()] + _grads(layer, xa, xb)

    reused = run()
    assert runtime.scratch_bytes() > 0
    monkeypatch.setattr(merge_module, "scratch", lambda name, shape, like: like.new_empty(shape))
    fresh = run()
    for got, want in zip(reused, fresh):
        assert torch.equal(got, want)


def test_second_call_allocates_no_merged_weights_and_the_pool_stays_bounded():
    layer = LoryMoE(D, FF, E, segment_len=T)
    x = torch.randn(2, 4 * T, D, requires_grad=True)  # 8 segments: merged E at a time
    merged = E * 2 * FF * D  # the [chunk, 2 d_ff, d] buffer of W1; W3
    (layer(x) ** 2).sum().backward()
    held = runtime.scratch_bytes()
    assert held >= merged * 4
    with Allocations() as seen:
        (layer(x) ** 2).sum().backward()
    assert max(seen.sizes) < merged  # neither forward nor backward allocates merged weights again
    for L in (T, 3 * T, 4 * T):  # other shapes: served by the same buffers, never one per shape
        (layer(torch.randn(2, L, D, requires_grad=True)) ** 2).sum().backward()
    assert runtime.scratch_bytes() == held
    runtime.release_scratch()
    assert runtime.scratch_bytes() == 0


def test_scratch_keys_on_name_and_dtype_and_grows_to_the_largest_request():
    like = torch.empty(0)
    a = runtime.scratch("a", (4, 5), like)
    assert a.shape == (4, 5) and a.dtype == torch.float32
    assert runtime.scratch("a", (2, 3), like).data_ptr() == a.data_ptr()
    assert runtime.scratch("b", (2, 3), like).data_ptr() != a.data_ptr()
    assert runtime.scratch("a", (2, 3), like.double()).dtype == torch.float64
    big = runtime.scratch("a", (10, 10), like)
    assert big.shape == (10, 10)
    assert runtime.scratch_bytes() == 4 * 100 + 4 * 6 + 8 * 6


def test_a_buffer_first_used_under_inference_mode_serves_training():
    """Evaluate first, then train (a user's own script): the pooled buffer is a normal tensor."""
    torch.manual_seed(0)
    layer = LoryMoE(D, FF, E, segment_len=T)
    x = torch.randn(2, 4 * T, D)
    with torch.inference_mode():
        y_inference = layer(x)
    y = layer(x.clone().requires_grad_())
    y.sum().backward()
    torch.testing.assert_close(y.detach(), y_inference, rtol=0, atol=0)
    assert all(p.grad is not None for p in layer.experts.parameters())
