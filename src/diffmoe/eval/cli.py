"""The ``eval``, ``tasks``, ``generate`` and ``analyze`` commands, thin over :mod:`diffmoe.eval`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..parallel.distributed import add_device_arg
from ..schema import ConfigError
from .perplexity import format_eval


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="held-out perplexity per domain")
    _run_args(p)
    p.add_argument(
        "--routing",
        choices=("segment", "prompt", "prefix"),
        help="routing mode of layers that have routing modes (default: the one they were trained with; with "
        "--tasks: prompt, routing on the context)",
    )
    p.add_argument("--prompt-len", type=int, help="prompt routing: route on this many positions (default T)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int)
    p.add_argument("--json", help="also write the result to this file")
    p.add_argument(
        "--tasks", help="lm-eval task names, comma-separated (needs diffmoe[eval]); e.g. from diffmoe tasks build"
    )
    p.add_argument("--include-path", help="--tasks: a folder of lm-eval task YAMLs")
    p.add_argument("--limit", type=float, help="--tasks: items per task (or a fraction)")
    p.set_defaults(func=_eval)

    p = subparsers.add_parser("tasks", help="build the local lm-eval task suite from package-shipped text")
    p.add_argument("action", choices=("build",))
    p.add_argument("--out", required=True, help="output folder (task YAMLs and JSONLs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-n", type=int, default=100, help="items per task (default 100)")
    p.add_argument(
        "--trained-on",
        nargs="+",
        metavar="DATA",
        help="prepared datasets of the models to score: their training documents are left out",
    )
    p.set_defaults(func=_tasks)

    p = subparsers.add_parser(
        "generate", help="generate text with the KV cache (layers with routing modes route on the prompt)"
    )
    _run_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--routing",
        choices=("prompt", "segment"),
        default="prompt",
        help="routing mode of layers that have routing modes (default prompt)",
    )
    p.set_defaults(func=_generate)

    p = subparsers.add_parser("analyze", help="routing per domain and expert utilisation, with plots")
    _run_args(p)
    p.add_argument("--out", help="output folder (default RUN/analysis)")
    p.add_argument("--max-rows", type=int, default=64, help="held-out rows per domain")
    p.set_defaults(func=_analyze)


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument("--checkpoint", help="a checkpoint directory (default: the newest)")
    p.add_argument("--data", help="prepared dataset (default: the run config's data.path)")
    add_device_arg(p)


def _load(args, device=None):
    from ..parallel.distributed import resolve_device
    from ..runs import load_run

    return load_run(args.run, args.checkpoint, device or resolve_device(args.device))


def _eval(args) -> int:
    """Under torchrun, every rank holds the model and scores its share of the held-out batches.
    With ``--tasks``: lm-eval tasks through :mod:`diffmoe.hf.harness` (one process)."""
    if args.tasks:
        return _eval_tasks(args)
    from ..data import PackedDataset
    from ..parallel import distributed
    from .perplexity import evaluate

    env = distributed.setup(args.device)
    cfg, model, path = _load(args, env.device)
    data = PackedDataset(args.data or cfg.data.primary_path, "heldout")
    result = evaluate(
        model, data, args.batch_size, args.max_batches, args.routing, args.prompt_len, rank=env.rank, world=env.world
    )
    if env.is_main:
        print(f"{path} ({args.routing or 'trained'} routing)")
        print(format_eval(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    distributed.teardown(env)
    return 0


def _eval_tasks(args) -> int:
    from ..hf.harness import run_tasks
    from ..parallel.distributed import resolve_device

    routing = args.routing or "prompt"
    if routing not in ("prompt", "segment"):
        raise ConfigError(f"--routing {routing} with --tasks: choose prompt or segment")
    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)  # < 1: a fraction of items
    out = run_tasks(
        args.run,
        args.tasks,
        args.include_path,
        routing,
        limit,
        args.checkpoint,
        args.batch_size,
        str(resolve_device(args.device)),
        args.data,
    )
    from lm_eval.utils import make_table

    print(make_table(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out["results"], indent=1, default=str), encoding="utf-8")
    return 0


def _tasks(args) -> int:
    from .tasks import build_tasks

    manifest = build_tasks(args.out, seed=args.seed, n=args.n, trained_on=args.trained_on or ())
    print(json.dumps(manifest["tasks"]))
    if "warning" in manifest:
        print(f"warning: {manifest['warning']}", file=sys.stderr)
    print(
        f"lm-eval tasks in {Path(args.out).resolve()}: diffmoe eval RUN --tasks "
        f"{','.join(manifest['tasks'])} --include-path {args.out}"
    )
    return 0


def _generate(args) -> int:
    from ..data import load_tokenizer
    from .generate import print_generation

    cfg, model, _ = _load(args)
    print_generation(
        model,
        load_tokenizer(args.data or cfg.data.primary_path),
        args.prompt,
        args.max_new_tokens,
        routing=args.routing,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    return 0


def _analyze(args) -> int:
    from ..data import PackedDataset
    from ..train.metrics import read_metrics
    from .analyze import plot_routing, plot_utilisation, routing_by_domain, write_json

    cfg, model, path = _load(args)
    data = PackedDataset(args.data or cfg.data.primary_path, "heldout")
    out = Path(args.out or Path(args.run) / "analysis")
    out.mkdir(parents=True, exist_ok=True)
    if not model.moe_layers():
        print("the model has no MoE layer: nothing to analyse")
        return 0
    result = routing_by_domain(model, data, args.max_rows)
    write_json(result, out / "routing_by_domain.json")
    written = [
        out / "routing_by_domain.json",
        plot_routing(result, out / "routing_by_domain.png", f"{Path(args.run).name}: routing per domain"),
    ]
    curve = plot_utilisation(read_metrics(args.run), out / "utilisation.png", f"{Path(args.run).name}: experts in use")
    if curve:
        written.append(curve)
    print("\n".join(str(p) for p in written))
    return 0
