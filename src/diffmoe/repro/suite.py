"""Run the groups of a suite (every arm, every seed), then write its report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..console import say
from ..schema import ConfigError
from .runner import ensure_data, missing_requirements, run_arm
from .spec import Experiments, check_group


@dataclass
class ReproOptions:
    experiments: Path = Path("experiments")
    suite: str = "micro"
    only: list[str] = field(default_factory=list)
    """Group names (``03-similarity-batching`` or ``similarity-batching``); empty: every group."""
    seeds: int | None = None
    """Seeds 0 .. seeds - 1 (None: the suite's)."""
    work: Path | None = None
    """Corpus, datasets and runs (default runs/repro/<suite>)."""
    out: Path | None = None
    """REPORT.md, report.json and plots/ (default experiments/results/<suite>)."""
    report_only: bool = False
    """Write the report from the runs that are done; train nothing."""
    report_selected: bool = False
    """The report covers the ``only`` groups alone (default: every group of the suite)."""
    corpus: Path | None = None
    """A corpus to use instead of the built-in one (tests use a small fixture)."""
    verbose: bool = True


def run_repro(opts: ReproOptions) -> dict:
    """Train what the selected groups still lack, then write the report of every group of the suite
    (groups without runs show as not run). Returns the report (as in report.json)."""
    from .report import write_report

    exp = Experiments(opts.experiments)
    suite = exp.suite(opts.suite)
    seeds = suite.seeds if opts.seeds is None else opts.seeds
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds {seeds!r}: must be a positive integer")
    work = Path(opts.work or Path("runs/repro") / suite.name)
    out = Path(opts.out or opts.experiments / "results" / suite.name)
    selected = exp.groups(opts.only)
    groups = exp.groups()
    arms = {name: exp.arm(name) for g in groups for name in g.arms}
    for group in groups:
        check_group(suite, group, arms)
    if not opts.report_only:
        runnable = {}
        for name in dict.fromkeys(n for g in selected for n in g.arms):
            arm = arms[name]
            missing = missing_requirements(arm)
            if missing:
                say(f"skipping arm {name}: needs the module(s) {', '.join(missing)}, not installed")
            else:
                runnable[name] = arm
        ensure_data(work, suite, sorted({a.dataset for a in runnable.values()}), opts.corpus)
        for group in selected:
            say(f"group {group.name}: {group.title}")
            for seed in range(seeds):
                for name in group.arms:
                    if name in runnable:
                        run_arm(work, suite, runnable[name], seed, opts.verbose)
    if opts.report_selected:
        groups = selected
        arms = {name: arms[name] for g in groups for name in g.arms}
    return write_report(out, work, suite, groups, arms, seeds, command=_command(opts, suite.name))


def _command(opts: ReproOptions, suite: str) -> str:
    only = f" --only {','.join(opts.only)} --report-selected" if opts.report_selected else ""
    return f"diffmoe repro --suite {suite}" + (f" --seeds {opts.seeds}" if opts.seeds else "") + only
