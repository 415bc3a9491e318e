"""What a layer says it can do (``capabilities``) is what it does: generic code relies on these claims
instead of on class names, so each claim is checked against the layer's behaviour."""

import pytest
import torch
import torch.distributed as dist

from diffmoe.moe import FAMILIES, MoEConfig, RoutingContext, build_ffn

D, FF = 16, 24
T = 4


def build(kind, **family):
    moe = MoEConfig(num_experts=4)
    if kind == "lory":
        family.setdefault("segment_len", T)
    if kind == "sparsemixer":
        family["jitter_eps"] = 0.3
    if FAMILIES[kind].config is not None:
        moe.families[kind] = FAMILIES[kind].config(**family)
    torch.manual_seed(0)
    layer = build_ffn(kind, D, FF, moe)
    if hasattr(layer, "router"):
        torch.nn.init.normal_(layer.router.weight, std=2.0)  # decisive, imbalanced routing
    return layer


LAYERS = {
    "dense": lambda: build("dense"),
    "lory": lambda: build("lory"),
    "lory-own-mean": lambda: build("lory", first_segment="own_mean"),
    "lory-prefix": lambda: build("lory", routing="prefix"),
    "topk": lambda: build("topk"),
    "topk-capacity": lambda: build("topk", capacity_factor=0.5),  # not causal in training, dropless in eval
    "topk-eval-capacity": lambda: build("topk", capacity_factor=0.5, eval_capacity_factor=0.5),
    "sparsemixer": lambda: build("sparsemixer"),
    "expert-choice": lambda: build("expert_choice"),
    "expert-choice-segment": lambda: build("expert_choice", granularity="segment", segment_len=T),
    "remoe": lambda: build("remoe"),
}
L = 5 * T + 1


def run(layer, x):
    torch.manual_seed(1)  # the same sampling noise in every call (SparseMixer-v2 in training)
    return layer(x)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_causal_from(name, training):
    layer = LAYERS[name]().train(training)
    start = layer.capabilities.causal_from
    x = torch.randn(3, L, D)
    base = run(layer, x)
    leaks = []
    for t in range(L - 1):
        changed = x.clone()
        changed[:, t + 1 :] = 3 * torch.randn(3, L - t - 1, D)
        leaks.append(not torch.allclose(run(layer, changed)[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6))
    if start is None:
        assert any(leaks)  # the claim "not causal" is honest: some later token changes an earlier output
    else:
        assert not any(leaks[start:]), [t for t, leak in enumerate(leaks) if leak]


@pytest.mark.parametrize("name", list(LAYERS))
def test_incremental_decoding(name):
    """A prompt covering the first routing segment, then one token at a time with a decoding state,
    reproduces the full forward when the layer says so; when it says it cannot, it does not."""
    layer = LAYERS[name]().eval()
    x = torch.randn(2, L, D)
    with torch.no_grad():
        full = layer(x)
        state = {}
        steps = torch.cat(
            [layer(x[:, :T], RoutingContext(state=state))]
            + [layer(x[:, t : t + 1], RoutingContext(state=state)) for t in range(T, L)],
            1,
        )
    same = torch.allclose(steps, full, rtol=1e-5, atol=1e-6)
    assert same == layer.capabilities.incremental_decoding


def without_gradient(layer, tokens):
    """Parameters (experts one by one) that get no gradient from a training step on ``tokens`` tokens."""
    layer.zero_grad(set_to_none=True)
    x = torch.randn(1, tokens, D, requires_grad=True)
    (run(layer, x) * torch.randn(1, tokens, D)).sum().backward()
    missing = []
    for name, p in layer.named_parameters():
        per_expert = name.startswith("experts.")
        for i, g in enumerate(p.grad if per_expert and p.grad is not None else [p.grad]):
            if g is None or not g.abs().sum() > 0:
                missing.append(f"{name}[{i}]" if per_expert else name)
    return missing


@pytest.mark.parametrize("name", list(LAYERS))
def test_dense_gradients(name):
    layer = LAYERS[name]().train()
    if layer.capabilities.dense_gradients:
        assert not without_gradient(layer, L) and not without_gradient(layer, T + 1)
    else:  # a single token reaches at most two of the four experts
        assert without_gradient(layer, 1)


@pytest.mark.parametrize("name", list(LAYERS))
def test_global_counts(name, monkeypatch):
    """A layer that says it needs all ranks' counts all-reduces in its forward; the others never do."""
    calls = []
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: calls.append(tensor.shape))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        layer = LAYERS[name]().train()
        run(layer, torch.randn(2, L, D))
    finally:
        dist.destroy_process_group()
    assert bool(calls) == layer.capabilities.global_counts


@pytest.mark.parametrize("name", list(LAYERS))
def test_routing_modes(name):
    layer = LAYERS[name]()
    modes = layer.capabilities.routing_modes
    for mode in modes:
        layer.routing = mode
        assert layer.routing == mode
        layer.eval()(torch.randn(1, L, D))
    if modes:
        with pytest.raises(ValueError, match="routing"):
            layer.routing = "no-such-mode"
    segment_len = layer.capabilities.segment_len
    assert segment_len in (None, T)


def test_generation_refuses_layers_that_cannot_decode_token_by_token():
    from conftest import tiny_model_config

    from diffmoe import Decoder
    from diffmoe.eval.generate import generate

    model = Decoder(tiny_model_config(ffn=["lory", "expert_choice"]))
    with pytest.raises(ValueError, match=r"layer 1 \(ExpertChoiceMoE\)"):
        generate(model, torch.zeros(1, 4, dtype=torch.long), 3)
