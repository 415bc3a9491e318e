"""The ``diffmoe`` command: thin argument parsing over the library."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError


def _smoke(args: argparse.Namespace) -> int:
    from . import smoke

    result = smoke.run(steps=args.steps)
    return 0 if result["heldout_after"] < result["heldout_before"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffmoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("smoke", help="train a small Lory model briefly and generate (installation check)")
    p.add_argument("--steps", type=int, default=120)
    p.set_defaults(func=_smoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
