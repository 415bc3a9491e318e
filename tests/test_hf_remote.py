"""Custom-code transformers export (diffmoe.hf.export.export_custom): tiny random models of every FFN
kind load with AutoModelForCausalLM(trust_remote_code=True) and compute diffmoe's eval logits and, where
diffmoe can decode, its greedy generations (Lory: prompt routing). Offline."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from hf_fixtures import harsh_init  # noqa: E402

from diffmoe.config import ModelConfig  # noqa: E402
from diffmoe.eval.generate import generate  # noqa: E402
from diffmoe.hf.export import export_custom  # noqa: E402
from diffmoe.model import Decoder  # noqa: E402
from diffmoe.moe import ExpertChoiceConfig, LoryConfig, MoEConfig, TopKConfig  # noqa: E402

EOD = 5
V = 97


def tiny(ffn, tied=False, seed=0, **moe_options):
    families = dict(
        lory=LoryConfig(segment_len=6),
        topk=TopKConfig(top_k=2, capacity_factor=1.0, eval_capacity_factor=1.0),
        expert_choice=ExpertChoiceConfig(capacity_factor=1.5),
    )
    moe = MoEConfig(num_experts=4, d_ff=24, families={**families, **moe_options})
    cfg = ModelConfig(
        vocab_size=V,
        d_model=32,
        n_layers=3,
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
    "dense": dict(ffn="dense"),
    "lory": dict(ffn=["lory", "dense", "lory"]),
    "lory-tied-own-mean": dict(ffn="lory", tied=True, lory=LoryConfig(segment_len=5, first_segment="own_mean")),
    "topk-capacity": dict(ffn="topk"),  # a capacity in evaluation too
    "topk-capacity-trained": dict(ffn="topk", topk=TopKConfig(top_k=2, capacity_factor=0.5)),  # dropless eval
    "sparsemixer": dict(ffn=["sparsemixer", "dense", "sparsemixer"]),
    "expert_choice": dict(ffn="expert_choice", tied=True),
    "expert_choice-segment": dict(
        ffn="expert_choice", expert_choice=ExpertChoiceConfig(granularity="segment", segment_len=4)
    ),
    "mixed": dict(ffn=["lory", "topk", "sparsemixer"], topk=TopKConfig(top_k=2, renormalize=False)),
    "remoe": dict(ffn=["remoe", "dense", "remoe"]),
}


def load_hf(path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=True, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.fixture(params=list(CASES), scope="module")
def exported(request, tmp_path_factory):
    model = tiny(**CASES[request.param])
    out = export_custom(model, tmp_path_factory.mktemp(request.param) / "hf", EOD, None)
    return request.param, model, load_hf(out), out


def hf_generate(hf, prompt, n, attention_mask=None, **kwargs):
    """Greedy, exactly n new tokens, no stop at the end-of-document id (diffmoe's generate never stops)."""
    hf.generation_config.eos_token_id = None
    mask = torch.ones_like(prompt) if attention_mask is None else attention_mask
    return hf.generate(prompt, attention_mask=mask, max_new_tokens=n, do_sample=False, **kwargs)


def ids(batch=2, length=20, seed=1):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_match(exported):
    name, model, hf, out = exported
    assert type(hf).__name__ == "DiffMoEForCausalLM"
    x = ids()
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
        masked = hf(x, attention_mask=torch.ones_like(x)).logits
    diff = (ours - theirs).abs().max().item()
    print(f"{name} max|dlogit| = {diff:.3g} (max|logit| {ours.abs().max().item():.3g})")
    assert diff <= 1e-5, diff
    assert (masked - theirs).abs().max().item() <= 1e-5
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "config.json",
        "configuration_diffmoe.py",
        "generation_config.json",
        "model.safetensors",
        "modeling_diffmoe.py",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "diffmoe" and config["diffmoe"] == model.cfg.to_dict()
    assert config["auto_map"] == {
        "AutoConfig": "configuration_diffmoe.DiffMoEConfig",
        "AutoModelForCausalLM": "modeling_diffmoe.DiffMoEForCausalLM",
    }
    assert ("note" in config) == ("expert_choice" in model.cfg.kinds)


def test_needs_trust_remote_code(exported):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError):
        AutoModelForCausalLM.from_pretrained(exported[3], trust_remote_code=False)


def test_remote_files_import_only_torch_and_transformers(exported):
    """The shipped files (the assembled modeling file: skeleton, shared blocks, each family's class)."""
    from diffmoe.hf.export import REMOTE_FILES

    for name in REMOTE_FILES:
        text = (exported[3] / name).read_text()
        imports = {line.split()[1].split(".")[0] for line in text.splitlines() if line.startswith(("import ", "from "))}
        assert imports <= {"math", "torch", "transformers", ""}, (name, imports)


