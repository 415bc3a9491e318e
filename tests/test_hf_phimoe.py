"""SparseMixer-v2 models exported natively to transformers' PhimoeForCausalLM through the widened residual
stream (diffmoe.hf.phimoe): they load without remote code and compute diffmoe's eval logits and greedy
generations (fp32, offline, transformers >= 5)."""

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
from diffmoe.hf.export import export_native, native_arch  # noqa: E402
from diffmoe.hf.phimoe import basis, padded_ff, widened_width  # noqa: E402
from diffmoe.model import Decoder  # noqa: E402
from diffmoe.moe import MoEConfig  # noqa: E402
from diffmoe.moe.sparsemixer import SparseMixerConfig  # noqa: E402

pytestmark = pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5, reason="the widened PhiMoE export needs transformers >= 5"
)

EOD, V = 5, 97


def tiny(tied=False, jitter_eps=0.3, d_model=32, n_heads=4, expert_ff=24, seed=0):
    moe = MoEConfig(num_experts=4, d_ff=expert_ff, families={"sparsemixer": SparseMixerConfig(jitter_eps=jitter_eps)})
    cfg = ModelConfig(
        vocab_size=V,
        d_model=d_model,
        n_layers=3,
        n_heads=n_heads,
        n_kv_heads=2,
        d_ff=48,
        max_seq_len=64,
        rope_theta=5000.0,
        norm_eps=1e-6,
        tie_embeddings=tied,
        ffn="sparsemixer",
        moe=moe,
        init_std=0.1,
    )
    torch.manual_seed(seed)
    return harsh_init(Decoder(cfg).eval())


CASES = {
    "untied": dict(),
    "tied": dict(tied=True),
    "narrow-band": dict(jitter_eps=0.01),
    "odd-widths": dict(d_model=36, n_heads=6, expert_ff=22),  # D = 40, head_dim 6, f padded 22 -> 24
}


@pytest.fixture(params=list(CASES), scope="module")
def exported(request, tmp_path_factory):
    model = tiny(**CASES[request.param])
    assert native_arch(model.cfg) == "phimoe"
    out = export_native(model, tmp_path_factory.mktemp(request.param) / "hf", EOD, None)
    hf = load_hf(out)
    hf.generation_config.eos_token_id = None  # diffmoe's generate never stops
    return request.param, model, hf, out


def test_basis_properties():
    for d in (8, 31, 32, 36, 64):
        D = widened_width(d)
        assert D > d and D % 8 == 0 and D - d <= 8
        q = basis(d)
        assert q.shape == (D, d) and q.dtype == torch.float64
        torch.testing.assert_close(q.T @ q, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-12)
        assert (torch.ones(D, dtype=torch.float64) @ q).abs().max() <= 1e-12
        assert torch.equal(q, basis(d))  # deterministic
    with pytest.raises(ValueError):
        basis(8, 8)
    assert [padded_ff(f) for f in (8, 22, 24, 25)] == [8, 24, 24, 32]


def test_config(exported):
    name, model, hf, out = exported
    cfg = model.cfg
    conf = json.loads((out / "config.json").read_text())
    D = widened_width(cfg.d_model)
    assert conf["model_type"] == "phimoe" and conf["architectures"] == ["PhimoeForCausalLM"]
    assert conf["hidden_size"] == D and conf["head_dim"] == cfg.head_dim
    assert conf["rms_norm_eps"] == pytest.approx(cfg.norm_eps * cfg.d_model / D)
    assert conf["tie_word_embeddings"] is False and conf["lm_head_bias"] is False
    assert conf["attention_bias"] is False and conf["sliding_window"] is None
    assert conf["router_jitter_noise"] == cfg.moe.families["sparsemixer"].jitter_eps and conf["input_jitter_noise"] == 0
    assert conf["num_local_experts"] == 4 and conf["num_experts_per_tok"] == 2
    assert conf["rope_parameters"] == {"rope_type": "default", "rope_theta": 5000.0}
    assert "transformers >= 5" in conf["note"]
    assert type(hf).__name__ == "PhimoeForCausalLM"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_logits_match(exported):
    name, model, hf, _ = exported
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits.float()
    diff = (ours - theirs).abs().max().item()
    print(f"phimoe {name}: max|dlogit| = {diff:.3g} (max|logit| {ours.abs().max().item():.3g})")
    assert diff <= 1e-5, diff


