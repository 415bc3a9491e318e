"""The ``bench`` command: each benchmark parses its own options (``diffmoe bench NAME --help``)."""

from __future__ import annotations

import argparse
import importlib


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmarks that write markdown and JSON tables (see --help of each)")
    p.add_argument(
        "which",
        choices=("layers", "model", "generate", "scale"),
        help="layers: every MoE layer vs the dense FFN (and sweeps); model: training tokens/s of "
        "configs, eager and compiled; generate: decoding time per token with the KV cache; "
        "scale: each parallel layout on 1, 2 and 4 processes against diffmoe plan",
    )
    p.add_argument("options", nargs=argparse.REMAINDER, help="options of the benchmark (e.g. --device cuda)")
    p.set_defaults(func=_bench)


def _bench(args) -> int:
    importlib.import_module(f".{args.which}", __package__).main(args.options)
    return 0
