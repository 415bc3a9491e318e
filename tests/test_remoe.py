"""ReMoE (ReLU routing with an adaptive L1 penalty, arXiv 2412.14711) against the paper's equations, and as
a registered family through training (the once-per-step coefficient update, resume), generation, the
custom-code export and the layer benchmark."""

import json
import shutil

import pytest
import torch
from test_train import losses, run_config

from diffmoe.moe.remoe import ReMoE, ReMoEConfig
from diffmoe.runs import load_run
from diffmoe.train import train
from diffmoe.train.checkpoint import latest_checkpoint, list_checkpoints
from diffmoe.train.metrics import read_metrics

D, FF, E = 8, 12, 4


def layer(seed=0, **options):
    torch.manual_seed(seed)
    m = ReMoE(D, FF, E, **options)
    torch.nn.init.normal_(m.router.weight, std=0.5)  # about half the gates positive
    return m


def test_output_is_the_relu_gated_sum_of_experts_and_the_router_learns_from_it():
    """y = sum_e ReLU(x W_r)_e expert_e(x), with the router's gradient that of that dense formula."""
    m = layer().double()
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    y = m(x)
    xf = x.reshape(-1, D)
    gates = torch.relu(xf @ m.router.weight.t())  # [N, E]
    experts = torch.stack([m.experts.expert_forward(xf, e) for e in range(E)], 1)  # [N, E, d]
    ref = (gates.unsqueeze(-1) * experts).sum(1)
    assert 0 < int((gates > 0).sum()) < gates.numel()
    torch.testing.assert_close(y.reshape(-1, D), ref)
    g = torch.randn_like(ref)
    ours = torch.autograd.grad((y.reshape(-1, D) * g).sum(), [m.router.weight, x])
    theirs = torch.autograd.grad((ref * g).sum(), [m.router.weight, x])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    assert ours[0].abs().sum() > 0


@pytest.mark.parametrize("load_balance", [True, False])
def test_l1_penalty_is_the_papers(load_balance):
    """Eq. 8: E / (k T^2) sum_e c_e sum_t R_te (c_e: tokens with R_te > 0); Eq. 6: (1/T) sum_t ||R_t||_1."""
    m = layer(top_k=2, load_balance=load_balance, l1_coef_init=0.5)
    x = torch.randn(3, 4, D)
    m(x)
    R = torch.relu(x.reshape(-1, D) @ m.router.weight.t())
    T = R.shape[0]
    if load_balance:
        expected = sum(E / (2 * T * T) * int((R[:, e] > 0).sum()) * R[:, e].sum() for e in range(E))
    else:
        expected = sum(R[t].abs().sum() for t in range(T)) / T
    torch.testing.assert_close(m.aux_losses["l1"], torch.as_tensor(expected, dtype=torch.float32))
    torch.testing.assert_close(m.aux_loss, 0.5 * m.aux_losses["l1"])
    assert m.stats["sparsity"].item() == pytest.approx(float((R == 0).float().mean()))
    assert m.stats["active"].item() == pytest.approx(float((R > 0).sum(-1).float().mean()))


def test_coefficient_follows_eq7_pooled_over_layers_and_micro_batches():
    """lambda <- lambda * alpha ** sign(1 - k/E - S), S over every layer and training forward of the step."""
    a, b = layer(0, l1_coef_init=1e-3), layer(1, l1_coef_init=1e-3)
    x = torch.randn(2, 6, D)
    for _ in range(2):  # two micro-batches
        a(x), b(x)
    with torch.no_grad():  # not counted: evaluation
        a(x)
    gates = [torch.relu(x.reshape(-1, D) @ m.router.weight.t()) for m in (a, b)]
    S = float(sum((g == 0).sum() for g in gates) / sum(g.numel() for g in gates))
    target = 1 - 2 / E
    ReMoE.post_step([a, b], lambda t: t)
    expected = 1e-3 * 1.2 ** (1 if target > S else -1)
    assert a.l1_coef.item() == pytest.approx(expected) and b.l1_coef.item() == pytest.approx(expected)
    ReMoE.post_step([a, b], lambda t: t)  # no training forward since: unchanged
    assert a.l1_coef.item() == pytest.approx(expected)
    c = ReMoE(D, FF, E, top_k=E - 1, l1_coef_init=1.0)
    c._zero_gates = torch.tensor([1.0, 4.0], dtype=torch.float64)  # S = 1/4 = 1 - 3/4: the target, sign 0
    ReMoE.post_step([c], lambda t: t)
    assert c.l1_coef.item() == 1.0
    sums = []
    ReMoE.post_step([c], lambda t: sums.append(t.clone()) or t * 2)  # the counts go through the rank sum
    assert len(sums) == 1 and sums[0].tolist() == [0.0, 0.0]


def test_config_is_checked():
    from diffmoe.config import ConfigError

    for options, field in (
        (dict(top_k=E), "top_k"),
        (dict(l1_multiplier=1.0), "l1_multiplier"),
        (dict(l1_coef_init=0.0), "l1_coef_init"),
    ):
        with pytest.raises(ConfigError) as err:
            ReMoE(D, FF, E, **options)
        assert err.value.field == field
    assert ReMoEConfig().top_k == 2


