"""SparseMixer-v2 against transformers' PhiMoE reference and against its own definition."""

import itertools

import pytest
import torch
from hf_reference import compare_with_block, phimoe_block

from diffmoe.moe import HeunMultiplier, SparseMixerMoE, sparsemixer_route
from diffmoe.moe.sparsemixer import HEUN_P_ONE, band_mask

D, FF, E = 16, 24, 6


@pytest.mark.parametrize("jitter_eps", [0.01, 0.3])
@pytest.mark.parametrize("dispatch_impl", ["loop", "grouped_mm"])
def test_eval_matches_transformers_phimoe_block(jitter_eps, dispatch_impl):
    layer = SparseMixerMoE(D, FF, E, jitter_eps=jitter_eps, dispatch_impl=dispatch_impl).eval()
    torch.nn.init.normal_(layer.router.weight, std=0.5)
    block, router_weight = phimoe_block(layer)
    compare_with_block(layer, block.eval(), router_weight, torch.randn(3, 11, D))
    if jitter_eps == 0.3:
        assert layer.stats["band_multi"][0] > 0  # the band really held several experts


def test_gates_are_masked_softmax_values_not_renormalised():
    logits = torch.tensor(
        [
            [4.0, 1.0, 0.0, -1.0],  # far apart: each band holds one expert
            [1.0, 0.99, 0.2, 0.1],
        ]
    )  # first band holds experts 0 and 1
    mult, experts, band = sparsemixer_route(logits, jitter_eps=0.01, training=False)
    assert experts.tolist() == [[0, 1], [0, 1]]
    assert band.tolist() == [[1, 1], [2, 1]]
    torch.testing.assert_close(mult[0], torch.tensor([1.0, 1.0]))  # lone experts have gate 1
    p = torch.softmax(torch.tensor([1.0, 0.99]), -1)
    torch.testing.assert_close(mult[1], torch.tensor([p[0].item(), 1.0]))


def _heun_inputs(seed=0, n=5, e=5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, e, dtype=torch.float64, generator=g)
    band = torch.rand(n, e, generator=g) < 0.7
    selected = torch.stack([torch.nonzero(b)[0] if b.any() else torch.tensor([0]) for b in band])
    band[torch.arange(n), selected[:, 0]] = True
    return logits.requires_grad_(True), band, selected


def test_heun_backward_is_the_true_derivative_when_scale_is_one():
    logits, band, selected = _heun_inputs()
    scale = torch.ones(logits.shape[0], 1, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: HeunMultiplier.apply(z, band, selected, scale), (logits,))


def test_heun_backward_is_the_stated_estimator_when_scale_is_one_third():
    logits, band, selected = _heun_inputs(seed=1)
    scale = torch.full((logits.shape[0], 1), 1 / 3, dtype=torch.float64)
    g = torch.randn(logits.shape[0], 1, dtype=torch.float64)
    m = HeunMultiplier.apply(logits, band, selected, scale)
    (grad,) = torch.autograd.grad(m, logits, g)
    p = logits.detach().masked_fill(~band, float("-inf")).softmax(-1)
    p_d = p.gather(-1, selected)
    onehot = torch.nn.functional.one_hot(selected[:, 0], logits.shape[1]).double()
    torch.testing.assert_close(grad, g * p_d * (onehot - p))
    # ... which is deliberately 3x the derivative of the forward value p_D / 3
    true = torch.autograd.grad(
        (logits.masked_fill(~band, float("-inf")).softmax(-1).gather(-1, selected) * scale * g).sum(), logits
    )[0]
    torch.testing.assert_close(grad, 3 * true)
    with pytest.raises(Exception):
        torch.autograd.gradcheck(lambda z: HeunMultiplier.apply(z, band, selected, scale), (logits,))


# --- the estimator's expectation -------------------------------------------------------------------
LOGITS = torch.tensor([1.0, 0.9, 0.85, 0.3], dtype=torch.float64)
EPS = 0.1
A = torch.tensor([0.7, -1.3, 0.4, 2.0], dtype=torch.float64)


def _loss(mult, experts):
    """A loss whose upstream gradient depends on the multiplier value (so on the Heun scale)."""
    return (A[experts] * mult + 0.8 * mult.square()).sum()


def _exact_expected_grad():
    """Enumerate D1, s1, D2, s2 with their probabilities; the gradient for each comes from
    HeunMultiplier with the selection fixed."""
    z = LOGITS.unsqueeze(0)
    band1 = band_mask(z, z, EPS)
    p1 = z.masked_fill(~band1, float("-inf")).softmax(-1)[0]
    total = torch.zeros_like(LOGITS)
    for d1 in range(4):
        if p1[d1] == 0:
            continue
        z2 = z.clone()
        z2[0, d1] = float("-inf")
        band2 = band_mask(z2, z, EPS)
        p2 = z2.masked_fill(~band2, float("-inf")).softmax(-1)[0]
        for d2 in range(4):
            if p2[d2] == 0:
                continue
            for s1, s2 in itertools.product((1.0, 1 / 3), repeat=2):
                prob = p1[d1] * p2[d2]
                for d, s, p in ((d1, s1, p1), (d2, s2, p2)):
                    is_max = d == int(p.argmax())
                    prob = prob * (
                        (1.0 if s == 1.0 else 0.0) if is_max else (HEUN_P_ONE if s == 1.0 else 1 - HEUN_P_ONE)
                    )
                if prob == 0:
                    continue
                zz = z.clone().requires_grad_(True)
                m1 = HeunMultiplier.apply(zz, band1, torch.tensor([[d1]]), torch.tensor([[s1]], dtype=torch.float64))
                m2 = HeunMultiplier.apply(zz, band2, torch.tensor([[d2]]), torch.tensor([[s2]], dtype=torch.float64))
                (g,) = torch.autograd.grad(_loss(torch.cat([m1, m2], -1), torch.tensor([[d1, d2]])), zz)
                total += prob * g[0]
    return total


