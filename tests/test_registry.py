"""The registry of routing families: a family defined here (one class, one config, one register line)
is a first-class FFN kind: configs, YAML, validation, the decoder, training and routing metrics."""

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from diffmoe import Decoder
from diffmoe.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    MoEConfig,
    RunConfig,
    TrainConfig,
    load_config,
    save_config,
)
from diffmoe.moe import FAMILIES, Capabilities, Family, MoELayer, Routing, register
from diffmoe.moe.base import family_config
from diffmoe.moe.remote import RemoteMoE, dispatch_top
from diffmoe.schema import check
from diffmoe.train import train
from diffmoe.train.metrics import read_metrics

SRC = Path(__file__).resolve().parents[1] / "src" / "diffmoe"


# --- a whole routing family: the recipe of the README's "Adding a routing family" --------------------
@dataclass
class ToyConfig:
    temperature: float = 1.0

    def validate(self, num_experts=None):
        check(self.temperature > 0, "temperature", self.temperature, "must be positive")


class ToyMoE(MoELayer):
    """Top-1 token choice with a router temperature."""

    def __init__(self, d_model, d_ff, num_experts=4, config=None, **options):
        config = family_config(ToyConfig, config, options, num_experts)
        super().__init__(d_model, d_ff, num_experts)
        self.temperature = config.temperature

    @property
    def capabilities(self):
        return Capabilities(dense_gradients=False)

    def route(self, x, ctx):
        xf = x.reshape(-1, x.shape[-1])
        probs = (self.router(xf) / self.temperature).softmax(-1)
        gate, idx = probs.max(-1)
        return Routing(inputs=xf, probs=probs, token_idx=torch.arange(len(xf)), expert_idx=idx, gate=gate, chosen=idx)


class RemoteToy(RemoteMoE):
    """The eval-mode copy a custom-code export ships."""

    def forward(self, x, ctx):
        gate, idx = (self.logits(x.reshape(-1, x.shape[-1])) / self.opt["temperature"]).softmax(-1).max(-1)
        return dispatch_top(self, x, gate[:, None], idx[:, None], ctx["valid"].reshape(-1, 1))


@pytest.fixture
def toy():
    register(Family("toy", ToyMoE, ToyConfig, remote=RemoteToy))
    yield
    del FAMILIES["toy"]


def test_a_registered_family_is_a_kind_with_its_own_config(toy):
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=32, ffn=["toy", "dense"])
    cfg.moe.num_experts = 4
    cfg.moe.families["toy"].temperature = 0.5
    layer = Decoder(cfg).blocks[0].ffn
    assert isinstance(layer, ToyMoE) and layer.temperature == 0.5 and layer.num_experts == 4
    assert cfg.to_dict()["moe"]["toy"] == {"temperature": 0.5}
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"moe\.toy\.temperature=0"):
        ModelConfig.from_dict({"ffn": "toy", "moe": {"toy": {"temperature": 0}}})
    with pytest.raises(ConfigError, match=r"model\.moe\.toy\.temperature='hot': expected float"):
        ModelConfig.from_dict({"ffn": "toy", "moe": {"toy": {"temperature": "hot"}}})
    with pytest.raises(ConfigError, match=r"unknown field model\.moe\.toyy"):
        ModelConfig.from_dict({"moe": {"toyy": {}}})
    with pytest.raises(ConfigError, match="expert_choice, remoe, toy"):
        ModelConfig(ffn="switch")
    with pytest.raises(ValueError, match="already registered"):
        register(Family("toy", ToyMoE, ToyConfig, remote=RemoteToy))


def test_a_registered_family_computes_its_routing_through_the_shared_parts(toy):
    layer = ToyMoE(8, 12, 3, temperature=0.7)
    torch.nn.init.normal_(layer.router.weight, std=1.0)
    x = torch.randn(2, 5, 8)
    y = layer(x)
    xf = x.reshape(-1, 8)
    p = torch.softmax(layer.router(xf) / 0.7, -1)
    gate, idx = p.max(-1)
    ref = torch.stack([gate[n] * layer.experts.expert_forward(xf[n : n + 1], int(idx[n]))[0] for n in range(10)])
    torch.testing.assert_close(y.reshape(-1, 8), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.stats["load"], torch.bincount(idx, minlength=3).float() / 10)
    assert layer.aux_losses == {} and layer.aux_loss.item() == 0.0


