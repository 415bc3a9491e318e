import pytest
import torch

from diffmoe.moe import Experts
from diffmoe.moe.dispatch import dispatch, resolve_impl


def _reference(x, experts, token_idx, expert_idx, gate):
    y = torch.zeros_like(x)
    for t, e, g in zip(token_idx.tolist(), expert_idx.tolist(), gate):
        y[t] += g * experts.expert_forward(x[t : t + 1], e)[0]
    return y


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_dispatch_equals_per_assignment_reference_with_empty_experts(impl):
    experts = Experts(5, 12, 20)
    x = torch.randn(9, 12, requires_grad=True)
    # experts 1 and 3 get nothing; token 4 gets nothing; token 0 goes twice to expert 2
    token_idx = torch.tensor([0, 0, 1, 2, 3, 5, 6, 7, 8, 8])
    expert_idx = torch.tensor([2, 2, 0, 4, 0, 2, 4, 0, 2, 4])
    gate = torch.rand(10, requires_grad=True)
    g = torch.randn(9, 12)
    y = dispatch(x, experts, token_idx, expert_idx, gate, impl)
    (y * g).sum().backward()
    got = [x.grad, gate.grad, experts.w1.grad, experts.w3.grad, experts.w2.grad]
    for t in [x, gate, *experts.parameters()]:
        t.grad = None
    y_ref = _reference(x, experts, token_idx, expert_idx, gate)
    (y_ref * g).sum().backward()
    want = [x.grad, gate.grad, experts.w1.grad, experts.w3.grad, experts.w2.grad]
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert torch.all(y[4] == 0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.all(experts.w1.grad[[1, 3]] == 0)


def test_grouped_equals_loop_bfloat16_and_empty_assignment_list():
    experts = Experts(4, 16, 32).to(torch.bfloat16)
    x = torch.randn(50, 16, dtype=torch.bfloat16)
    e = torch.randint(0, 4, (100,))
    t = torch.randint(0, 50, (100,))
    gate = torch.rand(100)
    a = dispatch(x, experts, t, e, gate, "grouped_mm")
    b = dispatch(x, experts, t, e, gate, "loop")
    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    empty = torch.zeros(0, dtype=torch.long)
    assert torch.all(dispatch(x, experts, empty, empty, torch.zeros(0), "loop") == 0)


def test_float64_always_takes_the_loop():
    assert resolve_impl("grouped_mm", torch.zeros(1, dtype=torch.float64)) == "loop"
    assert resolve_impl("auto", torch.zeros(1)) == "loop"  # CPU
    assert resolve_impl("loop", torch.zeros(1, dtype=torch.bfloat16)) == "loop"


def test_fused_loop_backward_passes_gradcheck_with_empty_experts_and_repeated_tokens():
    """The hand-written backward of the CPU path (gather, SwiGLU, gating, scatter per expert), float64:
    experts 1 and 3 get no rows, token 0 is sent twice to expert 2, token 5 nowhere."""
    from diffmoe.moe.dispatch import GatherSwiGLUScatter

    torch.manual_seed(0)
    E, d, f = 5, 4, 6
    counts = [3, 0, 3, 0, 2]
    tok = torch.tensor([1, 2, 4, 0, 0, 3, 2, 4])  # sorted by expert: 0 0 0 | 2 2 2 | 4 4
    x = torch.randn(6, d, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(8, dtype=torch.float64, requires_grad=True)
    ws = [
        torch.randn(E, f, d, dtype=torch.float64, requires_grad=True),
        torch.randn(E, f, d, dtype=torch.float64, requires_grad=True),
        torch.randn(E, d, f, dtype=torch.float64, requires_grad=True),
    ]
    fn = lambda x, g, a, b, c: GatherSwiGLUScatter.apply(x, tok, g, counts, a, b, c)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, gate, *ws))
    y = fn(x, gate, *ws)
    assert torch.all(y[5] == 0)
    y.sum().backward()
    assert torch.all(ws[0].grad[[1, 3]] == 0) and torch.all(ws[2].grad[[1, 3]] == 0)
    assert torch.all(x.grad[5] == 0)


def test_autocast_runs_both_paths_in_bfloat16_with_float32_gradients():
    torch.manual_seed(0)
    experts = Experts(4, 16, 32)
    x = torch.randn(10, 16, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 3])
    e = torch.tensor([0, 1, 1, 3, 0, 0, 3, 1, 1, 0, 3, 1])
    gate = torch.rand(12)
    outs = {}
    for impl in ("loop", "grouped_mm"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = dispatch(x, experts, t, e, gate, impl)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        assert experts.w1.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
        outs[impl] = (y.float(), experts.w2.grad.clone())
        experts.zero_grad(set_to_none=True)
        x.grad = None
    torch.testing.assert_close(outs["loop"][0], outs["grouped_mm"][0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(outs["loop"][1], outs["grouped_mm"][1], rtol=5e-2, atol=5e-2)