def test_trains_with_the_step_hook_and_resumes_exactly(tiny_dataset, tmp_path):
    """The coefficient moves once per step by the rule (x1.2 or /1.2), is logged, and a resumed run
    reproduces the uninterrupted one, coefficient included."""
    cfg = run_config(
        tiny_dataset, "remoe", steps=8, checkpoint_every=3, keep_checkpoints=5, grad_accum=2, routing_log_every=1
    )
    train(cfg, tmp_path / "full", show_progress=False)
    train(cfg, tmp_path / "cut", show_progress=False)
    for ckpt in list_checkpoints(tmp_path / "cut"):
        if int(ckpt.name.split("-")[1]) > 3:
            shutil.rmtree(ckpt)
    train(cfg, tmp_path / "cut", resume=True, show_progress=False)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    routing = [r for r in read_metrics(tmp_path / "full") if r["kind"] == "routing"]
    coefs = [r["layer0.l1_coef"] for r in routing]  # the coefficient the step's last forward used
    ratios = [b / a for a, b in zip(coefs, coefs[1:])]
    assert all(r == pytest.approx(1.2) or r == pytest.approx(1 / 1.2) for r in ratios), ratios
    assert all(0 <= r["layer0.sparsity"] <= 1 and "layer1.active" in r for r in routing)
    train_records = [r for r in read_metrics(tmp_path / "full") if r["kind"] == "train"]
    assert all("aux_l1_unscaled" in r for r in train_records)
    _, full, _ = load_run(tmp_path / "full")
    _, cut, _ = load_run(tmp_path / "cut")
    assert latest_checkpoint(tmp_path / "cut").name == "step-00000008"
    for (_, a), (_, b) in zip(full.moe_layers(), cut.moe_layers()):
        assert a.l1_coef.item() == b.l1_coef.item() != 1e-8


def test_generates_as_the_full_forward_and_exports_with_custom_code(tmp_path):
    from conftest import tiny_model_config

    from diffmoe import Decoder
    from diffmoe.hf.export import export_custom, native_arch

    transformers = pytest.importorskip("transformers")
    cfg = tiny_model_config(ffn=["remoe", "dense"], n_layers=2)
    cfg.moe.num_experts = 4
    torch.manual_seed(0)
    model = Decoder(cfg).eval()
    for _, m in model.moe_layers():
        torch.nn.init.normal_(m.router.weight, std=0.3)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2)
        steps = [model(ids[:, :5], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert native_arch(cfg) is None
    out = export_custom(model, tmp_path / "hf", 0, None)
    assert json.loads((out / "config.json").read_text())["diffmoe"]["moe"]["remoe"]["top_k"] == 2
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, full, rtol=1e-5, atol=1e-5)


def test_appears_in_the_layer_benchmark():
    from diffmoe.bench.layer_specs import Shape, layer_specs

    shape = Shape(tokens=64, seq_len=32, d_model=16, d_ff=24, experts=4, segment_len=8)
    spec = next(s for s in layer_specs(shape, torch.device("cpu"), torch.float32, ()) if s.family == "remoe")
    built = spec.build()
    assert isinstance(built, ReMoE) and built.top_k == 2 and spec.flop_factor == 2.0
    assert built(torch.randn(2, 8, 16)).shape == (2, 8, 16)


def test_two_ranks_with_expert_parallelism_equal_one_process(tiny_dataset, tmp_path):
    """The coefficient's sparsity is summed over the ranks, so 2 ranks (FSDP2 + expert parallelism: a
    varying number of experts per token crosses the all-to-all) train what one process trains. The plain
    L1 penalty is a mean over tokens, the same per rank as over the batch (the load-balanced one counts
    experts per rank, as ReMoE does)."""
    from test_parallel_runtime import assert_same_run, distributed_config, torchrun_train

    from diffmoe.config import save_config

    cfg = distributed_config(tiny_dataset, "remoe", steps=4, eval_every=2)
    cfg.model.moe.families["remoe"] = ReMoEConfig(load_balance=False, l1_coef_init=1e-3)
    cfg.train.parallel.ep = 2
    cfg.validate()
    save_config(cfg, str(tmp_path / "cfg.yaml"))
    torchrun_train(2, tmp_path / "cfg.yaml", tmp_path / "two")
    cfg.train.parallel.mode, cfg.train.parallel.ep = "ddp", 1
    train(cfg, tmp_path / "one", show_progress=False)
    assert_same_run(tmp_path / "two", tmp_path / "one")
    coefs = {name: [m.l1_coef.item() for _, m in load_run(tmp_path / name)[1].moe_layers()] for name in ("one", "two")}
    assert coefs["one"] == coefs["two"] and coefs["one"][0] != 1e-3


def test_the_coefficient_recovers_after_a_long_decay():
    """Many steps above the target sparsity take lambda far below float32's range; it must still rise again
    (float64 state) and the loss must stay finite (the float32 weight may round to 0)."""
    m = layer(l1_coef_init=1e-8)
    for _ in range(600):  # S = 1 > 0.5 (k = 2 of E = 4): too sparse, lambda / 1.2 each step
        m._zero_gates = torch.tensor([4.0, 4.0], dtype=torch.float64)
        ReMoE.post_step([m], lambda t: t)
    low = m.l1_coef.item()
    assert 0 < low == pytest.approx(1e-8 / 1.2**600, rel=1e-9) and m.l1_weight.item() == 0.0
    m._zero_gates = torch.tensor([0.0, 4.0], dtype=torch.float64)  # S = 0: too dense
    ReMoE.post_step([m], lambda t: t)
    assert m.l1_coef.item() == pytest.approx(low * 1.2, rel=1e-9)
    m(torch.randn(2, 3, D))
    assert torch.isfinite(m.aux_loss) and m.aux_loss.dtype == torch.float32
