"""The CLI's error reporting: the project's own errors (bad config, arguments, data, checkpoints) are one
line and exit 2; anything else is a bug and keeps its traceback; ``--debug`` shows the traceback of the
project's errors too."""

import os
import subprocess
import sys

import pytest
import torch

from diffmoe.cli import main


def _one_line_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err


def test_a_project_error_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    _one_line_error(capsys.readouterr().err, "config file not found", "missing.yaml")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["tasks", "build", "--out", "{tmp}/t", "-n", "0"], "invalid n=0"),
        (["import", "{tmp}", "--out", "{tmp}/run"], "config.json"),
        (["eval", "{tmp}/nowhere", "--tasks", "x", "--routing", "prefix"], "--routing prefix"),
    ],
)
def test_user_input_errors_raised_deep_in_the_library_are_project_errors(tmp_path, capsys, argv, needle):
    """These were plain ValueError / FileNotFoundError, which the CLI no longer hides."""
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    _one_line_error(capsys.readouterr().err, needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_is_a_project_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--device", "cuda"]) == 2
    _one_line_error(capsys.readouterr().err, "--device cuda")


def _break_validation(monkeypatch):
    from diffmoe.config import RunConfig

    def validate(self):
        raise ValueError("a bug deep inside")

    monkeypatch.setattr(RunConfig, "validate", validate)


def test_an_unexpected_value_error_keeps_its_traceback(monkeypatch, capsys):
    _break_validation(monkeypatch)
    with pytest.raises(ValueError, match="a bug deep inside"):
        main(["plan", "configs/01-tiny-lory-8e.yaml", "--gpus", "1", "--gpu-mem", "80"])
    assert "error:" not in capsys.readouterr().err


def test_an_unexpected_error_exits_1_with_a_traceback_from_the_command_line(tmp_path):
    code = (
        "import sys; from diffmoe.config import RunConfig\n"
        "def validate(self): raise ValueError('a bug deep inside')\n"
        "RunConfig.validate = validate\n"
        "from diffmoe.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", code, "plan", "configs/01-tiny-lory-8e.yaml", "--gpus", "1", "--gpu-mem", "80"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback (most recent call last)" in proc.stderr and "in validate" in proc.stderr
    assert proc.stderr.rstrip().endswith("ValueError: a bug deep inside")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_of_a_project_error(tmp_path, capsys, where):
    argv = ["train", str(tmp_path / "missing.yaml")]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ConfigError: config file not found" in err
    assert err.rstrip().splitlines()[-1].startswith("error: config file not found")


def test_debug_after_a_benchmark_name_is_the_global_flag(tmp_path, capsys):
    assert main(["bench", "model", str(tmp_path / "missing.yaml"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "error: config file not found" in err


def test_under_torchrun_an_unexpected_error_prints_its_traceback_and_the_rank(monkeypatch, capsys):
    _break_validation(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")

    def leave(code):
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", leave)
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "configs/01-tiny-lory-8e.yaml", "--gpus", "1", "--gpu-mem", "80"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.rstrip().splitlines()[-1] == "rank 1: error: ValueError: a bug deep inside"
