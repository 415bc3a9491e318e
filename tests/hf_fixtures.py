"""Shared by the Hugging Face tests: weights that make a wrong mapping visible."""

import torch


@torch.no_grad()
def harsh_init(model):
    """Norm gains of 1 +- 0.3 and routers of std 1 (so a mixed-up norm or a wrong routing rule moves the
    logits well beyond the tests' 1e-5). Returns ``model``."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.3 * torch.randn_like(p))
        if "router" in name:
            p.normal_(std=1.0)
    return model


def load_hf(path):
    """``AutoModelForCausalLM`` from an export (native class), asserting every tensor was used, in eval mode."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()
