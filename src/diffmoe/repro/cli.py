"""The ``repro`` command, thin over :mod:`diffmoe.repro.suite`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "repro",
        help="the reproduction suite: controlled experiments testing the papers' claims "
        "over seeds, with a report (experiments/)",
    )
    p.add_argument(
        "--suite",
        default="micro",
        help="micro (2 CPU cores; the report gives each group's training "
        "time) or gpu (one H100/H200; not run yet); experiments/suites/<suite>.yaml",
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAMES",
        help="comma-separated groups to run (e.g. 01-lory-vs-dense or lory-vs-dense); default all. "
        "The report still covers every group",
    )
    p.add_argument("--seeds", type=int, help="seeds 0..N-1 (default: the suite's)")
    p.add_argument("--experiments", default="experiments", help="the experiment definitions (default ./experiments)")
    p.add_argument("--work", help="corpus, datasets and runs (default runs/repro/<suite>)")
    p.add_argument("--out", help="REPORT.md, report.json and plots/ (default <experiments>/results/<suite>)")
    p.add_argument("--corpus", help="a corpus directory to prepare instead of the built-in one")
    p.add_argument("--report-only", action="store_true", help="train nothing: write the report from the finished runs")
    p.add_argument(
        "--report-selected",
        action="store_true",
        help="the report covers the --only groups alone (e.g. a group's own report next to the suite's)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars (status lines only)")
    p.set_defaults(func=_repro)


def _repro(args) -> int:
    from .suite import ReproOptions, run_repro

    only = [name for item in args.only for name in item.split(",") if name]
    report = run_repro(
        ReproOptions(
            experiments=Path(args.experiments),
            suite=args.suite,
            only=only,
            seeds=args.seeds,
            work=args.work and Path(args.work),
            out=args.out and Path(args.out),
            report_only=args.report_only,
            report_selected=args.report_selected,
            corpus=args.corpus and Path(args.corpus),
            verbose=not args.quiet,
        )
    )
    for group in report["groups"]:
        print(f"{group['claim']:>6}  {group['verdict']:<14} {group['title']}")
    out = Path(args.out or Path(args.experiments) / "results" / args.suite)
    print(f"report: {out / 'REPORT.md'} (every number in {out / 'report.json'})")
    return 0
