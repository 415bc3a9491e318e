"""Every shipped config loads, validates and builds; the paper shapes have the paper's sizes."""

from pathlib import Path

import pytest
import torch

from diffmoe import Decoder
from diffmoe.config import load_config

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


def test_configs_are_shipped_smallest_first():
    names = [p.name for p in CONFIGS]
    assert names == sorted(names) and names[0].startswith("00-tiny") and len(names) >= 10


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds(path):
    cfg = load_config(str(path))
    with torch.device("meta"):  # no memory: the paper shapes have billions of parameters
        model = Decoder(cfg.model)
    counts = model.parameter_counts()
    non_embedding = counts["active"] - 2 * cfg.model.vocab_size * cfg.model.d_model
    if "paper-0.3b" in path.name:
        assert 0.29e9 < non_embedding < 0.32e9  # the 0.3B active shape of the Lory paper
    if "lory-32e" in path.name:
        assert 6.5e9 < counts["total"] < 7.2e9  # "0.3B/32E has 6.8B in total"
    if path.name.startswith("0"):  # the small ones really run
        tiny = Decoder(cfg.model)
        assert tiny(torch.randint(0, cfg.model.vocab_size, (1, 16))).shape == (1, 16, cfg.model.vocab_size)
