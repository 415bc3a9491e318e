import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_model_config(**overrides):
    """A small decoder config shared by model-level tests."""
    from diffmoe.config import ModelConfig

    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=128)
    base.update(overrides)
    return ModelConfig(**base)


def write_fixture_corpus(root):
    """Two small domains: Python standard-library code and Zipf-distributed pseudo-word prose."""
    import random
    import sysconfig
    from pathlib import Path

    root = Path(root)
    (root / "code").mkdir(parents=True)
    (root / "prose").mkdir()
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
    for f in files:
        (root / "code" / f"{f.stem}.py").write_text(f.read_text(encoding="utf-8", errors="ignore")[:3000])
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    for i in range(40):  # each document has its own vocabulary, so no two are near-duplicates
        words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(60)]
        text = " ".join(rng.choices(words, [1 / (j + 1) for j in range(60)], k=400))
        (root / "prose" / f"doc{i:03d}.txt").write_text(text + ".\n")
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A prepared dataset (context 32, BPE 384) of the fixture corpus, shared by the training tests."""
    from diffmoe.data import PrepareConfig, TokenizerConfig, prepare

    base = tmp_path_factory.mktemp("tiny")
    corpus = write_fixture_corpus(base / "corpus")
    prepare(
        corpus,
        base / "data",
        PrepareConfig(context_len=32, heldout_fraction=0.1, tokenizer=TokenizerConfig(vocab_size=384)),
    )
    return base / "data"


def torchrun(nproc: int, argv, timeout: float = 240, expect_rc: int | None = 0):
    """Run ``torchrun --standalone --nproc_per_node nproc ARGV`` (a script and its arguments, or
    ``-m module ...``) with one thread per rank; returns the CompletedProcess (asserting its exit code
    when ``expect_rc`` is set)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        *map(str, argv),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if expect_rc == 0 and proc.returncode != 0 and "Signal 6 (SIGABRT)" in proc.stderr:
        # gloo under torch 2.13 occasionally aborts a rank from a C++ thread (docs/scaling.md, "Failures
        # and exit"): run once more, and say so in the warnings summary
        import warnings

        warnings.warn(f"torchrun {argv[0]}: a rank aborted (SIGABRT); ran again. {_failure_lines(proc.stderr)}")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if expect_rc is not None:
        assert proc.returncode == expect_rc, (_failure_lines(proc.stderr), proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def _failure_lines(stderr: str, limit: int = 12) -> str:
    """The lines that say why ranks failed (exceptions, aborts, signals), first, so a truncated report
    still shows them."""
    import re

    pattern = re.compile(r"(\w+(Error|Exception)\b.*:|terminate called|Signal \d+|exitcode|failures over all ranks)")
    return "\n".join([line.strip() for line in stderr.splitlines() if pattern.search(line)][:limit])


def run_torchrun(script, nproc: int, *args, timeout: float = 240, expect_rc: int | None = 0):
    """Run the worker ``tests/dist/<script>`` with ``args`` under :func:`torchrun`."""
    from pathlib import Path

    return torchrun(nproc, [Path(__file__).resolve().parent / "dist" / script, *args], timeout, expect_rc)
