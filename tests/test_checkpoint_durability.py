"""Checkpoints that survive crashes: recorded sizes and hashes, resume past a damaged checkpoint, leftovers
of a crashed save, the run config in each checkpoint, and one TensorBoard history after a resume."""

import hashlib
import json
import shutil

import pytest
from test_train import losses, run_config

from diffmoe.config import ConfigError, load_config
from diffmoe.moe import ExpertChoiceConfig
from diffmoe.runs import load_run
from diffmoe.train import train
from diffmoe.train.checkpoint import latest_checkpoint, list_checkpoints
from diffmoe.train.metrics import read_metrics


def _cfg(tiny_dataset, **kw):
    return run_config(tiny_dataset, **{"steps": 6, "checkpoint_every": 2, "keep_checkpoints": 3, **kw})


@pytest.fixture(scope="module")
def full_run(tiny_dataset, tmp_path_factory):
    """An uninterrupted 6-step run with checkpoints at steps 2, 4 and 6."""
    run = tmp_path_factory.mktemp("durable") / "run"
    train(_cfg(tiny_dataset), run, show_progress=False)
    return run


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_a_checkpoint_records_its_files_and_config(full_run, tiny_dataset):
    ckpt = latest_checkpoint(full_run)
    meta = json.loads((ckpt / "trainer.json").read_text())
    on_disk = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*.safetensors"))
    assert sorted(meta["files"]) == on_disk and on_disk
    for name, info in meta["files"].items():
        data = (ckpt / name).read_bytes()
        assert info == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert meta["config"] == json.loads(json.dumps(_cfg(tiny_dataset).to_dict()))
    assert not list((full_run / "checkpoints").glob(".*"))  # no temporary directory left


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "bad field"])
def test_resume_falls_back_past_a_damaged_checkpoint(full_run, tiny_dataset, tmp_path, damage):
    run = _copy(full_run, tmp_path)
    for ckpt in list_checkpoints(run)[1:]:  # steps 4 and 6 damaged: resume from step 2
        shard = sorted((ckpt / "optimizer").glob("*.safetensors"))[0]
        data = bytearray(shard.read_bytes())
        if damage == "truncated":
            del data[len(data) // 2 :]
        elif damage == "flipped byte":
            data[len(data) // 2] ^= 0xFF
        else:
            meta = json.loads((ckpt / "trainer.json").read_text())
            (ckpt / "trainer.json").write_text(json.dumps(dict(meta, tokens="many")))
        shard.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="step-00000006.*(bytes|SHA-256|tokens='many').*kept as damaged-step-00000006"):
        train(_cfg(tiny_dataset, keep_checkpoints=1), run, resume=True, show_progress=False)
    assert losses(run) == losses(full_run)  # resumed from step 2 and reproduced steps 3-6 exactly
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    # the damaged ones are kept aside and never counted: keep_checkpoints=1 keeps the new step 6
    assert names == ["damaged-step-00000004", "damaged-step-00000006", "step-00000006"]
    load_run(run)  # the new checkpoint verifies


def test_a_crashed_save_leaves_nothing_that_breaks_the_next_run(full_run, tiny_dataset, tmp_path):
    run = _copy(full_run, tmp_path)
    root = run / "checkpoints"
    (root / ".tmp-step-00000008" / "model").mkdir(parents=True)  # a save cut short
    (root / ".tmp-step-00000008" / "model" / "shard.safetensors").write_bytes(b"\x00" * 7)
    (root / "step-00000006").rename(root / ".old-step-00000006")  # replacing step 6 was cut short
    train(_cfg(tiny_dataset), run, resume=True, show_progress=False)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000004", "step-00000006"]
    assert losses(run) == losses(full_run)


def test_a_resume_that_changes_the_training_is_refused_unless_accepted(full_run, tiny_dataset, tmp_path):
    run = _copy(full_run, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    longer = _cfg(tiny_dataset)
    longer.train.steps, longer.train.lr = 8, 1e-3
    with pytest.raises(ConfigError, match=r"train\.lr 0\.003 -> 0\.001, train\.steps 6 -> 8.*--accept-config-change"):
        train(longer, run, resume=True, show_progress=False)
    assert load_config(str(run / "config.yaml")).train.steps == 6  # the refused resume changed nothing

    cadence = _cfg(tiny_dataset, log_every=2, eval_every=3)  # only what is logged and when: free
    cadence.model.moe.dispatch = "grouped_mm"  # the same arithmetic
    cadence.model.moe.families["expert_choice"] = ExpertChoiceConfig(
        capacity_factor=3.0
    )  # a family the (dense) model does not use
    train(cadence, run, resume=True, show_progress=False)
    assert load_config(str(run / "config.yaml")).train.log_every == 1  # the config it trained with stays

    train(longer, run, resume=True, show_progress=False, accept_config_change=True)
    assert load_config(str(run / "config.yaml")).train.steps == 8
    assert load_config(str(run / "config.before-step-00000006.yaml")).train.steps == 6
    change = [r for r in read_metrics(run) if r["kind"] == "config_change"]
    assert change == [
        {
            "kind": "config_change",
            "step": 6,
            "previous_config": "config.before-step-00000006.yaml",
            "changes": {"train.lr": [0.003, 0.001], "train.steps": [6, 8]},
        }
    ]
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"] == [1, 2, 3, 4, 6, 7, 8]


def test_tensorboard_shows_one_history_after_a_resume(tiny_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tiny_dataset, tensorboard=True)
    train(cfg, tmp_path / "run", show_progress=False)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-00000006")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-00000004")
    train(cfg, tmp_path / "run", resume=True, show_progress=False)  # logs steps 3-6 again
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses(tmp_path / "run"))
