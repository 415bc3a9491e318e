"""``diffmoe demo``: the whole pipeline on the built-in corpus, sized for a laptop CPU.

1. build the built-in multi-domain corpus and prepare it with similarity batching;
2. time a few steps of each model, then give a dense model, a Lory model and a SparseMixer-v2 model
   with the same active parameters the same number of steps (same tokens) within the time budget;
3. evaluate each per domain on the held-out split, analyse routing;
4. export the Lory model to a Hugging Face directory (custom code) and check its logits, build the local
   lm-eval tasks from documents the models never trained on, score the three models on them (needs
   lm-eval, in the ``demo`` extra), and print the comparison tables.

Everything lands under ``--out``: corpus/, data/, runs/<model>/ (logs, checkpoints, analysis plots),
hf/lory/, tasks/, results.md and results.json.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import write_text_atomic
from .config import DataConfig, ModelConfig, MoEConfig, RunConfig, TrainConfig
from .console import say
from .moe import AuxLosses, LoryConfig, SparseMixerConfig


@dataclass
class DemoConfig:
    out: Path = Path("runs/demo")
    corpus: Path | None = None
    """A corpus to use instead of the built-in one (tests use a small fixture)."""
    minutes: float = 12.0
    """Wall-time budget for the three training runs together: fewer than ``max_steps`` steps each when
    they would not fit (the whole demo takes about 2 minutes more: corpus, preparation, analysis, export
    and lm-eval)."""
    task_items: int = 100
    """Items per local lm-eval task (0: skip the task scoring)."""
    seed: int = 0
    # the defaults are the micro reproduction suite's models and data at its pilot's shorter budget
    # (experiments/: dense-short, lory-8e-short; a test keeps them equal), so that the suite's seed
    # spread tells which differences in the demo's table mean something
    context_len: int = 256
    vocab_size: int = 2048
    mb_per_domain: float = 4.0
    batch_size: int = 16
    max_steps: int = 1000
    eval_batches: int | None = None
    d_model: int = 64
    n_layers: int = 4
    segment_len: int = 32
    suite_report: Path | None = Path("experiments/results/micro/report.json")
    """The reproduction suite's report whose seed spread the demo prints beside its table (skipped
    when the file is not there, e.g. outside a clone of the repository)."""


def model_configs(cfg: DemoConfig, vocab_size: int) -> dict[str, ModelConfig]:
    """Dense, Lory-8E and SparseMixer-v2 8 x (d_ff / 2) top-2 (no input jitter, as in the suite's arm):
    the same active parameters."""
    d_ff = 2 * round(11 * cfg.d_model / 8)  # 2.75 d_model, even so that two experts of d_ff/2 match it
    base = dict(
        vocab_size=vocab_size,
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=4,
        d_ff=d_ff,
        max_seq_len=cfg.context_len,
    )
    return {
        "dense": ModelConfig(**base, ffn="dense"),
        "lory": ModelConfig(
            **base, ffn="lory", moe=MoEConfig(num_experts=8, families={"lory": LoryConfig(segment_len=cfg.segment_len)})
        ),
        "sparsemixer": ModelConfig(
            **base,
            ffn="sparsemixer",
            moe=MoEConfig(
                num_experts=8,
                d_ff=d_ff // 2,
                balance_coef=0.01,
                families={"sparsemixer": SparseMixerConfig(jitter_eps=0.01, input_jitter_eps=0.0)},
            ),
        ),
    }


def run_config(cfg: DemoConfig, name: str, model: ModelConfig, steps: int, data: Path) -> RunConfig:
    """The training of model ``name``: the same recipe for all three, Lory with the 5 % dense warm-up."""
    train_cfg = TrainConfig(
        steps=steps,
        lr=2e-3,
        warmup_frac=0.05,
        seed=cfg.seed,
        dense_warmup_frac=0.05 if name == "lory" else 0.0,
        log_every=max(1, steps // 50),
        routing_log_every=max(1, steps // 10),
        eval_every=max(1, steps // 4),
        checkpoint_every=steps,
        keep_checkpoints=1,
    )
    return RunConfig(
        model=model,
        train=train_cfg,
        data=DataConfig(path=str(data), batch_size=cfg.batch_size, eval_batches=cfg.eval_batches),
    )


def run_demo(cfg: DemoConfig) -> dict:
    from .data import PrepareConfig, TokenizerConfig, prepare
    from .data.builtin import BuiltinCorpusConfig, build_builtin_corpus
    from .data.store import read_manifest
    from .eval.analyze import plot_routing, plot_utilisation, routing_by_domain, write_json
    from .runs import load_run
    from .train import train
    from .train.metrics import read_metrics

    t0 = time.perf_counter()
    out = Path(cfg.out)
    corpus, data = Path(cfg.corpus or out / "corpus"), out / "data"
    if cfg.corpus is None and not (corpus / "corpus.json").is_file():
        say(f"[1/5] building the built-in corpus ({cfg.mb_per_domain:g} MB per domain) in {corpus}")
        build_builtin_corpus(corpus, BuiltinCorpusConfig(max_mb_per_domain=cfg.mb_per_domain, seed=cfg.seed))
    try:
        read_manifest(data)
    except ValueError:
        say(f"[2/5] preparing {data}: BPE {cfg.vocab_size}, similarity batching, context {cfg.context_len}")
        prepare(
            corpus,
            data,
            PrepareConfig(
                context_len=cfg.context_len, seed=cfg.seed, tokenizer=TokenizerConfig(vocab_size=cfg.vocab_size)
            ),
            overwrite=True,
            verbose=True,
        )
    manifest = read_manifest(data)
    vocab = manifest["tokenizer"]["vocab_size"]
    models = model_configs(cfg, vocab)

    steps = _calibrate(models, cfg, budget_s=cfg.minutes * 60)
    tokens = steps * cfg.batch_size * cfg.context_len
    say(f"[3/5] training dense, Lory and SparseMixer-v2 for {steps} steps each ({tokens / 1e6:.2f}M tokens)")
    results = {}
    for name, model_cfg in models.items():
        run_dir = out / "runs" / name
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        results[name] = train(run_config(cfg, name, model_cfg, steps, data), run_dir)

    say("[4/5] routing analysis")
    plots = []
    heldout = _heldout(data)
    for name in ("lory", "sparsemixer"):
        run_dir = out / "runs" / name
        _, model, _ = load_run(run_dir)
        analysis = routing_by_domain(model, heldout, max_rows=32)
        write_json(analysis, run_dir / "routing_by_domain.json")
        plots.append(plot_routing(analysis, run_dir / "routing_by_domain.png", f"{name}: routing per domain"))
        curve = plot_utilisation(read_metrics(run_dir), run_dir / "utilisation.png", f"{name}: experts in use")
        if curve:
            plots.append(curve)

    tasks = _export_and_score(out, data, list(models), cfg) if cfg.task_items > 0 else None
    table = format_table(results, steps, tokens)
    spread = suite_spread(cfg.suite_report, steps) if cfg.suite_report else None
    if spread:
        table += "\n\n" + spread
    if tasks is not None:
        table += "\n\n" + format_task_table(tasks)
    summary = {
        "steps": steps,
        "tokens": tokens,
        "seed": cfg.seed,
        "wall_seconds": time.perf_counter() - t0,
        "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__},
        "models": {
            n: {k: r[k] for k in ("heldout", "seconds", "parameters", "skipped_steps")} for n, r in results.items()
        },
        "tasks": tasks,
    }
    write_text_atomic(out / "results.json", json.dumps(summary, indent=1))
    write_text_atomic(out / "results.md", table + "\n")
    say("\n" + table)
    say(f"\ntotal wall time {summary['wall_seconds'] / 60:.1f} min. Everything is in {out}/:")
    say(
        "  corpus/ (text), data/ (shards + manifest.json), runs/<model>/ (metrics.jsonl, tensorboard/, "
        "checkpoints/), hf/lory/ (transformers, trust_remote_code), tasks/ (lm-eval), results.md, results.json"
    )
    for p in plots:
        say(f"  plot: {p}")
    say(f"try: diffmoe generate {out / 'runs' / 'lory'} --prompt 'def main():' --temperature 0.8 --top-p 0.95")
    return summary


TASK_METRICS = {
    "diffmoe_cloze": ("acc", "perplexity"),
    "diffmoe_rolling": ("bits_per_byte",),
    "diffmoe_choice": ("acc", "acc_norm"),
    "diffmoe_code": ("exact_match",),
}


def _export_and_score(out: Path, data: Path, names: list[str], cfg: DemoConfig) -> dict | None:
    """Export the Lory run, build the tasks without the documents ``data`` trains on, and score each run
    with lm-eval (Lory routed on the context). Returns {"export": ..., "items": ..., "scores": {model:
    {task: {metric: value}}}}, or None without lm-eval."""
    try:
        from .hf.harness import run_tasks
    except ImportError as e:
        say(f"[5/5] skipped: {e}")
        return None
    from .eval.tasks import TASKS, build_tasks

    say("[5/5] export to Hugging Face and lm-eval on the local tasks")
    export = _export_lory(out / "runs" / "lory", out / "hf" / "lory", data)
    say(f"  hf/lory: {export['class']}, max |logit difference| vs diffmoe {export['max_abs_diff']:.1e}")
    manifest = build_tasks(out / "tasks", seed=cfg.seed, n=cfg.task_items, trained_on=[data])
    counts = ", ".join(f"{task} {d['items']}" for task, d in manifest["tasks"].items())
    say(f"  tasks: {counts} items, none from a training document")
    scores = {}
    for name in names:
        t = time.perf_counter()
        results = run_tasks(out / "runs" / name, TASKS, include_path=out / "tasks", batch_size=16)["results"]
        scores[name] = {task: {m: results[task][f"{m},none"] for m in TASK_METRICS[task]} for task in TASKS}
        say(f"  {name}: scored in {time.perf_counter() - t:.0f} s")
    return {"export": export, "items": {t: d["items"] for t, d in manifest["tasks"].items()}, "scores": scores}


def _export_lory(run_dir: Path, hf_dir: Path, data: Path) -> dict:
    """Export ``run_dir`` and compare the logits of transformers' model with diffmoe's on held-out rows."""
    from transformers import AutoModelForCausalLM

    from .hf.export import export_run
    from .runs import load_run

    export_run(run_dir, hf_dir)
    _, model, _ = load_run(run_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32).eval()
    heldout = _heldout(data)
    ids = torch.stack([heldout[int(i)]["input_ids"] for i in torch.linspace(0, len(heldout) - 1, 4)])
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
    return {"dir": str(hf_dir), "class": type(hf).__name__, "max_abs_diff": diff}


def _heldout(data: Path):
    from .data import PackedDataset

    return PackedDataset(data, "heldout")


def _calibrate(models: dict[str, ModelConfig], cfg: DemoConfig, budget_s: float) -> int:
    """Steps per model so that the three runs fit ``budget_s``: time a few training steps of each."""
    from .model import Decoder
    from .train.optim import build_optimizer

    per_step = 0.0
    ids = torch.randint(0, models["dense"].vocab_size, (cfg.batch_size, cfg.context_len + 1))
    for model_cfg in models.values():
        torch.manual_seed(cfg.seed)
        model = Decoder(model_cfg)
        opt = build_optimizer(model, TrainConfig())
        times = []
        for _ in range(4):
            t = time.perf_counter()
            aux = AuxLosses()
            loss = model(ids[:, :-1], labels=ids[:, 1:], aux=aux).mean()  # the trainer's loss
            loss = loss + aux.sum(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t)
        per_step += sorted(times[1:])[1]  # median of the three after warm-up
    # the trainer's data loader, evaluations, checkpoints and logging add to the bare steps timed here
    # (measured at the demo's size from a fresh clone: 0.430 s per step of the three models together in
    # the trainer, evaluations included, against 0.417 s here); 1.25 leaves room for a busier machine
    say(f"  a bare training step of the three models took {per_step:.3f} s together; budget {budget_s / 60:g} min")
    return max(10, min(cfg.max_steps, int(budget_s / (per_step * 1.25))))


def format_task_table(tasks: dict) -> str:
    columns = [(task, metric) for task, metrics in TASK_METRICS.items() for metric in metrics]
    head = "| model | " + " | ".join(f"{task.removeprefix('diffmoe_')} {metric}" for task, metric in columns) + " |"
    lines = [
        f"lm-eval on the local tasks ({', '.join(f'{n} {t}' for t, n in tasks['items'].items())} items, "
        "from documents outside the training split; Lory routed on the context):",
        "",
        head,
        "|---" * (1 + len(columns)) + "|",
    ]
    for name, score in tasks["scores"].items():
        lines.append(f"| {name} | " + " | ".join(f"{score[t][m]:.3f}" for t, m in columns) + " |")
    return "\n".join(lines)


def format_table(results: dict, steps: int, tokens: int) -> str:
    domains = [d for d in next(iter(results.values()))["heldout"] if d != "all"] + ["all"]
    head = "| model | params (active) | train s | " + " | ".join(f"{d} ppl" for d in domains) + " |"
    sep = "|---" * (3 + len(domains)) + "|"
    lines = [f"Held-out perplexity after {steps} steps ({tokens / 1e6:.2f}M training tokens) per model:", "", head, sep]
    for name, r in results.items():
        p = r["parameters"]
        ppl = " | ".join(f"{r['heldout'][d]['ppl']:.2f}" for d in domains)
        lines.append(f"| {name} | {p['total'] / 1e6:.2f}M ({p['active'] / 1e6:.2f}M) | {r['seconds']:.0f} | {ppl} |")
    return "\n".join(lines)


SUITE_ARMS = {
    "dense": ("dense", "dense-short"),
    "lory": ("lory-8e", "lory-8e-short"),
    "sparsemixer": ("sparsemixer-top2",),
}
"""The reproduction suite's arms that train the demo's models (the suite's and the pilot's budgets)."""


def suite_spread(report_path: Path, steps: int) -> str | None:
    """What the reproduction suite measured over seeds for the demo's models at ``steps`` steps: each
    model's seed-to-seed standard deviation and the paired Lory - dense difference (None without the
    report or without runs of that many steps)."""
    from .repro.stats import summarise

    path = Path(report_path)
    if not path.is_file():
        return None
    arms = json.loads(path.read_text(encoding="utf-8"))["arms"]
    losses = {}  # model -> {seed: held-out loss, all domains}
    for model, names in SUITE_ARMS.items():
        for name in names:
            runs = arms.get(name, {}).get("runs", {})
            if len(runs) > 1 and all(r["steps"] == steps for r in runs.values()):
                losses[model] = {int(s): r["metrics"]["loss.all"] for s, r in runs.items()}
    if not losses:
        return None
    lines = [
        f"Seed spread measured by the reproduction suite for these models at {steps} steps ({path}; "
        "same data, sizes and recipe):",
        "",
    ]
    for model, values in losses.items():
        s = summarise(values)
        lines.append(
            f"- {model} alone: held-out loss {s.mean:.4f} +- {s.sd:.4f} nats over {s.n} seeds "
            f"(+-{100 * (math.exp(s.sd) - 1):.1f} % perplexity)"
        )
    seeds = losses.get("lory", {}).keys() & losses.get("dense", {}).keys()
    if len(seeds) > 1:
        d = summarise({k: losses["lory"][k] - losses["dense"][k] for k in seeds})
        lines.append(
            f"- Lory - dense, paired by seed: {d.mean:+.4f} +- {d.sd:.4f} nats "
            f"({100 * math.expm1(d.mean):+.1f} % perplexity; 95 % interval [{d.lo:+.4f}, {d.hi:+.4f}])"
        )
    lines += [
        "",
        "A one-seed gap between two models means something only when it is well outside these "
        "spreads; experiments/results/micro/REPORT.md has every comparison.",
    ]
    return "\n".join(lines)


def register(subparsers) -> None:
    """The ``demo`` command."""
    p = subparsers.add_parser("demo", help="prepare the built-in corpus, train dense / Lory / SparseMixer, compare")
    p.add_argument("--out", default="runs/demo")
    p.add_argument(
        "--minutes",
        type=float,
        default=12.0,
        help="time budget for the three training runs, at "
        "most 1000 steps each (the whole demo takes about 2 minutes more)",
    )
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    run_demo(DemoConfig(out=Path(args.out), minutes=args.minutes))
    return 0
