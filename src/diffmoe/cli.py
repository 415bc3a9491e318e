"""The ``diffmoe`` command: thin argument parsing over the library.

    diffmoe prepare  --corpus DIR --batching similarity --out data/
    diffmoe corpus   builtin --out corpus/
    diffmoe train    CONFIG.yaml [--run-dir runs/x] [--resume [--accept-config-change]] [section.field=value ...]
    diffmoe eval     RUN [--routing segment|prompt|prefix] [--device cuda]   (also under torchrun)
    diffmoe eval     RUN --tasks NAMES [--include-path DIR] [--limit N] [--routing prompt|segment]
    diffmoe tasks    build --out DIR [--seed S] [-n N] [--trained-on DATA ...]
    diffmoe consolidate RUN [--checkpoint C] [--out model.safetensors]
    diffmoe export   RUN --hf OUT [--checkpoint C] [--format native|custom|auto]
    diffmoe import   HF_DIR --out RUN
    diffmoe generate RUN --prompt "def fib(n):" [--max-new-tokens N --temperature T --top-k K --top-p P --seed S]
    diffmoe analyze  RUN
    diffmoe demo     [--out runs/demo]
    diffmoe bench    layers [--device cuda --dtype bfloat16 --sweep all ...]
    diffmoe bench    model [CONFIG.yaml ...] [--compile both|off|on ...]
    diffmoe bench    generate [CONFIG.yaml ...] [--prompt-len P --new-tokens G ...]
    diffmoe bench    scale [CONFIG.yaml ...] [--procs 1 2 4]
    diffmoe plan     CONFIG.yaml --gpus N --gpu-mem GB [--gpus-per-node 8] [--json] [section.field=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from .schema import ConfigError


def _train(args) -> int:
    from .config import load_config
    from .train import train

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir or Path("runs") / Path(args.config).stem)
    summary = train(cfg, run_dir, resume=args.resume, show_progress=not args.quiet, device=args.device,
                    accept_config_change=args.accept_config_change)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one report
        print(json.dumps({k: summary[k] for k in ("step", "loss", "skipped_steps", "tokens")}))
        print(_format_eval(summary["heldout"]))
        print(f"run directory: {run_dir}")
    if _world() > 1:  # gloo jobs using FSDP2 or functional collectives may abort at interpreter exit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _load(args, device=None):
    from .train.checkpoint import load_run
    from .parallel.distributed import resolve_device

    return load_run(args.run, args.checkpoint, device or resolve_device(args.device))


def _eval(args) -> int:
    """Under torchrun, every rank holds the model and scores its share of the held-out batches.
    With ``--tasks``: lm-eval tasks through :mod:`diffmoe.hf.harness` (one process)."""
    if args.tasks:
        return _eval_tasks(args)
    from .data import PackedDataset
    from .eval.perplexity import evaluate
    from .parallel import distributed

    env = distributed.setup(args.device)
    cfg, model, path = _load(args, env.device)
    data = PackedDataset(args.data or cfg.data.primary_path, "heldout")
    result = evaluate(model, data, args.batch_size, args.max_batches, args.routing, args.prompt_len,
                      rank=env.rank, world=env.world)
    if env.is_main:
        print(f"{path} ({args.routing or 'trained'} routing)")
        print(_format_eval(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    distributed.teardown(env)
    return 0


def _eval_tasks(args) -> int:
    from .hf.harness import run_tasks
    from .parallel.distributed import resolve_device

    routing = args.routing or "prompt"
    if routing not in ("prompt", "segment"):
        raise ConfigError(f"--routing {routing} with --tasks: choose prompt or segment")
    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)  # < 1: a fraction of items
    out = run_tasks(args.run, args.tasks, args.include_path, routing, limit, args.checkpoint,
                    args.batch_size, str(resolve_device(args.device)), args.data)
    from lm_eval.utils import make_table

    print(make_table(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out["results"], indent=1, default=str), encoding="utf-8")
    return 0


def _tasks(args) -> int:
    from .eval.tasks import build_tasks

    manifest = build_tasks(args.out, seed=args.seed, n=args.n, trained_on=args.trained_on or ())
    print(json.dumps(manifest["tasks"]))
    if "warning" in manifest:
        print(f"warning: {manifest['warning']}", file=sys.stderr)
    print(f"lm-eval tasks in {Path(args.out).resolve()}: diffmoe eval RUN --tasks "
          f"{','.join(manifest['tasks'])} --include-path {args.out}")
    return 0


def _export(args) -> int:
    from .hf.export import export_run

    print(export_run(args.run, args.hf, args.checkpoint, format=args.format))
    return 0


def _import(args) -> int:
    from .hf.importer import import_hf

    print(import_hf(args.hf_dir, args.out))
    return 0


def _consolidate(args) -> int:
    from .train.checkpoint import consolidate, load_run

    _, model, path = load_run(args.run, args.checkpoint)
    out = Path(args.out) if args.out else path / "model.safetensors"
    print(consolidate(model, out))
    return 0


def _format_eval(result: dict) -> str:
    lines = [f"{'domain':<16}{'tokens':>10}{'loss':>9}{'ppl':>10}"]
    for name, r in result.items():
        lines.append(f"{name:<16}{r['tokens']:>10}{r['loss']:>9.4f}{r['ppl']:>10.2f}")
    return "\n".join(lines)


def _generate(args) -> int:
    import torch

    from .data import load_tokenizer
    from .eval.generate import generate_stream

    cfg, model, _ = _load(args)
    tokenizer = load_tokenizer(args.data or cfg.data.primary_path)
    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        raise ConfigError("--prompt encodes to no tokens")
    limit = cfg.model.max_seq_len - len(ids)
    if args.max_new_tokens > limit:
        raise ConfigError(f"--max-new-tokens={args.max_new_tokens}: the prompt leaves room for {limit} "
                          f"(max_seq_len={cfg.model.max_seq_len})")
    generator = torch.Generator(next(model.parameters()).device).manual_seed(args.seed)
    sys.stdout.write(args.prompt)
    out: list[int] = []
    shown = ""
    for token in generate_stream(model, torch.tensor([ids]), args.max_new_tokens, routing=args.routing,
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                 generator=generator):
        out.append(int(token[0]))
        text = tokenizer.decode(out)
        if not text.endswith("\ufffd"):  # wait for multi-byte characters to complete
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write(tokenizer.decode(out)[len(shown):] + "\n")
    return 0


def _analyze(args) -> int:
    from .data import PackedDataset
    from .eval.analyze import plot_routing, plot_utilisation, routing_by_domain, write_json
    from .train.metrics import read_metrics

    cfg, model, path = _load(args)
    data = PackedDataset(args.data or cfg.data.primary_path, "heldout")
    out = Path(args.out or Path(args.run) / "analysis")
    out.mkdir(parents=True, exist_ok=True)
    if not model.moe_layers():
        print("the model has no MoE layer: nothing to analyse")
        return 0
    result = routing_by_domain(model, data, args.max_rows)
    write_json(result, out / "routing_by_domain.json")
    written = [out / "routing_by_domain.json",
               plot_routing(result, out / "routing_by_domain.png", f"{Path(args.run).name}: routing per domain")]
    curve = plot_utilisation(read_metrics(args.run), out / "utilisation.png", f"{Path(args.run).name}: experts in use")
    if curve:
        written.append(curve)
    print("\n".join(str(p) for p in written))
    return 0


def _demo(args) -> int:
    from .demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=Path(args.out), minutes=args.minutes))
    return 0


def _repro(args) -> int:
    from .repro.suite import ReproOptions, run_repro

    only = [name for item in args.only for name in item.split(",") if name]
    report = run_repro(ReproOptions(experiments=Path(args.experiments), suite=args.suite, only=only,
                                    seeds=args.seeds, work=args.work and Path(args.work),
                                    out=args.out and Path(args.out), report_only=args.report_only,
                                    corpus=args.corpus and Path(args.corpus), verbose=not args.quiet))
    for group in report["groups"]:
        print(f"{group['claim']:>6}  {group['verdict']:<14} {group['title']}")
    out = Path(args.out or Path(args.experiments) / "results" / args.suite)
    print(f"report: {out / 'REPORT.md'} (every number in {out / 'report.json'})")
    return 0


def _bench(args) -> int:
    import importlib

    importlib.import_module(f".bench.{args.which}", __package__).main(args.options)
    return 0


def device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when available; under torchrun each "
                                    "rank's LOCAL_RANK)")


def _plan(args) -> int:
    from .config import load_config
    from .parallel.plan import Cluster, format_plan, make_plan, plan_json

    cluster = Cluster(args.gpus, args.gpu_mem, args.gpus_per_node, args.intra_bw, args.inter_bw, args.reserve)
    plan = make_plan(load_config(args.config, args.overrides), cluster, args.seq_len, config_name=args.config)
    print(plan_json(plan) if args.json else format_plan(plan))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .data.cli import register as register_data

    parser = argparse.ArgumentParser(prog="diffmoe", description="Pre-train MoE language models: Lory, "
                                     "SparseMixer-v2 (GRIN), top-k, expert choice and dense baselines.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    register_data(sub)

    p = sub.add_parser("train", help="train a model from a YAML config (single process or under torchrun)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")
    p.add_argument("--run-dir", help="where logs and checkpoints go (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint that verifies")
    p.add_argument("--accept-config-change", action="store_true",
                   help="--resume: continue although the config changes the training (model, data, schedule, "
                        "optimizer, seed); the previous config is kept and the change logged")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    device_arg(p)
    p.set_defaults(func=_train)

    def run_args(p):
        p.add_argument("run", help="run directory")
        p.add_argument("--checkpoint", help="a checkpoint directory (default: the newest)")
        p.add_argument("--data", help="prepared dataset (default: the run config's data.path)")
        device_arg(p)

    p = sub.add_parser("eval", help="held-out perplexity per domain")
    run_args(p)
    p.add_argument("--routing", choices=("segment", "prompt", "prefix"),
                   help="Lory routing mode (default: the one it was trained with; with --tasks: prompt, routing on the context)")
    p.add_argument("--prompt-len", type=int, help="prompt routing: route on this many positions (default T)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int)
    p.add_argument("--json", help="also write the result to this file")
    p.add_argument("--tasks", help="lm-eval task names, comma-separated (needs diffmoe[eval]); e.g. from "
                                   "diffmoe tasks build")
    p.add_argument("--include-path", help="--tasks: a folder of lm-eval task YAMLs")
    p.add_argument("--limit", type=float, help="--tasks: items per task (or a fraction)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("tasks", help="build the local lm-eval task suite from package-shipped text")
    p.add_argument("action", choices=("build",))
    p.add_argument("--out", required=True, help="output folder (task YAMLs and JSONLs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-n", type=int, default=100, help="items per task (default 100)")
    p.add_argument("--trained-on", nargs="+", metavar="DATA",
                   help="prepared datasets of the models to score: their training documents are left out")
    p.set_defaults(func=_tasks)

    p = sub.add_parser("consolidate", help="write a checkpoint's weights as one safetensors file")
    p.add_argument("run", help="run directory")
    p.add_argument("--checkpoint", help="a checkpoint directory (default: the newest)")
    p.add_argument("--out", help="output file (default: CHECKPOINT/model.safetensors)")
    p.set_defaults(func=_consolidate)

    p = sub.add_parser("export", help="write a run as a transformers model directory (native classes where "
                                      "exact: dense -> Llama, top-k -> Mixtral / Qwen2-MoE; else custom code)")
    p.add_argument("run", help="run directory")
    p.add_argument("--hf", required=True, help="output directory (AutoModelForCausalLM.from_pretrained reads it)")
    p.add_argument("--checkpoint", help="a checkpoint directory (default: the newest)")
    p.add_argument("--format", choices=("auto", "native", "custom"), default="auto",
                   help="auto (default): native transformers classes where exact, else custom code; native "
                        "(refuses lory, expert choice, ...; all-SparseMixer models become PhiMoE, loadable on transformers "
                        ">= 5); custom (trust_remote_code, any model)")
    p.set_defaults(func=_export)

    p = sub.add_parser("import", help="a transformers llama / mixtral / qwen2_moe directory as a diffmoe run")
    p.add_argument("hf_dir", help="directory with config.json and safetensors weights")
    p.add_argument("--out", required=True, help="run directory to create")
    p.set_defaults(func=_import)

    p = sub.add_parser("generate", help="generate text with the KV cache (Lory: prompt-only routing)")
    run_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--routing", choices=("prompt", "segment"), default="prompt", help="Lory routing (default prompt)")
    p.set_defaults(func=_generate)

    p = sub.add_parser("analyze", help="routing per domain and expert utilisation, with plots")
    run_args(p)
    p.add_argument("--out", help="output folder (default RUN/analysis)")
    p.add_argument("--max-rows", type=int, default=64, help="held-out rows per domain")
    p.set_defaults(func=_analyze)

    p = sub.add_parser("bench", help="benchmarks that write markdown and JSON tables (see --help of each)")
    p.add_argument("which", choices=("layers", "model", "generate", "scale"),
                   help="layers: every MoE layer vs the dense FFN (and sweeps); model: training tokens/s of "
                        "configs, eager and compiled; generate: decoding time per token with the KV cache; "
                        "scale: each parallel layout on 1, 2 and 4 processes against diffmoe plan")
    p.add_argument("options", nargs=argparse.REMAINDER, help="options of the benchmark (e.g. --device cuda)")
    p.set_defaults(func=_bench)

    from .parallel.plan import DEFAULT_INTER_GBPS, DEFAULT_INTRA_GBPS, DEFAULT_RESERVE_GIB

    p = sub.add_parser("plan", help="per-GPU memory and communication of each parallel layout for a config, "
                                    "and the one to use (no GPU needed; docs/scaling.md)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (ranks)")
    p.add_argument("--gpu-mem", type=float, required=True, help="memory per GPU in GiB (e.g. 80)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--intra-bw", type=float, default=DEFAULT_INTRA_GBPS, help="GB/s per GPU inside a node "
                   f"(default {DEFAULT_INTRA_GBPS:g})")
    p.add_argument("--inter-bw", type=float, default=DEFAULT_INTER_GBPS, help="GB/s per GPU across nodes "
                   f"(default {DEFAULT_INTER_GBPS:g})")
    p.add_argument("--reserve", type=float, default=DEFAULT_RESERVE_GIB, help="GiB per GPU kept for the CUDA "
                   f"context, NCCL and fragmentation (default {DEFAULT_RESERVE_GIB:g})")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the dataset's, else model.max_seq_len)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of the table")
    p.set_defaults(func=_plan)

    p = sub.add_parser("demo", help="prepare the built-in corpus, train dense / Lory / SparseMixer, compare")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--minutes", type=float, default=12.0, help="time budget for the three training runs, at "
                   "most 1000 steps each (the whole demo takes about 2 minutes more)")
    p.set_defaults(func=_demo)
    p = sub.add_parser("repro", help="the reproduction suite: controlled experiments testing the papers' claims "
                       "over seeds, with a report (experiments/)")
    p.add_argument("--suite", default="micro", help="micro (2 CPU cores; the report gives each group's training "
                   "time) or gpu (one H100/H200; not run yet); experiments/suites/<suite>.yaml")
    p.add_argument("--only", action="append", default=[], metavar="NAMES",
                   help="comma-separated groups to run (e.g. 01-lory-vs-dense or lory-vs-dense); default all. "
                   "The report still covers every group")
    p.add_argument("--seeds", type=int, help="seeds 0..N-1 (default: the suite's)")
    p.add_argument("--experiments", default="experiments", help="the experiment definitions (default ./experiments)")
    p.add_argument("--work", help="corpus, datasets and runs (default runs/repro/<suite>)")
    p.add_argument("--out", help="REPORT.md, report.json and plots/ (default <experiments>/results/<suite>)")
    p.add_argument("--corpus", help="a corpus directory to prepare instead of the built-in one")
    p.add_argument("--report-only", action="store_true", help="train nothing: write the report from the finished runs")
    p.add_argument("--quiet", action="store_true", help="no progress bars (status lines only)")
    p.set_defaults(func=_repro)
    for command in sub.choices.values():  # --debug also after the command (SUPPRESS: keep the global value)
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


DEBUG_HELP = "show the traceback of configuration, data and checkpoint errors too (not only the one-line error)"


def user_errors() -> tuple[type[Exception], ...]:
    """The project's own error types: bad configs, arguments, data, checkpoints, layouts and training
    failures the user can act on. The CLI reports them in one line (exit 2); any other exception is a
    bug and keeps its traceback."""
    from .data.errors import DataError
    from .parallel.layout import ShardingError
    from .train.checkpoint import CheckpointError
    from .train.loop import TrainingError

    return ConfigError, DataError, CheckpointError, ShardingError, TrainingError


def main(argv: list[str] | None = None) -> int:
    from .runtime import reuse_freed_memory

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in ("train", "plan"):  # overrides may also follow the options
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if e not in args.overrides]
    if args.command == "bench" and "--debug" in args.options:  # the benchmark's options take the rest
        args.options.remove("--debug")
        args.debug = True
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in ("train", "eval", "generate", "analyze", "demo", "bench", "repro"):
        reuse_freed_memory()
    try:
        return args.func(args)
    except user_errors() as err:
        if args.debug:
            traceback.print_exc()
        _report(f"error: {err}", 2)
        return 2
    except KeyboardInterrupt:
        _report("interrupted", 130)
        return 130
    except Exception as err:
        if _world() == 1:
            raise  # a bug, not bad input: the traceback (exit 1)
        traceback.print_exc()  # under torchrun: this rank's traceback, then its one-line report
        _report(f"error: {type(err).__name__}: {err}", 1)
        return 1


def _report(message: str, code: int) -> None:
    """Print an error; under torchrun name the rank and leave at once, without waiting for the other
    ranks at exit (torchrun then stops them)."""
    if _world() == 1:
        print(message, file=sys.stderr)
        return
    print(f"rank {os.environ.get('RANK', '?')}: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
