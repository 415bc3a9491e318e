import pytest
import torch

from diffmoe.moe import ExpertChoiceMoE
from diffmoe.moe.expert_choice import expert_capacity

D, FF, E = 16, 24, 4


def test_token_level_each_expert_takes_exactly_its_capacity_and_matches_reference():
    layer = ExpertChoiceMoE(D, FF, E, capacity_factor=1.5).double()
    x = torch.randn(2, 10, D, dtype=torch.float64)
    y = layer(x).reshape(-1, D)
    xf = x.reshape(-1, D)
    S = torch.softmax(layer.router(xf), -1)
    cap = expert_capacity(20, 1.5, E)
    assert cap == 8  # round(20 * 1.5 / 4) = round(7.5), Python rounds half to even
    ref = torch.zeros_like(xf)
    for e in range(E):
        gate, tok = S[:, e].topk(cap)
        assert tok.numel() == cap
        for g, t in zip(gate, tok.tolist()):
            ref[t] += g * layer.experts.expert_forward(xf[t : t + 1], e)[0]
    torch.testing.assert_close(y, ref)


def test_segment_level_selects_whole_segments():
    layer = ExpertChoiceMoE(D, FF, E, capacity_factor=1.0, granularity="segment", segment_len=5)
    x = torch.randn(2, 18, D)  # 4 segments per sequence (last one ragged): 8 items, capacity 2
    y = layer(x)
    # a segment is either entirely processed or entirely passed through (zero FFN output)
    nonzero = (y.abs().sum(-1) > 0).view(2, 18)
    for b in range(2):
        for k in range(4):
            seg = nonzero[b, k * 5 : (k + 1) * 5]
            assert seg.all() or not seg.any()
    # each expert took exactly 2 of the 8 segments: the chosen ones are the union of per-expert top-2
    means = torch.stack([x[b, k * 5 : (k + 1) * 5].mean(0) for b in range(2) for k in range(4)])
    chosen = torch.softmax(layer.router(means), -1).t().topk(2, -1).indices.unique()
    processed = nonzero.view(2, 18)[:, ::5].reshape(-1).nonzero().flatten()
    assert torch.equal(processed, chosen)
    assert layer.stats["unrouted"].item() == pytest.approx(1 - chosen.numel() / 8)


def test_expert_choice_is_not_causal():
    """Documented leak: changing only future tokens can change the output at earlier positions."""
    torch.manual_seed(3)
    layer = ExpertChoiceMoE(D, FF, E, capacity_factor=1.0)
    torch.nn.init.normal_(layer.router.weight, std=1.0)
    x = torch.randn(1, 32, D)
    x2 = x.clone()
    x2[:, 16:] = 3 * torch.randn(1, 16, D)
    assert not torch.allclose(layer(x)[:, :16], layer(x2)[:, :16])
