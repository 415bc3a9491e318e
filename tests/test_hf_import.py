"""Importing transformers checkpoints (llama, mixtral, qwen2_moe): tiny random models built from configs,
saved three ways (legacy per-expert layout, 5.x fused layout, sharded with an index), imported, and
compared logit for logit with transformers in float32. No hub access."""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from diffmoe.hf.importer import import_hf, read_hf_config, read_hf_weights  # noqa: E402
from diffmoe.runs import load_run  # noqa: E402

COMMON = dict(
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


def hf_model(arch: str, **extra):
    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**COMMON, **extra)
    elif arch == "mixtral":
        cfg = transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, **extra)
    else:  # layer 1 dense: mixed dense / MoE; an empty (zero-size) shared expert, which 5.x builds fine
        cfg = transformers.Qwen2MoeConfig(
            **COMMON,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=0,
            mlp_only_layers=[1],
            qkv_bias=False,
            norm_topk_prob=extra.pop("norm_topk_prob", False),
            **extra,
        )
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # random norm gains, so a mixed-up norm cannot pass
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.uniform_(0.5, 1.5)
    return model


LAYOUTS = {"legacy": {}, "fused": {"save_original_format": False}, "sharded": {"max_shard_size": "20KB"}}


def save(model, path, layout):
    model.save_pretrained(path, **LAYOUTS[layout])
    return path


def max_logit_diff(model, run_dir):
    _, ours, _ = load_run(run_dir)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (ours(ids) - model(ids).logits.float()).abs().max().item()


@pytest.mark.parametrize(
    "arch,extra",
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True}),
        ("mixtral", {}),
        ("qwen2_moe", {}),
        ("qwen2_moe", {"norm_topk_prob": True}),
    ],
)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_import_matches_transformers(tmp_path, arch, extra, layout):
    model = hf_model(arch, **extra)
    hf_dir = save(model, tmp_path / "hf", layout)
    if layout == "sharded":
        assert (hf_dir / "model.safetensors.index.json").is_file()
    (hf_dir / "tokenizer.json").write_text("{}")
    out = import_hf(hf_dir, tmp_path / "run", data_dir="somewhere")
    diff = max_logit_diff(model, out)
    print(f"{arch} {extra} {layout}: max |dlogit| = {diff:.2e}")
    assert diff <= 1e-5
    assert (out / "tokenizer.json").is_file()
    cfg, _, path = load_run(out)
    assert cfg.data.path == "somewhere" and path.name == "step-00000000"
    assert json.loads((path / "trainer.json").read_text())["layout"] == "imported"


def test_config_fields(tmp_path):
    _, cfg = read_hf_config(save(hf_model("qwen2_moe", norm_topk_prob=True), tmp_path / "q", "legacy"))
    assert cfg.ffn == ["topk", "dense", "topk"] and cfg.moe.families["topk"].renormalize and cfg.moe.d_ff == 24
    assert (cfg.n_kv_heads, cfg.rope_theta, cfg.norm_eps, cfg.max_seq_len) == (2, 5000.0, 1e-6, 64)
    _, cfg = read_hf_config(save(hf_model("mixtral", router_aux_loss_coef=0.02), tmp_path / "m", "legacy"))
    assert cfg.ffn == "topk" and cfg.moe.num_experts == 4 and cfg.moe.families["topk"].top_k == 2
    assert cfg.moe.families["topk"].capacity_factor is None and cfg.moe.balance_coef == pytest.approx(0.04)


REFUSED = [  # (arch, config.json edits, field named in the message)
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("qwen2_moe", {"qkv_bias": True}, "qkv_bias"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0}}, "rope_type"),
    ("llama", {"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_type"),
    ("llama", {"head_dim": 16}, "head_dim"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("mixtral", {"sliding_window": 16}, "sliding_window"),
    ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window"),
    ("qwen2_moe", {"shared_expert_intermediate_size": 8}, "shared_expert_intermediate_size"),
    ("llama", {"model_type": "phimoe"}, "model_type"),
    ("llama", {"model_type": "olmoe"}, "model_type"),
    ("llama", {"use_qk_norm": True}, "use_qk_norm"),
]


@pytest.mark.parametrize("arch,edits,field", REFUSED, ids=[f"{a}-{f}" for a, _, f in REFUSED])
def test_refuses_what_diffmoe_cannot_represent(tmp_path, arch, edits, field):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    config = hf_model(arch).config.to_dict()
    (hf_dir / "config.json").write_text(json.dumps({**config, **edits}))
    with pytest.raises(ValueError, match=field) as err:
        read_hf_config(hf_dir)
    assert "\n" not in str(err.value)


def test_refuses_pickle_and_leftover_tensors(tmp_path):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="safetensors"):
        read_hf_weights(hf_dir)
    model = hf_model("llama")
    with torch.no_grad():  # a bias the config does not mention: an unexpected tensor
        model.model.layers[0].self_attn.q_proj.bias = torch.nn.Parameter(torch.zeros(32))
    save(model, tmp_path / "biased", "legacy")
    with pytest.raises(ValueError, match="q_proj.bias"):
        import_hf(tmp_path / "biased", tmp_path / "run")
