"""transformers' MoE blocks with weights copied from diffmoe layers (the numerics references)."""

import torch


def _copy_experts(hf_experts, layer):
    with torch.no_grad():
        hf_experts.gate_up_proj.copy_(torch.cat([layer.experts.w1, layer.experts.w3], dim=1))
        hf_experts.down_proj.copy_(layer.experts.w2)


def mixtral_block(layer):
    from transformers.models.mixtral.configuration_mixtral import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=layer.d_model,
        intermediate_size=layer.d_ff,
        num_local_experts=layer.num_experts,
        num_experts_per_tok=layer.top_k,
        router_jitter_noise=0.0,
    )
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
    _copy_experts(block.experts, layer)
    return block, block.gate.weight


def phimoe_block(layer):
    from transformers.models.phimoe.configuration_phimoe import PhimoeConfig
    from transformers.models.phimoe.modeling_phimoe import PhimoeSparseMoeBlock

    cfg = PhimoeConfig(
        hidden_size=layer.d_model,
        intermediate_size=layer.d_ff,
        num_local_experts=layer.num_experts,
        num_experts_per_tok=2,
        router_jitter_noise=layer.jitter_eps,
        input_jitter_noise=0.0,
    )
    block = PhimoeSparseMoeBlock(cfg)
    with torch.no_grad():
        block.router.weight.copy_(layer.router.weight)
    _copy_experts(block.experts, layer)
    return block, block.router.weight


def compare_with_block(layer, block, router_weight, x, rtol=1e-5, atol=1e-6):
    """Same outputs and gradients (input, router, w1, w3, w2) for a random upstream gradient."""
    g = torch.randn_like(x)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = layer(xa), block(xb)
    torch.testing.assert_close(ya, yb, rtol=rtol, atol=atol)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    F = layer.d_ff
    gu, down = block.experts.gate_up_proj.grad, block.experts.down_proj.grad
    torch.testing.assert_close(xa.grad, xb.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(layer.router.weight.grad, router_weight.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(layer.experts.w1.grad, gu[:, :F], rtol=rtol, atol=atol)
    torch.testing.assert_close(layer.experts.w3.grad, gu[:, F:], rtol=rtol, atol=atol)
    torch.testing.assert_close(layer.experts.w2.grad, down, rtol=rtol, atol=atol)