def test_export_assembles_the_families_in_use_and_refuses_one_without_export_code(tmp_path):
    from dataclasses import replace

    from diffmoe.hf.export import configuration_source, modeling_source
    from diffmoe.moe import FAMILIES

    mixed = tiny(**CASES["mixed"]).cfg
    text = modeling_source(mixed)
    assert "FFN_CLASSES = {'lory': RemoteLory, 'topk': RemoteTopK, 'sparsemixer': RemoteSparseMixer}" in text
    assert "class RemoteExpertChoice" not in text and "class RemoteLory" in text
    dense = modeling_source(tiny(ffn="dense").cfg)
    assert configuration_source(text) != configuration_source(dense)  # one config class per modeling code
    saved = FAMILIES["topk"]
    FAMILIES["topk"] = replace(saved, remote=None)
    try:
        with pytest.raises(ValueError, match=r"FFN kind\(s\) topk declare no export class"):
            export_custom(tiny(ffn="topk"), tmp_path / "hf", EOD, None)
    finally:
        FAMILIES["topk"] = saved
    assert not (tmp_path / "hf").exists()


GENERATES = ["dense", "lory", "lory-tied-own-mean", "topk-capacity-trained", "sparsemixer", "mixed", "remoe"]


@pytest.mark.parametrize("name", GENERATES)
def test_greedy_generate_matches_diffmoe(name, tmp_path):
    model = tiny(**CASES[name])
    hf = load_hf(export_custom(model, tmp_path / "hf", EOD, None))
    prompt = ids(2, 9, seed=3)
    want = generate(model, prompt, 8)  # prompt routing for Lory
    got = hf_generate(hf, prompt, 8)
    assert torch.equal(got, want), (got, want)


@pytest.mark.parametrize("name", ["dense", "lory"])
def test_left_padded_batch_equals_each_row_alone(name, tmp_path):
    model = tiny(**CASES[name])
    hf = load_hf(export_custom(model, tmp_path / "hf", EOD, None))
    rows = [ids(1, 9, seed=4)[0], ids(1, 5, seed=5)[0]]
    batch = torch.full((2, 9), EOD)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, 9 - len(row) :], mask[i, 9 - len(row) :] = row, 1
    got = hf_generate(hf, batch, 6, mask)
    for i, row in enumerate(rows):
        alone = generate(model, row[None], 6)[0]
        assert torch.equal(got[i, 9 - len(row) :], alone), (i, got[i], alone)


def test_lory_generate_without_cache_is_refused(tmp_path):
    hf = load_hf(export_custom(tiny(**CASES["lory"]), tmp_path / "hf", EOD, None))
    with pytest.raises(ValueError, match="use_cache=False"):
        hf.generate(ids(1, 6), max_new_tokens=2, use_cache=False)


@pytest.mark.parametrize("name", ["expert_choice", "topk-capacity"])
def test_generate_is_refused_where_decoding_is_not_causal(name, tmp_path):
    model = tiny(**CASES[name])
    hf = load_hf(export_custom(model, tmp_path / "hf", EOD, None))
    with pytest.raises(ValueError, match="token by token"):
        hf.generate(ids(1, 6), max_new_tokens=2)
    with pytest.raises(ValueError):  # and so is diffmoe's
        generate(model, ids(1, 6), 2)
    prompt = ids(2, 6)
    got = hf_generate(hf, prompt, 3, use_cache=False)  # full recompute at every step: the forward's semantics
    seq = prompt
    for _ in range(3):
        with torch.no_grad():
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, seq)


@pytest.mark.parametrize("name", ["expert_choice", "topk-capacity"])
def test_batch_selection_excludes_padding(name, tmp_path):
    """A left-padded row scores as that row alone: padding is never a candidate and does not count
    towards the capacity."""
    model = tiny(**CASES[name])
    hf = load_hf(export_custom(model, tmp_path / "hf", EOD, None))
    row = ids(1, 12, seed=6)
    padded = torch.cat([torch.full((1, 5), EOD), row], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], 1)
    with torch.no_grad():
        want, got = model(row), hf(padded, attention_mask=mask).logits[:, 5:]
        unmasked = hf(padded).logits[:, 5:]  # the padding as candidates: another selection
    assert (want - got).abs().max().item() <= 1e-5
    assert (want - unmasked).abs().max().item() > 1e-3


def test_export_run_picks_custom_for_lory_and_ships_the_tokenizer(tiny_dataset, tmp_path):
    from test_train import run_config
    from transformers import AutoTokenizer

    from diffmoe.cli import main
    from diffmoe.hf.export import export_run
    from diffmoe.runs import load_run
    from diffmoe.train import train

    train(run_config(tiny_dataset, "lory", steps=1), tmp_path / "run", show_progress=False)
    with pytest.raises(ValueError, match="cannot export natively"):
        export_run(tmp_path / "run", tmp_path / "native", format="native")
    with pytest.raises(ValueError, match="unknown export format"):
        export_run(tmp_path / "run", tmp_path / "x", format="onnx")
    assert main(["export", str(tmp_path / "run"), "--hf", str(tmp_path / "hf"), "--format", "auto"]) == 0
    out = tmp_path / "hf"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "configuration_diffmoe.py",
        "generation_config.json",
        "model.safetensors",
        "modeling_diffmoe.py",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    _, model, _ = load_run(tmp_path / "run")
    hf, tok = load_hf(out), AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    x = torch.tensor([tok("In the beginning")["input_ids"]])
    with torch.no_grad():
        assert (model.eval()(x) - hf(x).logits).abs().max().item() <= 1e-5
    assert torch.equal(hf_generate(hf, x, 6), generate(model, x, 6))
