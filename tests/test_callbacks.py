"""The trainer's extension points: callbacks at every point of the loop, in order, with the step's
micro-batches; the loggers (metrics.jsonl, TensorBoard, Weights & Biases offline); the throughput, FLOPs,
data-wait and memory metrics of the train records; auxiliary losses collected from the forward."""

import json
import struct

import pytest
import torch
from test_train import run_config

from diffmoe.config import ConfigError
from diffmoe.train import train
from diffmoe.train.callbacks import Callback
from diffmoe.train.metrics import flops_per_token, read_metrics


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_start(self, trainer, step):
        self.calls.append(("start", step))

    def pre_step(self, trainer, step):
        self.calls.append(("pre", step, trainer.state.phase))

    def post_backward(self, trainer, step, micro):
        self.calls.append(("backward", step, micro))

    def pre_optimizer_step(self, trainer, step):
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        self.calls.append(("optimizer", step, len(grads) > 0))

    def post_step(self, trainer, step, result):
        self.calls.append(("post", step, result.applied))

    def on_eval(self, trainer, done, result):
        self.calls.append(("eval", done, round(result["all"]["loss"], 6)))

    def on_checkpoint(self, trainer, done, path):
        self.calls.append(("checkpoint", done, path.name))

    def on_end(self, trainer):
        self.calls.append(("end",))


def test_callbacks_run_at_every_point_in_order(tiny_dataset, tmp_path):
    cfg = run_config(
        tiny_dataset, "lory", steps=4, grad_accum=2, eval_every=2, checkpoint_every=4, dense_warmup_frac=0.5
    )
    recorder = Recorder()
    summary = train(cfg, tmp_path / "run", show_progress=False, callbacks=[recorder])
    expected = [("start", 0)]
    for step in range(4):
        expected += [
            ("pre", step, "dense" if step < 2 else "moe"),
            ("backward", step, 0),
            ("backward", step, 1),
            ("optimizer", step, True),
        ]
        if step in (1, 3):  # the default callbacks evaluate and checkpoint in post_step, before this one's
            expected.append(("eval", step + 1, None))
        if step == 3:
            expected.append(("checkpoint", 4, "step-00000004"))
        expected.append(("post", step, True))
    expected.append(("end",))
    got = [c[:2] + (None,) if c[0] == "eval" else c for c in recorder.calls]
    assert got == expected
    evals = [r["all.loss"] for r in read_metrics(tmp_path / "run") if r["kind"] == "eval"]
    assert [c[2] for c in recorder.calls if c[0] == "eval"] == [round(v, 6) for v in evals]
    assert summary["heldout"]["all"]["loss"] == pytest.approx(evals[-1])


def test_train_records_carry_throughput_flops_data_wait_and_memory(tiny_dataset, tmp_path):
    cfg = run_config(tiny_dataset, "topk", steps=3)
    train(cfg, tmp_path / "run", show_progress=False)
    records = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert len(records) == 3
    for r in records:
        assert r["tokens_per_s"] > 0 and r["data_wait_s"] >= 0 and r["peak_rss_gb"] > 0.05
        assert "mfu" not in r  # CPU: FLOP/s only
        assert r["aux_balance_unscaled"] > 0 and r["aux_z_unscaled"] > 0
    from diffmoe.runs import load_run

    _, model, _ = load_run(tmp_path / "run")
    per_token = flops_per_token(model, 32)
    assert records[-1]["flops_per_s"] == pytest.approx(per_token * records[-1]["tokens_per_s"], rel=1e-6)
    cfg_model = model.cfg  # 6 x active matmul parameters (top-2 of 4 experts, head included) + attention
    active = model.parameter_counts()["active"] - model.embed.weight.numel()
    assert per_token == 6 * active + 12 * cfg_model.n_layers * cfg_model.d_model * 32