def test_a_registered_family_trains_from_a_yaml_config(toy, tiny_dataset, tmp_path):
    model = ModelConfig(vocab_size=384, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64, ffn="toy")
    model.moe.num_experts = 4
    cfg = RunConfig(
        model=model,
        data=DataConfig(path=str(tiny_dataset), batch_size=4, eval_batches=1),
        train=TrainConfig(steps=3, lr=3e-3, log_every=1, routing_log_every=1, tensorboard=False),
    )
    save_config(cfg, str(tmp_path / "toy.yaml"))
    loaded = load_config(str(tmp_path / "toy.yaml"))
    assert loaded == cfg and loaded.model.moe.families["toy"] == ToyConfig()
    summary = train(loaded, tmp_path / "run", show_progress=False)
    assert summary["step"] == 3 and summary["heldout"]["all"]["tokens"] > 0
    routing = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "routing"]
    assert len(routing) == 3 and len(routing[-1]["layer1.load"]) == 4
    assert sum(routing[-1]["layer1.load"]) == pytest.approx(1.0, abs=1e-4)


def test_a_registered_family_exports_with_custom_code_and_is_benchmarked(toy, tmp_path):
    """Its remote class goes into the export's modeling file: transformers computes its logits; the layer
    benchmark builds it."""
    transformers = pytest.importorskip("transformers")
    from diffmoe.bench.layer_specs import Shape, layer_specs
    from diffmoe.hf.export import export_custom

    cfg = ModelConfig(
        vocab_size=50,
        d_model=16,
        n_layers=2,
        n_heads=2,
        d_ff=32,
        max_seq_len=32,
        ffn=["toy", "dense"],
        moe=MoEConfig(num_experts=4, families={"toy": ToyConfig(temperature=0.5)}),
    )
    torch.manual_seed(0)
    model = Decoder(cfg).eval()
    out = export_custom(model, tmp_path / "hf", 0, None)
    assert "class RemoteToy(RemoteMoE)" in (out / "modeling_diffmoe.py").read_text()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-5, atol=1e-5)
    shape = Shape(tokens=32, seq_len=16, d_model=16, d_ff=24, experts=4, segment_len=8)
    spec = next(s for s in layer_specs(shape, torch.device("cpu"), torch.float32, ()) if s.family == "toy")
    assert isinstance(spec.build(), ToyMoE) and spec.flop_factor == 1.0


def test_built_in_family_configs_validate_themselves():
    from diffmoe.moe import ExpertChoiceConfig, LoryConfig, SparseMixerConfig, TopKConfig

    cases = [
        (LoryConfig(segment_len=0), None, "segment_len"),
        (LoryConfig(routing="token"), None, "routing"),
        (TopKConfig(top_k=3), 2, "top_k"),
        (SparseMixerConfig(), 1, "num_experts"),
        (ExpertChoiceConfig(granularity="sequence"), None, "granularity"),
    ]
    for config, num_experts, field in cases:
        with pytest.raises(ConfigError) as err:
            config.validate(num_experts)
        assert err.value.field == field
    TopKConfig(top_k=3).validate(None)  # unused: the constraint against num_experts is not checked


def test_no_routing_family_is_named_outside_moe():
    """Generic code asks a layer (or its family's declaration) what it can do: the model, training,
    evaluation, parallelism and the transformers interop (hf/, the custom-code skeleton included) name no
    family."""
    names = [k for k in FAMILIES if k != "dense"] + [f.layer.__name__ for k, f in FAMILIES.items() if k != "dense"]
    names += ["lory", "sparsemixer", "grin", "expert choice"]
    pattern = re.compile(r"(?<![.\w])(" + "|".join(map(re.escape, names)) + r")(?!\w)", re.IGNORECASE)
    paths = [
        path for folder in ("model", "train", "eval", "parallel", "hf") for path in sorted((SRC / folder).rglob("*.py"))
    ]
    assert SRC / "train" / "metrics.py" in paths and SRC / "hf" / "remote" / "modeling_diffmoe.py" in paths
    found = []
    for path in paths:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
