"""The ``plan`` command, thin over :mod:`diffmoe.parallel.plan`."""

from __future__ import annotations

import argparse

from .plan import DEFAULT_INTER_GBPS, DEFAULT_INTRA_GBPS, DEFAULT_RESERVE_GIB


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="per-GPU memory and communication of each parallel layout for a config, "
        "and the one to use (no GPU needed; docs/scaling.md)",
    )
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (ranks)")
    p.add_argument("--gpu-mem", type=float, required=True, help="memory per GPU in GiB (e.g. 80)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument(
        "--intra-bw",
        type=float,
        default=DEFAULT_INTRA_GBPS,
        help=f"GB/s per GPU inside a node (default {DEFAULT_INTRA_GBPS:g})",
    )
    p.add_argument(
        "--inter-bw",
        type=float,
        default=DEFAULT_INTER_GBPS,
        help=f"GB/s per GPU across nodes (default {DEFAULT_INTER_GBPS:g})",
    )
    p.add_argument(
        "--reserve",
        type=float,
        default=DEFAULT_RESERVE_GIB,
        help=f"GiB per GPU kept for the CUDA context, NCCL and fragmentation (default {DEFAULT_RESERVE_GIB:g})",
    )
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the dataset's, else model.max_seq_len)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of the table")
    p.set_defaults(func=_plan)


def _plan(args) -> int:
    from ..config import load_config
    from .plan import Cluster, format_plan, make_plan, plan_json

    cluster = Cluster(args.gpus, args.gpu_mem, args.gpus_per_node, args.intra_bw, args.inter_bw, args.reserve)
    plan = make_plan(load_config(args.config, args.overrides), cluster, args.seq_len, config_name=args.config)
    print(plan_json(plan) if args.json else format_plan(plan))
    return 0