def test_auxiliary_losses_are_collected_from_the_forward():
    from conftest import tiny_model_config

    from diffmoe import Decoder
    from diffmoe.moe import AuxLosses

    cfg = tiny_model_config(ffn=["topk", "lory", "sparsemixer"], n_layers=3)
    cfg.moe.families["lory"].segment_len = 4
    cfg.moe.z_loss_coef = 0.001
    model = Decoder(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    aux = AuxLosses()
    model(ids, labels=ids, aux=aux)
    layers = [m for _, m in model.moe_layers()]
    torch.testing.assert_close(aux.total, sum(m.aux_loss for m in layers))
    assert set(aux.unscaled) == {"balance", "z"}
    torch.testing.assert_close(
        aux.unscaled["balance"], sum(m.aux_losses["balance"] for m in layers if "balance" in m.aux_losses).detach()
    )
    assert aux.total.requires_grad and not aux.unscaled["z"].requires_grad
    empty = AuxLosses()
    Decoder(tiny_model_config())(ids, aux=empty)  # dense: nothing collected, a zero to add
    assert empty.total is None and empty.sum(ids.float()).item() == 0.0


def test_loggers_are_configured_and_checked(tiny_dataset, tmp_path):
    cfg = run_config(tiny_dataset, steps=2)
    cfg.train.loggers = ["jsonl"]
    cfg.train.tensorboard = True
    train(cfg, tmp_path / "run", show_progress=False)
    assert (tmp_path / "run" / "metrics.jsonl").is_file() and not (tmp_path / "run" / "tensorboard").exists()
    for loggers, why in ((["tensorboard"], "must include jsonl"), (["jsonl", "mlflow"], "must be a list of")):
        cfg.train.loggers = loggers
        with pytest.raises(ConfigError, match=f"train.loggers.*{why}"):
            cfg.validate()


def wandb_history(run_file):
    """The history rows of an offline W&B run file (LevelDB-style log of 32 KiB blocks, each record a
    ``Record`` protobuf; read without wandb's internals, which the Go core no longer ships)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_logger_offline_gets_the_records_and_resumes_the_same_run(tiny_dataset, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = run_config(tiny_dataset, steps=4, checkpoint_every=2, keep_checkpoints=3)
    cfg.train.loggers = ["jsonl", "wandb"]
    run = tmp_path / "run"
    train(cfg, run, show_progress=False)
    run_id = (run / "wandb_id").read_text().strip()
    (first,) = sorted((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    rows = wandb_history(first)
    train_records = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert [row["_step"] for row in rows] == [1, 2, 3, 4]
    assert [row["train/loss"] for row in rows] == pytest.approx([r["loss"] for r in train_records])
    assert "eval/all.loss" in rows[-1] and "train/tokens_per_s" in rows[0]
    cfg.train.steps = 6
    train(cfg, run, resume=True, show_progress=False, accept_config_change=True)
    assert (run / "wandb_id").read_text().strip() == run_id  # the same W&B run continues
    files = sorted((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"), key=lambda p: p.stat().st_mtime)
    assert [row["_step"] for row in wandb_history(files[-1])] == [5, 6]


def test_the_bad_step_checkpoint_holds_the_state_before_the_bad_step(tiny_dataset, tmp_path, monkeypatch):
    import diffmoe.model.decoder as decoder
    from diffmoe.train import TrainingError
    from diffmoe.train.checkpoint import latest_checkpoint, read_trainer_state

    real = decoder.linear_cross_entropy
    monkeypatch.setattr(decoder, "linear_cross_entropy", lambda *a, **k: real(*a, **k) * float("inf"))
    with pytest.raises(TrainingError):
        train(run_config(tiny_dataset, steps=8, max_bad_steps=2), tmp_path / "run", show_progress=False)
    meta = read_trainer_state(latest_checkpoint(tmp_path / "run"))
    assert meta["step"] == 1 and meta["tokens"] == 4 * 32  # the tokens of the step before, not the bad step's
    assert meta["skipped_steps"] == 2 and meta["phase"] == "moe"


def test_wandb_must_be_installed_on_every_rank(tiny_dataset, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = run_config(tiny_dataset, steps=2)
    cfg.train.loggers = ["jsonl", "wandb"]
    with pytest.raises(ConfigError, match="train.loggers.*wandb, which is not installed"):
        cfg.validate()
