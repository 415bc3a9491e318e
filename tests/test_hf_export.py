"""Native transformers export (diffmoe.hf.export): tiny random models load with AutoModelForCausalLM
(no remote code) and compute diffmoe's logits and greedy generations. Offline."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from hf_fixtures import harsh_init, load_hf  # noqa: E402

from diffmoe.config import ModelConfig  # noqa: E402
from diffmoe.eval.generate import generate  # noqa: E402
from diffmoe.hf.export import export_native, hf_config, native_arch  # noqa: E402
from diffmoe.model import Decoder  # noqa: E402
from diffmoe.moe import MoEConfig, TopKConfig  # noqa: E402

EOD = 5


def tiny(
    ffn="dense", tied=False, renormalize=True, capacity_factor=None, eval_capacity_factor=None, n_layers=3, seed=0
):
    moe = MoEConfig(
        num_experts=4,
        d_ff=24,
        families={
            "topk": TopKConfig(
                top_k=2,
                renormalize=renormalize,
                capacity_factor=capacity_factor,
                eval_capacity_factor=eval_capacity_factor,
            )
        },
    )
    cfg = ModelConfig(
        vocab_size=97,
        d_model=32,
        n_layers=n_layers,
        n_heads=4,
        n_kv_heads=2,
        d_ff=48,
        max_seq_len=64,
        rope_theta=5000.0,
        norm_eps=1e-6,
        tie_embeddings=tied,
        ffn=ffn,
        moe=moe,
        init_std=0.1,
    )
    torch.manual_seed(seed)
    return harsh_init(Decoder(cfg).eval())


CASES = {
    "dense-untied": (dict(ffn="dense"), "llama", "LlamaForCausalLM"),
    "dense-tied": (dict(ffn="dense", tied=True), "llama", "LlamaForCausalLM"),
    "topk-mixtral": (dict(ffn="topk"), "mixtral", "MixtralForCausalLM"),
    "topk-mixtral-tied": (dict(ffn="topk", tied=True), "mixtral", "MixtralForCausalLM"),
    # trained with a capacity, evaluated dropless: the dropless native class computes the eval mode
    "topk-capacity-mixtral": (dict(ffn="topk", capacity_factor=0.5), "mixtral", "MixtralForCausalLM"),
    "topk-mixed-qwen": (dict(ffn=["topk", "dense", "topk"], renormalize=False), "qwen2_moe", "Qwen2MoeForCausalLM"),
    "topk-raw-qwen": (dict(ffn="topk", renormalize=False), "qwen2_moe", "Qwen2MoeForCausalLM"),
    "topk-mixed-renorm-qwen": (dict(ffn=["dense", "topk", "topk"]), "qwen2_moe", "Qwen2MoeForCausalLM"),
}


@pytest.fixture(params=list(CASES), scope="module")
def exported(request, tmp_path_factory):
    kwargs, arch, cls = CASES[request.param]
    model = tiny(**kwargs)
    assert native_arch(model.cfg) == arch
    out = export_native(model, tmp_path_factory.mktemp(request.param) / "hf", EOD, None)
    return request.param, model, load_hf(out), cls, out


def test_logits_match(exported):
    name, model, hf, cls, out = exported
    assert type(hf).__name__ == cls
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits.float()
    diff = (ours - theirs).abs().max().item()
    print(f"{name} {cls} max|dlogit| = {diff:.3g} (max|logit| {ours.abs().max().item():.3g})")
    assert diff <= 1e-5, diff
    files = sorted(p.name for p in out.iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors"]
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temp dir left


def test_greedy_generate_matches(exported):
    name, model, hf, cls, _ = exported
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(6, 97, (1, n), generator=g) for n in (7, 4)]
    singles = []
    for p in prompts:
        ours = generate(model, p, 8)
        theirs = hf.generate(
            p, attention_mask=torch.ones_like(p), do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=EOD
        )
        assert torch.equal(ours, theirs), (ours, theirs)
        singles.append(ours[0, p.shape[1] :])
    # a left-padded batch of both prompts gives each row its single-prompt generation
    L = max(p.shape[1] for p in prompts)
    batch = torch.full((2, L), EOD)
    mask = torch.zeros(2, L, dtype=torch.long)
    for r, p in enumerate(prompts):
        batch[r, L - p.shape[1] :] = p[0]
        mask[r, L - p.shape[1] :] = 1
    theirs = hf.generate(
        batch, attention_mask=mask, do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=EOD
    )
    for r in range(2):
        assert torch.equal(theirs[r, L:], singles[r]), (r, theirs[r, L:], singles[r])


def test_config_fields():
    cfg = tiny(ffn=["topk", "dense", "topk"], renormalize=False).cfg
    c = hf_config(cfg, "qwen2_moe", EOD)
    assert c["mlp_only_layers"] == [1] and c["norm_topk_prob"] is False and c["num_experts"] == 4
    assert c["moe_intermediate_size"] == 24 and c["intermediate_size"] == 48
    assert c["shared_expert_intermediate_size"] == 0 and c["qkv_bias"] is False
    assert c["rope_parameters"] == {"rope_type": "default", "rope_theta": 5000.0} and c["rope_theta"] == 5000.0
    assert c["bos_token_id"] == c["eos_token_id"] == c["pad_token_id"] == EOD
    assert c["head_dim"] == 8 and c["num_key_value_heads"] == 2 and c["rms_norm_eps"] == 1e-6
    m = hf_config(tiny(ffn="topk").cfg, "mixtral", EOD)
    assert m["num_local_experts"] == 4 and m["num_experts_per_tok"] == 2 and m["intermediate_size"] == 24
    assert m["router_aux_loss_coef"] == pytest.approx(0.01 / 2) and m["router_jitter_noise"] == 0
    assert hf_config(tiny().cfg, "llama", EOD)["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(ffn="topk", capacity_factor=1.25, eval_capacity_factor=1.25), "eval_capacity_factor"),
        (dict(ffn="lory"), "lory"),
        (dict(ffn="expert_choice"), "expert_choice"),
        (dict(ffn=["sparsemixer", "dense", "sparsemixer"]), "sparsemixer"),  # all-sparsemixer: phimoe
        (dict(ffn=["dense", "lory", "topk"]), "lory"),
    ],
)
def test_unsupported_raise(kwargs, reason, tmp_path):
    model = tiny(n_layers=3, **kwargs)
    assert native_arch(model.cfg) is None
    with pytest.raises(ValueError, match=reason):
        export_native(model, tmp_path / "hf", EOD, None)
    assert not (tmp_path / "hf").exists()
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_export(tiny_dataset, tmp_path):
    from transformers import AutoTokenizer

    from diffmoe.data.store import read_manifest
    from diffmoe.data.tokenizer import load_tokenizer

    manifest = read_manifest(tiny_dataset)
    eod, size = manifest["tokenizer"]["eod_id"], manifest["tokenizer"]["vocab_size"]
    ours = load_tokenizer(tiny_dataset)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64)
    out = export_native(Decoder(cfg), tmp_path / "hf", eod, tiny_dataset)
    conf = json.loads((out / "tokenizer_config.json").read_text())
    assert conf["tokenizer_class"] == "PreTrainedTokenizerFast"
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token_id == tok.pad_token_id == tok.bos_token_id == eod
    for text in ["The quick brown fox jumps over the lazy dog.", "  spaces\tand\nnewlines 12345 é ü", "prose doc000 ."]:
        assert tok(text)["input_ids"] == ours.encode(text).ids, text
        assert tok.decode(tok(text)["input_ids"]) == text
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == gen["pad_token_id"] == eod


def test_qwen_norm_topk_prob_matters(tmp_path):
    """The logit test is sensitive to routing: flipping norm_topk_prob in the export breaks equality."""
    model = tiny(ffn=["topk", "dense", "topk"], renormalize=False)
    out = export_native(model, tmp_path / "hf", EOD, None)
    conf = json.loads((out / "config.json").read_text())
    conf["norm_topk_prob"] = True
    (out / "config.json").write_text(json.dumps(conf))
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids) - load_hf(out)(ids).logits).abs().max() > 1e-3


def test_export_run(tiny_dataset, tmp_path):
    from diffmoe.config import DataConfig, RunConfig, save_config
    from diffmoe.data.store import read_manifest
    from diffmoe.hf.export import export_run
    from diffmoe.train.checkpoint import save_checkpoint

    manifest = read_manifest(tiny_dataset)
    eod, size = manifest["tokenizer"]["eod_id"], manifest["tokenizer"]["vocab_size"]
    cfg = ModelConfig(
        vocab_size=size,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=48,
        max_seq_len=64,
        ffn="topk",
        moe=MoEConfig(num_experts=4),
    )
    run = tmp_path / "run"
    run.mkdir()
    save_config(RunConfig(model=cfg, data=DataConfig(path=str(tiny_dataset))), str(run / "config.yaml"))
    torch.manual_seed(0)
    model = Decoder(cfg)
    save_checkpoint(run, 3, model, torch.optim.AdamW(model.parameters()), {}, keep=1)
    out = export_run(run, tmp_path / "hf")
    assert out == tmp_path / "hf"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == eod
    hf = load_hf(out)
    assert type(hf).__name__ == "MixtralForCausalLM"
    ids = torch.randint(0, size, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model.eval()(ids) - hf(ids).logits).abs().max() <= 1e-5