def _mc_grad(route, M):
    """Per-row gradients of M independent samples; returns (mean [E], standard error [E])."""
    z = LOGITS.repeat(M, 1).requires_grad_(True)
    mult, experts = route(z)
    (g,) = torch.autograd.grad(_loss(mult, experts), z)
    return g.mean(0), g.std(0) / M**0.5


def test_training_gradient_agrees_in_expectation_with_transformers_sparsemixer():
    """Monte-Carlo router gradients of diffmoe and of transformers' sparsemixer on the same logits both
    agree with the exact expectation of the SparseMixer-v2 estimator (enumerated), within 5 standard
    errors (plus 1e-3 for transformers' s = 0.3333 instead of 1/3)."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    torch.manual_seed(0)
    M = 100_000
    exact = _exact_expected_grad()
    ours, se_ours = _mc_grad(lambda z: sparsemixer_route(z, EPS, training=True)[:2], M)
    theirs, se_theirs = _mc_grad(lambda z: sparsemixer(z, jitter_eps=EPS, training=True), M)
    assert exact.abs().max() > 0.05  # the band is wide enough for a real router gradient
    assert torch.all((ours - exact).abs() <= 5 * se_ours + 1e-6), (ours, exact, se_ours)
    assert torch.all((theirs - exact).abs() <= 5 * se_theirs + 1e-3), (theirs, exact, se_theirs)


def test_statistics_and_balance_loss_equal_their_definitions():
    """Eval routing is the top-2 of the logits (the second band always holds the remaining maximum), so
    load, band_multi and the balance loss E * sum_i f_i P_i (f over both slots' assignments, P the mean
    full softmax) can be computed from the logits alone."""
    layer = SparseMixerMoE(D, FF, E, jitter_eps=0.3).eval()
    torch.nn.init.normal_(layer.router.weight, std=0.5)
    x = torch.randn(2, 50, D)
    layer(x)
    logits = x.reshape(-1, D) @ layer.router.weight.t()
    top2 = logits.topk(2, -1).indices
    f = torch.bincount(top2.flatten(), minlength=E).float() / top2.numel()
    p = logits.softmax(-1)
    st = layer.stats
    torch.testing.assert_close(st["load"], f)
    band = torch.cat(
        [
            band_mask(logits, logits, 0.3).sum(-1, keepdim=True),
            band_mask(logits.scatter(-1, top2[:, :1], float("-inf")), logits, 0.3).sum(-1, keepdim=True),
        ],
        -1,
    )
    torch.testing.assert_close(st["band_multi"], (band > 1).float().mean(0))
    assert 0 < st["band_multi"][0] < 1  # some bands hold several experts, some one
    balance = layer.aux_losses["balance"]
    torch.testing.assert_close(balance, E * (f * p.mean(0)).sum(), rtol=1e-6, atol=0)
    assert balance.item() > 1.0 + 1e-3  # not the value every uniform router gives (below)
    # the balance loss alone gives the router a gradient, through P: dL/dP_i = E f_i
    (g,) = torch.autograd.grad(balance, layer.router.weight)
    want = torch.autograd.grad(
        E * (f * (x.reshape(-1, D) @ layer.router.weight.t()).softmax(-1).mean(0)).sum(), layer.router.weight
    )[0]
    torch.testing.assert_close(g, want)


def test_balance_loss_known_values_in_training():
    """Uniform router (zero weights): P_i = 1/E for every token, so the loss is 1 (up to rounding)
    whatever the sampled assignments. Collapsed router (every token's band holds only expert 0, then only expert 1):
    f = (1/2, 1/2, 0, ...) and P_0 + P_1 = 1 to within 1e-9, so the loss is E/2 = 3."""
    x = torch.randn(2, 50, D).abs() + 0.1
    uniform = SparseMixerMoE(D, FF, E, jitter_eps=0.3, input_jitter_eps=0.0).train()
    torch.nn.init.zeros_(uniform.router.weight)
    uniform(x)
    assert uniform.aux_losses["balance"].item() == pytest.approx(1.0, abs=1e-6)
    assert uniform.stats["band_multi"].tolist() == [1.0, 1.0]  # all logits equal: every band holds all
    assert (uniform.stats["load"] > 0).all()  # Gumbel sampling over the whole band reaches every expert

    collapsed = SparseMixerMoE(D, FF, E, jitter_eps=0.01).train()  # input jitter on: routing still fixed
    with torch.no_grad():
        collapsed.router.weight.fill_(-2.0)  # logits of x > 0: expert 0 >> expert 1 >> the rest
        collapsed.router.weight[0] = 2.0
        collapsed.router.weight[1] = 1.0
    collapsed(x)
    assert collapsed.stats["load"].tolist() == [0.5, 0.5] + [0.0] * (E - 2)
    assert collapsed.stats["band_multi"].tolist() == [0.0, 0.0]
    assert collapsed.aux_losses["balance"].item() == pytest.approx(E / 2, rel=1e-6)


def test_input_jitter_only_in_training():
    layer = SparseMixerMoE(D, FF, E, input_jitter_eps=0.01)
    x = torch.randn(1, 8, D)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(2)
    b = layer(x)
    assert not torch.equal(a, b)
