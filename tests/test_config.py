import pytest

from diffmoe.config import ConfigError, ModelConfig
from diffmoe.moe import ExpertChoiceMoE, LoryMoE, SparseMixerMoE, TopKMoE


@pytest.mark.parametrize("build, field", [
    (lambda: ModelConfig(d_model=30, n_heads=4), "d_model"),
    (lambda: ModelConfig(n_kv_heads=3, n_heads=4), "n_kv_heads"),
    (lambda: ModelConfig(ffn="mixture"), "ffn"),
    (lambda: ModelConfig(n_layers=2, ffn=["dense"]), "ffn"),
    (lambda: ModelConfig.from_dict({"moe": {"lory": {"segment_len": 0}}}), "moe.lory.segment_len"),
    (lambda: ModelConfig.from_dict({"ffn": "topk", "moe": {"num_experts": 4, "topk": {"top_k": 5}}}),
     "moe.topk.top_k"),
    (lambda: ModelConfig.from_dict({"moe": {"lory": {"first_segment": "peek"}}}), "moe.lory.first_segment"),
    (lambda: ModelConfig.from_dict({"moe": {"num_experts": 1}, "ffn": "sparsemixer"}), "moe.num_experts"),
    (lambda: ModelConfig.from_dict({"moe": {"dispatch": "magic"}}), "moe.dispatch"),
    (lambda: ModelConfig.from_dict({"moe": {"experts": 4}}), "moe.experts"),
    (lambda: LoryMoE(16, 32, 4, segment_len=0), "segment_len"),
    (lambda: TopKMoE(16, 32, 4, top_k=5), "top_k"),
    (lambda: SparseMixerMoE(16, 32, 1), "num_experts"),
    (lambda: ExpertChoiceMoE(16, 32, 4, granularity="sequence"), "granularity"),
])
def test_invalid_config_names_the_field(build, field):
    with pytest.raises(ConfigError) as err:
        build()
    assert field in str(err.value)


def test_unknown_ffn_kind_lists_choices():
    with pytest.raises(ConfigError, match="dense, lory, topk, sparsemixer, expert_choice"):
        ModelConfig(ffn="switch")


def test_config_round_trips_through_dict():
    cfg = ModelConfig(n_layers=3, ffn=["dense", "lory", "sparsemixer"])
    cfg.moe.lory.segment_len = 64
    cfg.moe.topk.capacity_factor = 1.25
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.layer_ffn(1) == "lory" and again.moe.lory.segment_len == 64


def test_constraints_of_unused_kinds_are_not_enforced():
    cfg = ModelConfig.from_dict({"ffn": "lory", "moe": {"num_experts": 1}})  # top_k=2 > 1 is irrelevant
    assert cfg.moe.num_experts == 1
