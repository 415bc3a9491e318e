"""The LM loss in chunks of tokens (diffmoe.model.loss): the unchunked loss and gradients exactly, and
no tensor of tokens x vocabulary anywhere in a training step or an evaluation."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_config
from torch.utils._python_dispatch import TorchDispatchMode

from diffmoe.model import Decoder
from diffmoe.model import loss as loss_module
from diffmoe.model.loss import LinearCrossEntropy, linear_cross_entropy

V = 1024  # the memory tests' vocabulary: its logits [N, V] far larger than any activation [N, d_ff]


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("chunk", [3, 7])  # uneven chunks recompute their logits; one chunk keeps them
def test_gradcheck_float64(chunk):
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (7,))
    assert torch.autograd.gradcheck(lambda h, w: LinearCrossEntropy.apply(h, w, labels, chunk), (h, w))
    ref = F.cross_entropy(h @ w.t(), labels, reduction="none")
    torch.testing.assert_close(LinearCrossEntropy.apply(h, w, labels, chunk), ref, rtol=1e-12, atol=1e-12)


def _reference_and_chunked(model, ids, labels):
    """(loss, grads) of the full-logits loss and of the chunked one, summed over tokens."""
    out = []
    for chunked in (False, True):
        model.zero_grad(set_to_none=True)
        if chunked:
            lm = model(ids, labels=labels).sum()
        else:
            lm = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), reduction="sum")
        lm.backward()
        out.append((lm.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    return out


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("ffn", ["dense", "lory"])
def test_decoder_loss_and_every_gradient_equal_the_full_logits_float32(monkeypatch, tie, ffn):
    monkeypatch.setattr(loss_module, "CHUNK_LOGITS", 97 * 13)  # 13 tokens a chunk: 5 chunks of 64 tokens
    model = Decoder(tiny_model_config(ffn=ffn, tie_embeddings=tie)).train()
    ids = torch.randint(0, 97, (2, 32))
    labels = ids.roll(-1, 1)
    (ref, ref_grads), (got, grads) = _reference_and_chunked(model, ids, labels)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and ("lm_head.weight" in grads) != tie
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_autocast_loss_in_float32_matches_the_full_logits():
    """Under autocast the head runs in bf16, as F.linear does; the loss accumulates in float32."""
    model = Decoder(tiny_model_config()).train()
    ids = torch.randint(0, 97, (2, 32))
    labels = ids.roll(-1, 1)
    h = torch.randn(64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        per_token = linear_cross_entropy(h, model.lm_head.weight, labels.flatten(), chunk=10)
        full = F.cross_entropy(F.linear(h, model.lm_head.weight).float(), labels.flatten(), reduction="none")
    assert per_token.dtype == torch.float32
    torch.testing.assert_close(per_token, full, rtol=0, atol=1e-5)  # the same bf16 logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (ref, ref_grads), (got, grads) = _reference_and_chunked(model, ids, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=0)
    for name in grads:  # bf16 products: each rounded per chunk here, once over all tokens there
        assert grads[name].dtype == torch.float32
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0.05, atol=2e-3, msg=name)


def test_no_tensor_grows_with_tokens_times_vocabulary(monkeypatch):
    """Forward and backward of the chunked loss: nothing as large as the [N, V] logits."""
    monkeypatch.setattr(loss_module, "CHUNK_LOGITS", V * 8)
    model = Decoder(tiny_model_config(vocab_size=V)).train()
    ids = torch.randint(0, V, (4, 64))
    with LargestTensor() as seen:
        model(ids, labels=ids.roll(-1, 1)).sum().backward()
    assert seen.largest < ids.numel() * V / 2  # the [N, V] logits would be N * V


def test_train_step_never_holds_the_full_logits(monkeypatch):
    from diffmoe.config import ParallelConfig, TrainConfig
    from diffmoe.parallel import distributed
    from diffmoe.parallel.parallelize import ParallelPlan, parallelize
    from diffmoe.train.optim import build_optimizer
    from diffmoe.train.step import Stepper

    monkeypatch.setattr(loss_module, "CHUNK_LOGITS", V * 8)
    model = Decoder(tiny_model_config(vocab_size=V))
    ids = torch.randint(0, V, (4, 65))
    plan = ParallelPlan.build(ParallelConfig(), 1, "cpu")
    wrapped = parallelize(model, plan, torch.device("cpu"))
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3))
    env = distributed.DistEnv(0, 1, torch.device("cpu"))
    with torch.no_grad():
        expected = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).item()
    with LargestTensor() as seen:
        result = Stepper(wrapped, optimizer, plan, env, grad_clip=1.0).step(
            itertools.repeat((ids[:, :-1], ids[:, 1:])), 1
        )
    assert result.loss == pytest.approx(expected, rel=1e-6)
    assert seen.largest < 4 * 64 * V / 2  # the [N, V] logits would be N * V


def test_evaluation_scores_in_chunks_with_the_full_logits_loss(monkeypatch):
    from diffmoe.eval.perplexity import evaluate

    class Rows:  # two domains, one row each
        context_len, domains = 64, ["a", "b"]
        domain_tokens = torch.tensor([[64, 0], [0, 64]]).numpy()

        def __init__(self):
            self.ids = torch.randint(0, V, (2, 65))

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"input_ids": self.ids[i, :-1], "labels": self.ids[i, 1:]}

    monkeypatch.setattr(loss_module, "CHUNK_LOGITS", V * 8)
    model = Decoder(tiny_model_config(vocab_size=V))
    data = Rows()
    with torch.no_grad():
        full = F.cross_entropy(model(data.ids[:, :-1]).transpose(1, 2), data.ids[:, 1:], reduction="none")
    with LargestTensor() as seen:
        result = evaluate(model, data, batch_size=2)
    assert result["a"]["loss"] == pytest.approx(full[0].mean().item(), rel=1e-6)
    assert result["b"]["loss"] == pytest.approx(full[1].mean().item(), rel=1e-6)
    assert seen.largest < 2 * 64 * V / 2  # the [N, V] logits would be N * V


def test_bench_model_compares_chunked_and_full_logits_side_by_side(tmp_path):
    import json
    import math
    from pathlib import Path

    from diffmoe.cli import main

    config = str(Path(__file__).resolve().parents[1] / "configs" / "00-tiny-dense.yaml")
    assert (
        main(
            [
                "bench",
                "model",
                config,
                "--set",
                "model.n_layers=1",
                "model.d_model=32",
                "model.n_heads=2",
                "model.d_ff=64",
                "--compile",
                "off",
                "--loss",
                "both",
                "--batch-size",
                "2",
                "--seq-len",
                "32",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--threads",
                "1",
                "--matmul-size",
                "64",
                "--device",
                "cpu",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "bench_model_cpu_float32.json").read_text())["rows"]
    table = (tmp_path / "bench_model_cpu_float32.md").read_text()
    assert [r["loss"] for r in rows] == ["chunked", "full"]
    for r in rows:
        assert math.isfinite(r["peak_mem_gb"]) and r["peak_mem_gb"] > 0
        assert r["time_vs_dense"] == 1.0  # each loss is compared with the dense config of the same loss
        assert f"| 00-tiny-dense | eager | ddp | off | {r['loss']} |" in table
