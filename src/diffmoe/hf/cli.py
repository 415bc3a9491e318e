"""The ``export`` and ``import`` commands, thin over :mod:`diffmoe.hf`."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a run as a transformers model directory (native classes where "
        "exact: dense -> Llama, top-k -> Mixtral / Qwen2-MoE; else custom code)",
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--hf", required=True, help="output directory (AutoModelForCausalLM.from_pretrained reads it)")
    p.add_argument("--checkpoint", help="a checkpoint directory (default: the newest)")
    p.add_argument(
        "--format",
        choices=("auto", "native", "custom"),
        default="auto",
        help="auto (default): native transformers classes where exact, else custom code; native "
        "(refuses what no native class computes exactly); custom (trust_remote_code, any model "
        "whose families ship an export class)",
    )
    p.set_defaults(func=_export)

    p = subparsers.add_parser("import", help="a transformers llama / mixtral / qwen2_moe directory as a diffmoe run")
    p.add_argument("hf_dir", help="directory with config.json and safetensors weights")
    p.add_argument("--out", required=True, help="run directory to create")
    p.set_defaults(func=_import)


def _export(args) -> int:
    from .export import export_run

    print(export_run(args.run, args.hf, args.checkpoint, format=args.format))
    return 0


def _import(args) -> int:
    from .importer import import_hf

    print(import_hf(args.hf_dir, args.out))
    return 0
