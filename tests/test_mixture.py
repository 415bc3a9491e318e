"""Weighted mixtures of prepared datasets: proportions, reading without replacement, the same batches on
any number of ranks, exact resume of a training run, evaluation per dataset, and the tokenizer check."""

import shutil

import numpy as np
import pytest
import torch

from diffmoe.config import ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig
from diffmoe.data import PrepareConfig, TokenizerConfig, prepare
from diffmoe.data.mixture import MixtureStream
from diffmoe.train import train
from diffmoe.train.checkpoint import latest_checkpoint, list_checkpoints
from diffmoe.train.metrics import read_metrics


class Rows:
    """A stand-in dataset whose row ``r`` of dataset ``d`` is the sequence [d, r]."""

    def __init__(self, d: int, n: int):
        self.d, self.n = d, n

    def __len__(self):
        return self.n

    def __getitem__(self, r):
        t = torch.tensor([self.d, r])
        return {"input_ids": t, "labels": t}


def drawn(stream, micro_batches):
    """(dataset, row) of every sequence of micro-batches 0 .. micro_batches - 1, in global order."""
    out = []
    for k in range(micro_batches):
        ids, _ = stream.batch(k)
        out += [tuple(row.tolist()) for row in ids]
    return out


def test_each_dataset_is_drawn_by_its_weight_and_without_replacement():
    weights, sizes, G = [0.7, 0.2, 0.1], [500, 90, 37], 32
    stream = MixtureStream([Rows(d, n) for d, n in enumerate(sizes)], weights, batch_size=G, seed=3, global_batch=G)
    steps = 400
    seqs = drawn(stream, steps)
    labels = np.array([d for d, _ in seqs]).reshape(steps, G)
    per_step = np.stack([(labels == d).sum(1) for d in range(3)], axis=1)
    # every step is within one row of its share, and the shares sum to the batch
    assert (np.abs(per_step - np.array(weights) * G) < 1).all() and (per_step.sum(1) == G).all()
    # over all steps, within sampling error (3 binomial standard deviations) of the weights
    total = steps * G
    share = per_step.sum(0) / total
    assert (np.abs(share - weights) < 3 * np.sqrt(np.array(weights) * (1 - np.array(weights)) / total)).all()
    # each dataset is read epoch after epoch: every row once per epoch, in a different order each epoch
    for d, n in enumerate(sizes):
        rows = [r for dd, r in seqs if dd == d]
        epochs = len(rows) // n
        assert epochs >= 2
        for e in range(epochs):
            assert sorted(rows[e * n : (e + 1) * n]) == list(range(n))
        assert rows[:n] != rows[n : 2 * n]


@pytest.mark.parametrize("world, micro, accum", [(2, 4, 1), (4, 2, 1), (2, 2, 2)])
def test_the_same_sequences_on_any_number_of_ranks(world, micro, accum):
    datasets, weights, G = [Rows(0, 50), Rows(1, 13)], [3, 1], 8
    one = drawn(MixtureStream(datasets, weights, batch_size=G, seed=1, global_batch=G), 30)
    many = []
    for k in range(30 * accum):  # micro-batch k of every rank, in rank order: the global order
        for rank in range(world):
            stream = MixtureStream(datasets, weights, batch_size=micro, seed=1, global_batch=G, rank=rank, world=world)
            ids, _ = stream.batch(k)
            many += [tuple(row.tolist()) for row in ids]
    assert many == one
    # a pure function of the position: a fresh stream asked for step 25 directly agrees (resume)
    fresh = MixtureStream(datasets, weights, batch_size=G, seed=1, global_batch=G)
    assert [tuple(r.tolist()) for r in fresh.batch(25)[0]] == one[25 * G : 26 * G]
    other_seed = drawn(MixtureStream(datasets, weights, batch_size=G, seed=2, global_batch=G), 30)
    assert other_seed != one


@pytest.fixture(scope="module")
def second_dataset(tiny_dataset, tmp_path_factory):
    """A dataset of other documents prepared with the tiny dataset's tokenizer."""
    from conftest import write_fixture_corpus

    base = tmp_path_factory.mktemp("second")
    corpus = write_fixture_corpus(base / "corpus")
    shutil.rmtree(corpus / "code")
    prepare(
        corpus,
        base / "data",
        PrepareConfig(
            context_len=32, heldout_fraction=0.2, seed=9, tokenizer=TokenizerConfig(source=str(tiny_dataset))
        ),
    )
    return base / "data"


def mixture_config(mixture, steps=6, **train_kw):
    model = ModelConfig(vocab_size=384, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64)
    return RunConfig(
        model=model,
        data=DataConfig(mixture=mixture, batch_size=8, micro_batch_size=4, eval_batches=1),
        train=TrainConfig(
            **{
                "steps": steps,
                "lr": 3e-3,
                "log_every": 1,
                "eval_every": 3,
                "checkpoint_every": 1000,
                "tensorboard": False,
                **train_kw,
            }
        ),
    )


def test_a_mixture_run_resumes_exactly_and_evaluates_each_dataset(tiny_dataset, second_dataset, tmp_path):
    cfg = mixture_config(
        [{"path": str(tiny_dataset), "weight": 3}, {"path": str(second_dataset), "weight": 1, "name": "prose"}],
        checkpoint_every=3,
        keep_checkpoints=3,
    )
    summary = train(cfg, tmp_path / "full", show_progress=False)
    assert {"data/code", "data/prose", "data/all", "prose/prose", "prose/all", "all"} <= set(summary["heldout"])
    parts = [summary["heldout"][k] for k in ("data/all", "prose/all")]
    assert summary["heldout"]["all"]["tokens"] == sum(p["tokens"] for p in parts)
    assert summary["heldout"]["all"]["loss"] == pytest.approx(
        sum(p["loss"] * p["tokens"] for p in parts) / sum(p["tokens"] for p in parts)
    )
    train(cfg, tmp_path / "cut", show_progress=False)
    for ckpt in list_checkpoints(tmp_path / "cut"):
        if int(ckpt.name.split("-")[1]) > 3:
            shutil.rmtree(ckpt)
    assert latest_checkpoint(tmp_path / "cut").name == "step-00000003"
    train(cfg, tmp_path / "cut", resume=True, show_progress=False)
    losses = [[r["loss"] for r in read_metrics(tmp_path / run) if r["kind"] == "train"] for run in ("full", "cut")]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_mixture_config_errors_name_the_entry(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.mixture\[1\]\.weight=0: must be a positive number"):
        mixture_config([{"path": "a", "weight": 1}, {"path": "b", "weight": 0}])
    with pytest.raises(ConfigError, match=r"data\.mixture\[0\]\.paht"):
        mixture_config([{"paht": "a", "weight": 1}])
    with pytest.raises(ConfigError, match=r"data\.mixture=\[\]"):
        mixture_config([])
    # datasets of a mixture must share a tokenizer
    from conftest import write_fixture_corpus

    corpus = write_fixture_corpus(tmp_path / "corpus")
    prepare(corpus, tmp_path / "other", PrepareConfig(context_len=32, tokenizer=TokenizerConfig(vocab_size=300)))
    cfg = mixture_config([{"path": str(tiny_dataset), "weight": 1}, {"path": str(tmp_path / "other"), "weight": 1}])
    with pytest.raises(ConfigError, match=r"other has another tokenizer than .*same --tokenizer"):
        train(cfg, tmp_path / "run", show_progress=False)
