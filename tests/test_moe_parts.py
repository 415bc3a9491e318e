"""The parts every MoE family shares: the router's float32 logits, the experts container as the one
module a layer runs its experts through, and a forward that torch.compile traces for every family."""

import pytest
import torch
import torch.nn.functional as F

from diffmoe.moe import Experts, LoryMoE, Router, SparseMixerMoE, TopKMoE
from diffmoe.moe.expert_choice import ExpertChoiceMoE
from diffmoe.moe.merge import merged_swiglu

D, FF, E = 32, 48, 8


def close_logits_input():
    """Tokens whose top-2 router logits differ by less than bf16 resolves (~1 % relative), so a router
    computed in bfloat16 picks other experts for some of them."""
    torch.manual_seed(0)
    router = Router(D, E)
    torch.nn.init.normal_(router.weight, std=1.0)
    x = torch.randn(4, 64, D) * 3
    return router, x


def test_router_logits_are_float32_under_bf16_autocast():
    router, x = close_logits_input()
    want = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = router(x)
        naive = F.linear(x, router.weight)  # what a plain nn.Linear does under autocast
    assert got.dtype == torch.float32 and naive.dtype == torch.bfloat16
    assert torch.equal(got, want)
    # the test can fail: bf16 logits really route differently on this input
    assert not torch.equal(naive.float().topk(2, -1).indices, want.topk(2, -1).indices)
    assert router(x.double()).dtype == torch.float64


@pytest.mark.parametrize(
    "build",
    [
        lambda: TopKMoE(D, FF, E, top_k=2),
        lambda: SparseMixerMoE(D, FF, E, jitter_eps=0.01).eval(),
        lambda: LoryMoE(D, FF, E, segment_len=16),
        lambda: ExpertChoiceMoE(D, FF, E, capacity_factor=2.0),
    ],
    ids=["topk", "sparsemixer-eval", "lory", "expert-choice"],
)
def test_layers_route_the_same_under_bf16_autocast(build):
    """Same input, float32 run vs bf16 autocast run: identical routing decisions (the experts' outputs
    are bf16 and differ, the choice of experts and the weights do not)."""
    router_ref, x = close_logits_input()
    layer = build()
    with torch.no_grad():
        layer.router.weight.copy_(router_ref.weight)
    layer(x)
    want = {k: v.clone() for k, v in layer.stats.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    for name in ("load", "mean_weight", "routing_weights"):
        if name in want:
            torch.testing.assert_close(layer.stats[name], want[name], rtol=0, atol=0)


@pytest.mark.parametrize(
    "build, way",
    [
        (lambda: TopKMoE(D, FF, E), "forward"),
        (lambda: SparseMixerMoE(D, FF, E), "forward"),
        (lambda: ExpertChoiceMoE(D, FF, E), "forward"),
        (lambda: LoryMoE(D, FF, E, segment_len=8), "forward_merged"),
        (lambda: LoryMoE(D, FF, E, segment_len=8, routing="prompt"), "merge"),
    ],
    ids=["topk", "sparsemixer", "expert-choice", "lory-segment", "lory-prompt"],
)
def test_layers_run_experts_only_through_the_experts_module(build, way, monkeypatch):
    """The experts container is the boundary parallelism wraps: a layer's forward calls exactly one of
    its ways of running experts, and its output is exactly what that call returned (or, for merged
    weights, what they compute)."""
    calls = []
    for name in ("forward", "forward_merged", "merge"):
        real = getattr(Experts, name)

        def spy(self, *args, _name=name, _real=real, **kwargs):
            out = _real(self, *args, **kwargs)
            calls.append((_name, out))
            return out

        monkeypatch.setattr(Experts, name, spy)
    layer = build()
    x = torch.randn(2, 20, D)
    y = layer(x)
    assert [name for name, _ in calls] == [way]
    ran = calls[0][1]
    if way == "merge":
        ran = merged_swiglu(x, ran)
    torch.testing.assert_close(y, ran.reshape(2, -1, D)[:, :20], rtol=0, atol=0)


def test_lory_decoding_merges_through_the_experts_module():
    from diffmoe.moe import RoutingContext

    layer = LoryMoE(D, FF, E, segment_len=4, routing="prompt").eval()
    x = torch.randn(2, 6, D)
    state = {}
    with torch.no_grad():
        y = layer(x, RoutingContext(state=state))
        merged = layer.experts.merge(layer.stats["routing_weights"][:, 0])
    for have, want in zip(state["merged"], merged):
        torch.testing.assert_close(have, want)
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-6)


def test_every_family_trains_under_torch_compile_as_in_eager():
    """Dynamo traces every family up to and across the graph break at its experts, and AOT autograd
    differentiates what it traced: the compiled step's gradients equal the eager ones (backend
    ``aot_eager``, no C compiler; inductor's code generation is covered by the compiled training test)."""
    from conftest import tiny_model_config

    from diffmoe import Decoder

    cfg = tiny_model_config(ffn=["topk", "sparsemixer", "expert_choice", "lory"], n_layers=4)
    cfg.moe.num_experts = 4
    cfg.moe.families["lory"].segment_len = 8
    ids = torch.randint(0, 97, (2, 24))
    grads = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = Decoder(cfg).eval()  # eval: SparseMixer-v2 routes by argmax, so both runs route alike
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        (forward(ids).square().mean() + model.aux_loss()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
