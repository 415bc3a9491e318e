"""The ``diffmoe`` command: assembles the subcommands each package registers, and reports errors.

    diffmoe prepare  --corpus DIR --batching similarity --out data/              data/cli.py
    diffmoe corpus   builtin --out corpus/                                       data/cli.py
    diffmoe train    CONFIG.yaml [--run-dir runs/x] [--resume] [section.field=value ...]   train/cli.py
    diffmoe consolidate RUN [--checkpoint C] [--out model.safetensors]           train/cli.py
    diffmoe eval     RUN [--routing segment|prompt|prefix] [--tasks NAMES ...]   eval/cli.py
    diffmoe tasks    build --out DIR [--trained-on DATA ...]                     eval/cli.py
    diffmoe generate RUN --prompt "def fib(n):" [--max-new-tokens N ...]         eval/cli.py
    diffmoe analyze  RUN                                                         eval/cli.py
    diffmoe export   RUN --hf OUT [--format native|custom|auto]                  hf/cli.py
    diffmoe import   HF_DIR --out RUN                                            hf/cli.py
    diffmoe plan     CONFIG.yaml --gpus N --gpu-mem GB [--json]                  parallel/cli.py
    diffmoe bench    layers|model|generate|scale [options]                       bench/cli.py
    diffmoe repro    [--suite micro] [--only GROUPS]                             repro/cli.py
    diffmoe demo     [--out runs/demo]                                           demo.py

Errors the user can act on (:func:`user_errors`) print one line and exit 2 (``--debug``: with the
traceback); anything else is a bug and keeps its traceback (exit 1). Under torchrun each rank reports
its own error, naming the rank, and leaves at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from .schema import ConfigError

DEBUG_HELP = "show the traceback of configuration, data and checkpoint errors too (not only the one-line error)"
OVERRIDES = ("train", "plan")  # commands whose section.field=value overrides may also follow the options
MEMORY_HUNGRY = ("train", "eval", "generate", "analyze", "demo", "bench", "repro")


def build_parser() -> argparse.ArgumentParser:
    from . import demo
    from .bench import cli as bench
    from .data import cli as data
    from .eval import cli as evaluation
    from .hf import cli as hf
    from .parallel import cli as parallel
    from .repro import cli as repro
    from .train import cli as training

    parser = argparse.ArgumentParser(
        prog="diffmoe",
        description="Pre-train MoE language models: Lory, "
        "SparseMixer-v2 (GRIN), ReMoE, top-k, expert choice and dense baselines.",
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for package in (data, training, evaluation, hf, parallel, bench, repro, demo):
        package.register(sub)
    for command in sub.choices.values():  # --debug also after the command (SUPPRESS: keep the global value)
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def user_errors() -> tuple[type[Exception], ...]:
    """The project's own error types: bad configs, arguments, data, checkpoints, layouts and training
    failures the user can act on. The CLI reports them in one line (exit 2); any other exception is a
    bug and keeps its traceback."""
    from .data.errors import DataError
    from .parallel.layout import ShardingError
    from .train.callbacks import TrainingError
    from .train.checkpoint import CheckpointError

    return ConfigError, DataError, CheckpointError, ShardingError, TrainingError


def main(argv: list[str] | None = None) -> int:
    from .runtime import reuse_freed_memory

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in OVERRIDES:
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if e not in args.overrides]
    if args.command == "bench" and "--debug" in args.options:  # the benchmark's options take the rest
        args.options.remove("--debug")
        args.debug = True
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in MEMORY_HUNGRY:
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


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


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
