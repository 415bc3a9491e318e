"""train.parallel and the global batch: invalid layouts are one-line errors naming the field; the
layout resolves against the world size; accumulation is derived from the global batch."""

import pytest

from diffmoe.config import ConfigError, DataConfig, ModelConfig, ParallelConfig, RunConfig, TrainConfig, load_config
from diffmoe.parallel.layout import Layout
from diffmoe.train.loop import batch_split


def run(ffn="lory", num_experts=4, **parallel):
    model = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32, ffn=ffn)
    model.moe.num_experts = num_experts
    return RunConfig(model=model, train=TrainConfig(parallel=ParallelConfig(**parallel)))


@pytest.mark.parametrize(
    "ffn, fields, message",
    [
        ("topk", dict(mode="fsdp", ep=3), "train.parallel.ep=3: must divide model.moe.num_experts=4"),
        (
            "lory",
            dict(mode="fsdp", ep=2),
            "train.parallel.ep=2: layers of kind 'lory' cannot shard their experts this way (they support etp)",
        ),
        (
            "topk",
            dict(mode="fsdp", etp=2),
            "train.parallel.etp=2: layers of kind 'topk' cannot shard their experts this way (they support ep)",
        ),
        ("expert_choice", dict(mode="fsdp", ep=2), "(they stay data parallel)"),
        ("dense", dict(mode="fsdp", etp=2), "train.parallel.etp=2: the model has no MoE layer"),
        ("lory", dict(mode="fsdp", etp=3), "train.parallel.etp=3: must divide the experts' d_ff=32"),
        ("lory", dict(mode="ddp", etp=2), "train.parallel.etp=2: needs mode=fsdp"),
        ("lory", dict(mode="fsdp", ep=2, etp=2), "train.parallel.etp=2: cannot combine with ep=2"),
        ("lory", dict(mode="zero3"), "train.parallel.mode='zero3': must be ddp or fsdp"),
        ("lory", dict(mode="fsdp", activation_checkpointing="all"), "train.parallel.activation_checkpointing='all'"),
        ("lory", dict(mode="fsdp", param_dtype="fp8"), "train.parallel.param_dtype='fp8'"),
        ("lory", dict(mode="ddp", param_dtype="bfloat16"), "train.parallel.param_dtype='bfloat16': is an FSDP"),
    ],
)
def test_invalid_layouts_name_the_field(ffn, fields, message):
    with pytest.raises(ConfigError) as err:
        run(ffn, **fields)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "fields, world, message",
    [
        (dict(mode="fsdp", dp_replicate=3), 4, "train.parallel.dp_replicate=3: must divide the world size 4"),
        (dict(mode="fsdp", dp_shard=3), 4, "dp_replicate x dp_shard = 3 must equal the world size 4"),
        (dict(mode="fsdp", etp=4, dp_replicate=2), 4, "train.parallel.etp=4: must divide dp_shard=2"),
    ],
)
def test_layouts_that_do_not_fit_the_world_name_the_field(fields, world, message):
    with pytest.raises(ConfigError, match="invalid config") as err:
        Layout.resolve(run(**fields).train.parallel, world)
    assert message in str(err.value)


def test_layout_resolves_the_leftover_ranks():
    layout = Layout.resolve(run("topk", 8, mode="fsdp", dp_replicate=2, ep=2).train.parallel, 8)
    assert (layout.dp_replicate, layout.dp_shard, layout.ep, layout.efsdp) == (2, 4, 2, 2)
    assert Layout.resolve(ParallelConfig(), 8) == Layout(8, "ddp", dp_replicate=8)


def test_global_batch_gives_micro_batches_and_accumulation():
    cfg = RunConfig(data=DataConfig(batch_size=256, micro_batch_size=8))
    assert [batch_split(cfg, n) for n in (1, 8, 32)] == [(8, 32), (8, 4), (8, 1)]
    with pytest.raises(
        ConfigError,
        match="data.micro_batch_size=8: the global batch data.batch_size=256 must be a "
        "multiple of micro_batch_size=8 x 64 ranks",
    ):
        batch_split(cfg, 64)
    assert batch_split(RunConfig(data=DataConfig(batch_size=12)), 4) == (3, 1)
    with pytest.raises(ConfigError, match="data.batch_size=12"):
        batch_split(RunConfig(data=DataConfig(batch_size=12)), 8)


def test_removed_grad_accum_says_what_replaced_it(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("train: {grad_accum: 4}\n")
    with pytest.raises(ConfigError, match="train.grad_accum=4: removed; data.batch_size is now the global batch"):
        load_config(str(path))


def test_parallel_fields_override_from_the_command_line(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model: {ffn: lory, d_ff: 32, moe: {num_experts: 4}}\n")
    cfg = load_config(
        str(path), ["train.parallel.mode=fsdp", "train.parallel.etp=2", "train.parallel.activation_checkpointing=block"]
    )
    assert (cfg.train.parallel.mode, cfg.train.parallel.etp, cfg.train.parallel.activation_checkpointing) == (
        "fsdp",
        2,
        "block",
    )
    assert cfg.train.parallel.dtypes(bf16=True) == ("bfloat16", "float32")
