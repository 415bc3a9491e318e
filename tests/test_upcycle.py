"""train.init_from: continued pre-training and sparse upcycling. A dense source (a transformers Llama
imported with ``diffmoe import``, or a diffmoe run) starts a Lory, top-k or mixed model whose output is
the source's at step 0; a run started from it logs the source's loss as its first loss; sources that do
not fit are errors naming train.init_from."""

import os

import pytest
import torch
from test_train import losses, run_config

from diffmoe.config import ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig
from diffmoe.data.dataset import PackedDataset
from diffmoe.data.loader import BatchStream
from diffmoe.runs import load_run
from diffmoe.train import train
from diffmoe.train.init import initial_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def llama_import(tmp_path):
    transformers = pytest.importorskip("transformers")
    from diffmoe.hf.importer import import_hf

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_theta=5000.0,
    )
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "llama")
    return import_hf(tmp_path / "llama", tmp_path / "imported")


@pytest.mark.parametrize("ffn", ["lory", "topk", ["lory", "dense", "topk"]])
def test_a_dense_import_upcycles_with_unchanged_logits(tmp_path, ffn):
    source = llama_import(tmp_path)
    src_cfg, src, _ = load_run(source)
    model = ModelConfig.from_dict(
        {**src_cfg.model.to_dict(), "ffn": ffn, "moe": {"num_experts": 4, "lory": {"segment_len": 8}}}
    )
    cfg = RunConfig(model=model, train=TrainConfig(init_from=str(source)))
    torch.manual_seed(0)
    upcycled = initial_model(cfg, dense=False).eval()
    ids = torch.randint(0, 96, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(upcycled(ids), src(ids), rtol=0, atol=1e-5)


def test_a_run_started_from_a_run_logs_the_source_loss_first(tiny_dataset, tmp_path):
    train(run_config(tiny_dataset, "dense", steps=3), tmp_path / "dense", show_progress=False)
    cfg = run_config(tiny_dataset, "lory", steps=2)
    cfg.train.init_from = str(tmp_path / "dense")
    train(cfg, tmp_path / "lory", show_progress=False)
    _, src, _ = load_run(tmp_path / "dense")
    ids, labels = BatchStream(PackedDataset(tiny_dataset, "train"), 4, cfg.train.seed).batch(0)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(src(ids).flatten(0, 1), labels.flatten()).item()
    assert losses(tmp_path / "lory")[0] == pytest.approx(expected, rel=1e-5)


def test_sources_that_do_not_fit_name_the_field(tiny_dataset, tmp_path):
    train(run_config(tiny_dataset, "topk", steps=1), tmp_path / "topk", show_progress=False)
    base = run_config(tiny_dataset, "lory", steps=1)
    cases = [
        (tmp_path / "nowhere", "not a run directory"),
        (tmp_path / "topk", "its FFN kinds ['topk'] differ from the run's ['lory']"),
    ]
    for path, message in cases:
        base.train.init_from = str(path)
        with pytest.raises(ConfigError, match="train.init_from=") as err:
            initial_model(base, dense=False)
        assert message in str(err.value)
    wide = RunConfig(
        model=ModelConfig.from_dict({**base.model.to_dict(), "d_model": 64, "ffn": "topk"}),
        data=DataConfig(path=str(tiny_dataset)),
        train=TrainConfig(init_from=str(tmp_path / "topk")),
    )
    with pytest.raises(ConfigError, match="embed.weight has shape"):
        initial_model(wide, dense=False)
