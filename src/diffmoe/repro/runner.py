"""Train and measure the arms of a suite, one (arm, seed) run at a time, resuming what is done.

Layout under the work directory::

    corpus/, corpus.txt          the built-in corpus (once), and which corpus the data comes from
    data/<dataset>/              one prepared dataset per recipe of the suite (same tokenizer, same held-out
                                 rows), with the recipe it was prepared by (prepared again when it changes)
    runs/<arm>/s<seed>-<key>/    a diffmoe run (config.yaml, metrics.jsonl, checkpoints/) + result.json
    runs/<arm>/s<seed>-<key>.lock, .failed.json   the run's lock; the error of its last failed attempt

``key`` hashes what the run trains (:func:`~diffmoe.repro.spec.run_key`): editing an arm, the suite or a
dataset recipe trains the changed runs anew. A run with ``result.json`` is done; one with checkpoints
resumes from the newest; anything else starts over. ``result.json`` holds every number the report uses
(:func:`measure`), so the report is rebuilt from these files alone.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import math
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..atomic import write_text_atomic
from ..console import say
from ..schema import ConfigError
from .spec import Arm, Suite, dataset_recipe, run_config, run_key

RESULT = "result.json"


def dataset_dir(work: Path, name: str) -> Path:
    return work / "data" / name


def run_dir(work: Path, suite: Suite, arm: Arm, seed: int) -> Path:
    return work / "runs" / arm.name / f"s{seed}-{run_key(suite, arm, seed)}"


def missing_requirements(arm: Arm) -> list[str]:
    return [m for m in arm.requires if importlib.util.find_spec(m) is None]


def ensure_data(work: Path, suite: Suite, names: list[str], corpus: Path | None = None) -> None:
    """Build the corpus and prepare the datasets ``names`` that are not there yet. The first dataset of
    the suite trains the tokenizer; the others reuse it, so all have the same held-out rows. Processes
    sharing ``work`` take turns (a lock file)."""
    with file_lock(work / "data.lock", wait=True):
        _ensure_data(work, suite, names, corpus)


def _ensure_data(work: Path, suite: Suite, names: list[str], corpus: Path | None) -> None:
    from ..data import PrepareConfig, TokenizerConfig, prepare
    from ..data.builtin import BuiltinCorpusConfig, build_builtin_corpus
    from ..data.config import OrderingConfig
    from ..data.store import read_manifest

    source = (
        str(Path(corpus).resolve()) if corpus is not None else f"built-in, {suite.corpus_mb or 'all'} MB per domain"
    )
    recorded = work / "corpus.txt"
    if recorded.is_file() and recorded.read_text(encoding="utf-8") != source:
        raise ConfigError(
            f"work directory {work} holds data of another corpus ({recorded.read_text(encoding='utf-8')}); "
            f"use another --work for {source}"
        )
    if corpus is None:
        corpus = work / "corpus"
        if not (corpus / "corpus.json").is_file():
            say(f"building the built-in corpus ({suite.corpus_mb or 'all'} MB per domain) in {corpus}")
            build_builtin_corpus(corpus, BuiltinCorpusConfig(max_mb_per_domain=suite.corpus_mb))
    write_text_atomic(recorded, source)
    order = list(suite.datasets)
    for name in sorted(set(names) | {order[0]}, key=order.index):
        out = dataset_dir(work, name)
        recipe_file = out / "repro_recipe.json"
        wanted = json.dumps(dataset_recipe(suite, name), sort_keys=True)
        try:
            read_manifest(out)
            if recipe_file.is_file() and recipe_file.read_text(encoding="utf-8") == wanted:
                if name != order[0]:
                    _check_same_heldout(dataset_dir(work, order[0]), out)
                continue
        except ValueError:
            pass
        recipe = dict(suite.datasets[name])
        ordering = OrderingConfig(**{k: recipe.pop(k) for k in ("batching", "embedding") if k in recipe})
        vocab = recipe.pop("vocab_size")
        tokenizer = (
            TokenizerConfig(vocab_size=vocab)
            if name == order[0]
            else TokenizerConfig(source=str(dataset_dir(work, order[0])))
        )
        say(
            f"preparing dataset {name}: {ordering.batching} batching"
            + (f" ({ordering.embedding})" if ordering.batching == "similarity" else "")
        )
        prepare(corpus, out, PrepareConfig(tokenizer=tokenizer, ordering=ordering, **recipe), overwrite=True)
        _check_same_heldout(dataset_dir(work, order[0]), out)
        write_text_atomic(recipe_file, wanted)


def _check_same_heldout(reference: Path, other: Path) -> None:
    from ..data import PackedDataset

    a, b = PackedDataset(reference, "heldout"), PackedDataset(other, "heldout")
    same = len(a) == len(b) and all(np.array_equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(len(a)))
    if not same:
        raise ConfigError(
            f"datasets {reference.name} and {other.name} have different held-out rows, so their "
            "runs cannot be compared; prepare them from the same corpus with the same seed"
        )


MEASURE_VERSION = 3
"""Bumped whenever :func:`measure` changes: a result of another version is measured again from the run's
final checkpoint (no training)."""


def read_result(out: Path) -> dict | None:
    """The run's result when it is done and measured by this version of :func:`measure`."""
    path = out / RESULT
    if not path.is_file():
        return None
    result = json.loads(path.read_text(encoding="utf-8"))
    return result if result.get("measure_version") == MEASURE_VERSION else None


