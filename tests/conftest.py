import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_model_config(**overrides):
    """A small decoder config shared by model-level tests."""
    from diffmoe.config import ModelConfig

    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=128)
    base.update(overrides)
    return ModelConfig(**base)
