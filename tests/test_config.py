import re
from pathlib import Path

import pytest

from diffmoe.config import ConfigError, ModelConfig
from diffmoe.moe import ExpertChoiceMoE, LoryConfig, LoryMoE, SparseMixerMoE, TopKConfig, TopKMoE

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: ModelConfig(d_model=30, n_heads=4), "d_model"),
        (lambda: ModelConfig(n_kv_heads=3, n_heads=4), "n_kv_heads"),
        (lambda: ModelConfig(ffn="mixture"), "ffn"),
        (lambda: ModelConfig(n_layers=2, ffn=["dense"]), "ffn"),
        (lambda: ModelConfig.from_dict({"moe": {"lory": {"segment_len": 0}}}), "moe.lory.segment_len"),
        (
            lambda: ModelConfig.from_dict({"ffn": "topk", "moe": {"num_experts": 4, "topk": {"top_k": 5}}}),
            "moe.topk.top_k",
        ),
        (lambda: ModelConfig.from_dict({"moe": {"lory": {"first_segment": "peek"}}}), "moe.lory.first_segment"),
        (lambda: ModelConfig.from_dict({"moe": {"num_experts": 1}, "ffn": "sparsemixer"}), "moe.num_experts"),
        (lambda: ModelConfig.from_dict({"moe": {"dispatch": "magic"}}), "moe.dispatch"),
        (lambda: ModelConfig.from_dict({"moe": {"experts": 4}}), "moe.experts"),
        (
            lambda: ModelConfig.from_dict({"moe": {"topk": {"eval_capacity_factor": 0}}}),
            "moe.topk.eval_capacity_factor",
        ),
        (lambda: LoryMoE(16, 32, 4, segment_len=0), "segment_len"),
        (lambda: TopKMoE(16, 32, 4, top_k=5), "top_k"),
        (lambda: SparseMixerMoE(16, 32, 1), "num_experts"),
        (lambda: ExpertChoiceMoE(16, 32, 4, granularity="sequence"), "granularity"),
    ],
)
def test_invalid_config_names_the_field(build, field):
    with pytest.raises(ConfigError) as err:
        build()
    assert field in str(err.value)


def test_unknown_ffn_kind_lists_choices():
    with pytest.raises(ConfigError, match="dense, lory, topk, sparsemixer, expert_choice"):
        ModelConfig(ffn="switch")


def test_config_round_trips_through_dict():
    cfg = ModelConfig(n_layers=4, ffn=["dense", "lory", "sparsemixer", "topk"])
    cfg.moe.families["lory"].segment_len = 64
    cfg.moe.families["topk"].capacity_factor = 1.25
    cfg.moe.families["topk"].eval_capacity_factor = 2.0
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.layer_ffn(1) == "lory" and again.moe.families["lory"].segment_len == 64


def test_a_saved_config_holds_only_the_families_in_use():
    cfg = ModelConfig.from_dict(
        {
            "ffn": ["dense", "lory"],
            "n_layers": 2,
            "moe": {"lory": {"segment_len": 8}, "topk": {"top_k": 1}, "expert_choice": {}},
        }
    )
    assert list(cfg.moe.families) == ["lory"] and cfg.moe.families["lory"].segment_len == 8
    saved = cfg.to_dict()["moe"]
    assert "lory" in saved and not {"topk", "sparsemixer", "expert_choice"} & set(saved)
    assert "lory" not in ModelConfig().to_dict()["moe"]  # a dense model: the shared fields only
    with pytest.raises(ConfigError, match=r"moe\.topk\.top_k=0"):  # an unused section is still checked
        ModelConfig.from_dict({"moe": {"topk": {"top_k": 0}}})


def test_constraints_of_unused_kinds_are_not_enforced():
    cfg = ModelConfig.from_dict({"ffn": "lory", "moe": {"num_experts": 1}})  # top_k=2 > 1 is irrelevant
    assert cfg.moe.num_experts == 1


def training_config(ffn, **families):
    from diffmoe.config import RunConfig
    from diffmoe.moe import MoEConfig

    return RunConfig(
        model=ModelConfig(
            vocab_size=384,
            d_model=32,
            n_layers=2,
            n_heads=4,
            d_ff=64,
            max_seq_len=64,
            ffn=ffn,
            moe=MoEConfig(num_experts=4, families=families),
        )
    )


@pytest.mark.parametrize(
    "ffn, families, message",
    [
        (
            "lory",
            dict(lory=LoryConfig(segment_len=8, routing="prompt")),
            "model.moe.lory.routing='prompt': routes every position on the mean of the whole sequence",
        ),
        (
            "lory",
            dict(lory=LoryConfig(segment_len=32)),
            "model.moe.lory.segment_len=32: must be shorter than the training sequences (32 positions)",
        ),
        (["dense", "lory"], dict(lory=LoryConfig(segment_len=40, routing="prefix")), "model.moe.lory.segment_len=40"),
        ("topk", dict(topk=TopKConfig(top_k=1)), "model.moe.topk.renormalize=True: with top_k=1"),
    ],
)
def test_training_refuses_configs_that_leak_or_cannot_learn(ffn, families, message):
    """Each of these builds a model (evaluation and generation may use it) but cannot train on 32 positions."""
    cfg = training_config(ffn, **families)
    with pytest.raises(ConfigError, match="^invalid config: " + re.escape(message)):
        cfg.check_training(32)


def test_training_checks_only_the_kinds_in_use_and_passes_what_can_learn():
    refused = dict(lory=LoryConfig(segment_len=256, routing="prompt"), topk=TopKConfig(top_k=1))
    assert training_config(["dense", "sparsemixer"], **refused).check_training(32) == []
    assert training_config("lory", lory=LoryConfig(segment_len=31, routing="prefix")).check_training(32) == []
    assert training_config("topk", topk=TopKConfig(capacity_factor=1.0)).check_training(32) == []
    (warning,) = training_config("topk", topk=TopKConfig(eval_capacity_factor=2.0)).check_training(32)
    assert warning.startswith("model.moe.topk.eval_capacity_factor=2.0: evaluation drops tokens")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_can_train_at_their_context_length(path):
    from diffmoe.config import load_config

    cfg = load_config(str(path))
    assert cfg.check_training(cfg.model.max_seq_len) == []


def test_train_refuses_before_writing_and_records_warnings_in_metrics(tiny_dataset, tmp_path):
    """The training entry point checks against the dataset's context length (32); a warning is in
    metrics.jsonl."""
    from test_train import run_config

    from diffmoe.train import train
    from diffmoe.train.metrics import read_metrics

    cfg = run_config(tiny_dataset, "lory", steps=1)
    cfg.model.moe.families["lory"].segment_len = 32  # < max_seq_len 64, but every training sequence is one segment
    with pytest.raises(ConfigError, match=r"model\.moe\.lory\.segment_len=32: .*\(32 positions\)"):
        train(cfg, tmp_path / "refused", show_progress=False)
    assert not (tmp_path / "refused").exists()
    cfg = run_config(tiny_dataset, "topk", steps=1)
    cfg.model.moe.families["topk"].eval_capacity_factor = 2.0
    train(cfg, tmp_path / "warned", show_progress=False)
    warnings = [r for r in read_metrics(tmp_path / "warned") if r["kind"] == "warning"]
    assert [(r["step"], r["message"].split(":")[0]) for r in warnings] == [
        (0, "model.moe.topk.eval_capacity_factor=2.0")
    ]