def run_arm(work: Path, suite: Suite, arm: Arm, seed: int, verbose: bool = True) -> dict | None:
    """Train (or resume) one arm for one seed, measure it, and return its result (see :func:`measure`).

    None when another process is running it (several ``diffmoe repro`` may share a work directory) or
    when it failed: the error is then kept in ``failed.json`` beside the run (the report lists it) and the
    next call tries again."""
    out = run_dir(work, suite, arm, seed)
    if (result := read_result(out)) is not None:
        return result
    with file_lock(out.with_name(out.name + ".lock"), wait=False) as held:
        if not held:
            say(f"{arm.name} seed {seed}: another process is running it; skipped here")
            return None
        if (result := read_result(out)) is not None:  # finished by that process meanwhile
            return result
        failed = out.with_name(out.name + ".failed.json")
        try:
            result = _train_and_measure(work, out, suite, arm, seed, verbose)
        except Exception as err:  # one broken run must not stop the others; the report shows it
            say(f"{arm.name} seed {seed} failed: {type(err).__name__}: {err}")
            write_text_atomic(
                failed, json.dumps({"arm": arm.name, "seed": seed, "error": f"{type(err).__name__}: {err}"})
            )
            return None
        failed.unlink(missing_ok=True)
        return result


@contextmanager
def file_lock(path: Path, wait: bool):
    """An exclusive ``flock`` on ``path`` for the block; yields False when ``wait`` is False and another
    process holds it. The kernel releases it when its holder exits, however it exits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _train_and_measure(work: Path, out: Path, suite: Suite, arm: Arm, seed: int, verbose: bool) -> dict:
    from ..train import train
    from ..train.checkpoint import list_checkpoints

    cfg = run_config(suite, arm, seed, dataset_dir(work, arm.dataset))
    resume = out.is_dir() and bool(list_checkpoints(out))
    if out.is_dir() and not resume:
        shutil.rmtree(out)  # an attempt that stopped before its first checkpoint
    say(f"{'resuming' if resume else 'training'} {arm.name} seed {seed} ({out})")
    summary = train(cfg, out, resume=resume, show_progress=verbose)
    result = measure(out, suite, summary)
    result.update(arm=arm.name, seed=seed, key=out.name.split("-")[-1], measure_version=MEASURE_VERSION)
    write_text_atomic(out / RESULT, json.dumps(result, indent=1))
    return result


def measure(out: Path, suite: Suite, summary: dict) -> dict:
    """Every number of one finished run, as ``metrics`` (a flat {name: value}) plus its curves.

    Every loss is measured with the routing the run was trained with (Lory: causal segments, or the
    prefix for a prefix-routed run), in nats on the whole held-out split; ``<d>`` is a domain or ``all``:

    - ``loss.<d>``: every position;
    - ``after_T.<d>`` / ``first_T.<d>``: positions >= / < the suite's ``T`` only;
    - ``prompt.<d>``: layers with prompt routing: routed once on the first T positions, scored after them;
    - ``after_half.<d>`` / ``prompt_half.<d>``: the same two with a prompt of half the context;
    - ``at<pct>.<d>``: the periodic evaluation at pct % of the steps (``loss`` at 100);
    - ``spec.layer<i>`` (MoE): specialisation of layer i, mean over domains of the total variation between
      the domain's mean routing vector and the mean over domains (0: routing ignores the domain);
      ``spec.upper_minus_first``: mean over layers > 0 minus layer 0;
    - ``experts_per_segment`` (merged experts): experts whose weight exceeds 2/E, per routed segment,
      mean over layers and domains (the Lory paper's utilisation criterion);
    - ``seconds_per_step``: training wall time per step, median over the logging intervals after the
      first tenth of the steps (evaluations and checkpoints not included);
    - ``train_minutes``: the training time, summed over the logging intervals of every attempt.
    """
    from ..data import PackedDataset
    from ..eval.analyze import routing_by_domain
    from ..eval.perplexity import evaluate, prompt_segment_len
    from ..parallel.distributed import resolve_device
    from ..runs import load_run
    from ..train.metrics import read_metrics

    cfg, model, _ = load_run(out, device=resolve_device(None))
    heldout = PackedDataset(cfg.data.path, "heldout")
    T = int(suite.vars["T"])
    batch = cfg.data.micro_batch_size or cfg.data.batch_size
    metrics = _flat("loss", summary["heldout"])
    metrics.update(_flat("after_T", evaluate(model, heldout, batch, score_from=T)))
    metrics.update(_flat("first_T", evaluate(model, heldout, batch, score_to=T)))
    half = heldout.context_len // 2
    metrics.update(_flat("after_half", evaluate(model, heldout, batch, score_from=half)))
    if prompt_segment_len(model) is not None:
        metrics.update(_flat("prompt", evaluate(model, heldout, batch, routing="prompt", prompt_len=T)))
        metrics.update(_flat("prompt_half", evaluate(model, heldout, batch, routing="prompt", prompt_len=half)))
    records = read_metrics(out)
    steps = cfg.train.steps
    curve = [r for r in records if r.get("kind") == "eval"]
    for r in curve:
        pct = round(100 * r["step"] / steps)
        metrics.update({f"at{pct}.{k[:-5]}": v for k, v in r.items() if k.endswith(".loss")})
    routing = None
    if model.moe_layers():
        routing = routing_by_domain(model, heldout, max_rows=64, batch_size=batch)
        metrics.update(routing_summary(routing))
    tokens_per_step = cfg.data.batch_size * heldout.context_len
    train = [r for r in records if r.get("kind") == "train"]
    speeds = [r["tokens_per_s"] for r in train if r["step"] > steps // 10]
    if speeds:  # median over the logging intervals: robust to a resume and to evaluation pauses
        metrics["seconds_per_step"] = tokens_per_step / float(np.median(speeds))
    tokens = [0] + [r["tokens"] for r in train]
    metrics["train_minutes"] = sum((b - a) / r["tokens_per_s"] for a, b, r in zip(tokens, tokens[1:], train)) / 60
    return {
        "metrics": metrics,
        "steps": steps,
        "tokens": steps * tokens_per_step,
        "parameters": summary["parameters"],
        "skipped_steps": summary["skipped_steps"],
        "curve": [
            {
                "step": r["step"],
                "tokens": r["step"] * tokens_per_step,
                **{k[:-5]: v for k, v in r.items() if k.endswith(".loss")},
            }
            for r in curve
        ],
        "usage_curve": [
            {"step": r["step"], **{k: v for k, v in r.items() if k.endswith("experts_in_use")}}
            for r in records
            if r.get("kind") == "routing"
        ],
        "routing": routing,
    }


def routing_summary(routing: dict) -> dict[str, float]:
    """``spec.layer<i>``, ``spec.upper_minus_first`` and (merged experts) ``experts_per_segment`` from
    :func:`diffmoe.eval.analyze.routing_by_domain`'s result."""
    out, usage = {}, []
    for name, entry in routing.items():
        w = np.asarray(entry["weights"], dtype=np.float64)  # [D, E]
        if w.size == 0 or np.isnan(w).any():
            continue
        out[f"spec.{name}"] = float(0.5 * np.abs(w - w.mean(0)).sum(1).mean())
        if "usage" in entry:
            usage.append(float(np.asarray(entry["usage"]).sum(1).mean()))
    layers = sorted((int(k[len("spec.layer") :]), v) for k, v in out.items())
    if len(layers) > 1:
        out["spec.upper_minus_first"] = float(np.mean([v for _, v in layers[1:]]) - layers[0][1])
    if usage:
        out["experts_per_segment"] = float(np.mean(usage))
    return out


def _flat(prefix: str, result: dict[str, dict]) -> dict[str, float]:
    return {f"{prefix}.{d}": float(v["loss"]) for d, v in result.items() if math.isfinite(v["loss"])}
