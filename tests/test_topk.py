import math

import pytest
import torch
from hf_reference import compare_with_block, mixtral_block

from diffmoe.moe import TopKConfig, TopKMoE
from diffmoe.moe.topk import capacity_keep_mask
from diffmoe.schema import ConfigError

D, FF, E = 16, 24, 6


@pytest.mark.parametrize("dispatch_impl", ["loop", "grouped_mm"])
def test_matches_transformers_mixtral_block(dispatch_impl):
    layer = TopKMoE(D, FF, E, top_k=2, renormalize=True, dispatch_impl=dispatch_impl)
    torch.nn.init.normal_(layer.router.weight, std=0.5)
    block, router_weight = mixtral_block(layer)
    compare_with_block(layer, block, router_weight, torch.randn(3, 11, D))


def test_switch_gates_are_raw_softmax():
    layer = TopKMoE(D, FF, E, top_k=1, renormalize=False, dispatch_impl="loop").double()
    x = torch.randn(1, 9, D, dtype=torch.float64)
    y = layer(x)[0]
    p = torch.softmax(layer.router(x[0]), -1)
    i = p.argmax(-1)
    ref = torch.stack([p[n, i[n]] * layer.experts.expert_forward(x[0, n : n + 1], int(i[n]))[0] for n in range(9)])
    torch.testing.assert_close(y, ref)


def test_balance_and_z_loss_values():
    layer = TopKMoE(D, FF, E, top_k=2, balance_coef=0.1, z_loss_coef=0.01, global_balance=False)
    x = torch.randn(2, 7, D)
    layer(x)
    logits = layer.router(x.reshape(-1, D))
    p = logits.softmax(-1)
    idx = p.topk(2, -1).indices.reshape(-1)
    f = torch.bincount(idx, minlength=E).float() / idx.numel()
    balance = E * (f * p.mean(0)).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(layer.aux_losses["balance"], balance)
    torch.testing.assert_close(layer.aux_losses["z"], z)
    torch.testing.assert_close(layer.aux_loss, 0.1 * balance + 0.01 * z)
    layer.aux_loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0
    torch.testing.assert_close(layer.stats["load"], f)


def test_capacity_keeps_exactly_the_first_assignments_in_priority_order():
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])  # 4 tokens, top-2
    keep = capacity_keep_mask(idx, num_experts=3, capacity=2)
    # slot 1 first: expert 0 gets tokens 0, 1 (token 2's slot 1 overflows), expert 1 gets token 3;
    # then slot 2: expert 1 takes token 0, token 2's is over; expert 2 takes token 1; expert 0 is full.
    assert keep.tolist() == [[True, True], [True, True], [False, False], [True, False]]


def test_capacity_drops_exactly_the_overflow():
    layer = TopKMoE(D, FF, E, top_k=2, capacity_factor=0.5)
    torch.nn.init.normal_(layer.router.weight, std=2.0)  # imbalanced routing
    x = torch.randn(4, 16, D)
    y = layer(x)
    N = 64
    capacity = math.ceil(0.5 * N * 2 / E)
    p = torch.softmax(layer.router(x.reshape(-1, D)), -1)
    gate, idx = p.topk(2, -1)
    gate = gate / gate.sum(-1, keepdim=True)
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    expected_dropped = (counts - capacity).clamp(min=0).sum().item()
    keep = capacity_keep_mask(idx, E, capacity)
    assert (~keep).sum().item() == expected_dropped > 0
    kept_per_expert = torch.bincount(idx[keep], minlength=E)
    assert torch.equal(kept_per_expert, counts.clamp(max=capacity))
    ref = torch.zeros(N, D)
    xf = x.reshape(-1, D)
    for n in range(N):
        for s in range(2):
            if keep[n, s]:
                ref[n] += gate[n, s] * layer.experts.expert_forward(xf[n : n + 1], int(idx[n, s]))[0]
    torch.testing.assert_close(y.reshape(-1, D), ref, rtol=1e-5, atol=1e-6)
    assert layer.stats["dropped"].item() == pytest.approx(expected_dropped / (2 * N))


def test_capacity_applies_in_training_and_evaluation_is_dropless_unless_given_its_own():
    """GShard: the capacity drops tokens in training; eval mode is dropless (causal, batch-independent)
    by default, or uses ``eval_capacity_factor``."""
    torch.manual_seed(0)
    capped = TopKMoE(D, FF, E, top_k=2, capacity_factor=0.5)
    torch.nn.init.normal_(capped.router.weight, std=2.0)  # imbalanced routing: the capacity drops
    dropless = TopKMoE(D, FF, E, top_k=2)
    eval_capped = TopKMoE(D, FF, E, top_k=2, capacity_factor=0.5, eval_capacity_factor=0.5)
    for layer in (dropless, eval_capped):
        layer.load_state_dict(capped.state_dict())
    x = torch.randn(4, 16, D)
    with torch.no_grad():
        trained = capped.train()(x)
        assert capped.stats["dropped"] > 0
        torch.testing.assert_close(capped.eval()(x), dropless.eval()(x))
        assert "dropped" not in capped.stats
        assert not torch.allclose(trained, dropless(x), atol=1e-4)
        torch.testing.assert_close(eval_capped.eval()(x), trained)
        assert eval_capped.stats["dropped"] > 0


def test_top1_with_renormalized_gates_is_refused_for_training():
    """The renormalised gate of one expert is always 1: the router would learn only from the balance loss."""
    with pytest.raises(ConfigError, match=r"^invalid config: renormalize=True: with top_k=1 .* balance loss"):
        TopKConfig(top_k=1, renormalize=True).check_training(64)
    assert TopKConfig(top_k=1, renormalize=False).check_training(64) == []
    assert TopKConfig(top_k=2, renormalize=True, capacity_factor=1.0).check_training(64) == []
    (warning,) = TopKConfig(eval_capacity_factor=2.0).check_training(64)
    assert warning.startswith("eval_capacity_factor=2.0: ") and "not a causal likelihood" in warning