def test_band_holds_several_experts():
    """The test models really exercise the SparseMixer band (several experts in a slot's band)."""
    model = tiny()
    with torch.no_grad():
        model(torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(1)))
    assert any(ffn.stats["band_multi"][0] > 0 for ffn in model.ffns())


def test_jitter_eps_matters(tmp_path):
    """The logit test is sensitive to routing: a different band width in the config breaks equality."""
    model = tiny()
    out = export_native(model, tmp_path / "hf", EOD, None)
    conf = json.loads((out / "config.json").read_text())
    conf["router_jitter_noise"] = 0.0
    (out / "config.json").write_text(json.dumps(conf))
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids) - load_hf(out)(ids).logits).abs().max() > 1e-3


def test_greedy_generate_matches(exported):
    name, model, hf, _ = exported
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(6, V, (1, n), generator=g) for n in (7, 4)]
    singles = []
    for p in prompts:
        ours = generate(model, p, 8)
        theirs = hf.generate(p, attention_mask=torch.ones_like(p), do_sample=False, max_new_tokens=8, pad_token_id=EOD)
        assert torch.equal(ours, theirs), (ours, theirs)
        singles.append(ours[0, p.shape[1] :])
    L = max(p.shape[1] for p in prompts)  # a left-padded batch: each row as alone
    batch = torch.full((2, L), EOD)
    mask = torch.zeros(2, L, dtype=torch.long)
    for r, p in enumerate(prompts):
        batch[r, L - p.shape[1] :] = p[0]
        mask[r, L - p.shape[1] :] = 1
    theirs = hf.generate(batch, attention_mask=mask, do_sample=False, max_new_tokens=8, pad_token_id=EOD)
    for r in range(2):
        assert torch.equal(theirs[r, L:], singles[r]), (r, theirs[r, L:], singles[r])


@pytest.mark.parametrize("ffn", [["sparsemixer", "dense", "sparsemixer"], ["sparsemixer", "topk", "sparsemixer"]])
def test_sparsemixer_mixed_with_other_kinds_is_not_native(ffn, tmp_path):
    moe = MoEConfig(num_experts=4, d_ff=24)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=3, n_heads=4, d_ff=48, max_seq_len=64, ffn=ffn, moe=moe)
    model = Decoder(cfg)
    assert native_arch(cfg) is None
    with pytest.raises(ValueError, match="sparsemixer mixed"):
        export_native(model, tmp_path / "hf", EOD, None)
    assert not (tmp_path / "hf").exists()


def test_export_run_trained_sparsemixer_auto_is_phimoe_custom_on_request(tiny_dataset, tmp_path):
    """A trained all-SparseMixer run: ``diffmoe export`` (auto) writes PhiMoE with the tokenizer;
    ``--format custom`` still writes the custom-code export. Both compute the run's logits."""
    from test_train import run_config
    from transformers import AutoTokenizer

    from diffmoe.cli import main
    from diffmoe.runs import load_run
    from diffmoe.train import train

    train(run_config(tiny_dataset, "sparsemixer", steps=2), tmp_path / "run", show_progress=False)
    _, model, _ = load_run(tmp_path / "run")
    model.eval()
    assert main(["export", str(tmp_path / "run"), "--hf", str(tmp_path / "hf")]) == 0
    out = tmp_path / "hf"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    hf, tok = load_hf(out), AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == "PhimoeForCausalLM"
    x = torch.tensor([tok("In the beginning was the word")["input_ids"]])
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= 1e-5
    hf.generation_config.eos_token_id = None
    assert torch.equal(
        hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=6), generate(model, x, 6)
    )
    assert main(["export", str(tmp_path / "run"), "--hf", str(tmp_path / "custom"), "--format", "custom"]) == 0
    assert json.loads((tmp_path / "custom" / "config.json").read_text())["model_type"] == "diffmoe"
