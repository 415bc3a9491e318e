"""The ``train`` and ``consolidate`` commands, thin over :mod:`diffmoe.train`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..eval.perplexity import format_eval
from ..parallel.distributed import add_device_arg


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a model from a YAML config (single process or under torchrun)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")
    p.add_argument("--run-dir", help="where logs and checkpoints go (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint that verifies")
    p.add_argument(
        "--accept-config-change",
        action="store_true",
        help="--resume: continue although the config changes the training (model, data, schedule, "
        "optimizer, seed); the previous config is kept and the change logged",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_arg(p)
    p.set_defaults(func=_train)

    p = subparsers.add_parser("consolidate", help="write a checkpoint's weights as one safetensors file")
    p.add_argument("run", help="run directory")
    p.add_argument("--checkpoint", help="a checkpoint directory (default: the newest)")
    p.add_argument("--out", help="output file (default: CHECKPOINT/model.safetensors)")
    p.set_defaults(func=_consolidate)


def _train(args) -> int:
    from ..config import load_config
    from .loop import train

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir or Path("runs") / Path(args.config).stem)
    summary = train(
        cfg,
        run_dir,
        resume=args.resume,
        show_progress=not args.quiet,
        device=args.device,
        accept_config_change=args.accept_config_change,
    )
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one report
        print(json.dumps({k: summary[k] for k in ("step", "loss", "skipped_steps", "tokens")}))
        print(format_eval(summary["heldout"]))
        print(f"run directory: {run_dir}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # gloo jobs using FSDP2 or functional collectives may abort
        sys.stdout.flush()  # at interpreter exit (docs/scaling.md, "Failures and exit")
        sys.stderr.flush()
        os._exit(0)
    return 0


def _consolidate(args) -> int:
    from ..runs import load_run
    from .checkpoint import consolidate

    _, model, path = load_run(args.run, args.checkpoint)
    out = Path(args.out) if args.out else path / "model.safetensors"
    print(consolidate(model, out))
    return 0
