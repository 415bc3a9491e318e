"""``REPORT.md``, ``report.json`` and ``plots/`` of a suite, rebuilt from the runs' ``result.json`` files."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import yaml

from ..atomic import write_text_atomic
from ..console import say
from . import plots
from .runner import RESULT, read_result, run_dir
from .spec import Arm, Group, Suite
from .stats import Results, arm_spread, claim_verdict, paired, summarise, verdict

LOSS_METRIC = re.compile(r"^(loss|after_T|first_T|after_half|prompt|prompt_half|at\d+)\.")


def load_results(work: Path, suite: Suite, arms: dict[str, Arm], seeds: int) -> tuple[Results, dict]:
    """{arm: {seed: result}} of the finished runs of the arms' current configs (measured by the current
    :func:`~diffmoe.repro.runner.measure`), and {arm: {seed: error}} of the runs whose last attempt failed."""
    results: Results = {}
    failed: dict[str, dict[int, str]] = {}
    stale = 0
    for name, arm in arms.items():
        for seed in range(seeds):
            out = run_dir(work, suite, arm, seed)
            result = read_result(out)
            if result is not None:
                results.setdefault(name, {})[seed] = result
            elif (out / RESULT).is_file():
                stale += 1
            elif (error := out.with_name(out.name + ".failed.json")).is_file():
                failed.setdefault(name, {})[seed] = json.loads(error.read_text(encoding="utf-8"))["error"]
    if stale:
        say(
            f"{stale} finished run(s) were measured by an older diffmoe: left out of the report until "
            "`diffmoe repro` (without --report-only) measures them again"
        )
    return results, failed


def write_report(
    out: Path, work: Path, suite: Suite, groups: list[Group], arms: dict[str, Arm], seeds: int, command: str
) -> dict:
    """Write ``out``/REPORT.md, report.json and plots/*.png for every group; return the report."""
    results, failed = load_results(Path(work), suite, arms, seeds)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "suite": suite.name,
        "description": suite.description,
        "seeds": seeds,
        "command": command,
        "run": suite.run,
        "vars": suite.vars,
        "datasets": suite.datasets,
        "corpus_mb": suite.corpus_mb,
        "arms": {
            name: {
                **_arm_entry(arm, results.get(name, {})),
                "failed": {str(k): v for k, v in failed.get(name, {}).items()},
            }
            for name, arm in arms.items()
        },
        "groups": [_group_entry(g, results, range(seeds), out, command) for g in groups],
    }
    drawn = {out / p for g in report["groups"] for p in g["plots"].values()}
    for stale in (out / "plots").glob("*.png"):  # plots of runs that no longer count
        if stale not in drawn:
            stale.unlink()
    write_text_atomic(out / "report.json", json.dumps(report, indent=1))
    write_text_atomic(out / "REPORT.md", markdown(report))
    return report


def _arm_entry(arm: Arm, runs: dict[int, dict]) -> dict:
    entry = {
        "description": " ".join(arm.description.split()),
        "dataset": arm.dataset,
        "overrides": arm.run,
        "runs": {
            str(s): {
                "key": r["key"],
                "metrics": r["metrics"],
                "parameters": r["parameters"],
                "steps": r["steps"],
                "tokens": r["tokens"],
                "skipped_steps": r["skipped_steps"],
            }
            for s, r in sorted(runs.items())
        },
    }
    if runs:
        entry["parameters"] = next(iter(runs.values()))["parameters"]
        names = sorted({k for r in runs.values() for k in r["metrics"]})
        entry["summary"] = {
            k: s.to_dict()
            for k in names
            if (s := summarise({sd: r["metrics"][k] for sd, r in runs.items() if k in r["metrics"]}))
        }
    return entry


def _group_entry(group: Group, results: Results, seeds: range, out: Path, command: str) -> dict:
    comparisons = []
    for c in group.comparisons:
        s = paired(c, results, seeds)
        alone = arm_spread(c, results, seeds)
        spreads = [v.sd for v in alone.values() if v.n > 1]
        comparisons.append(
            {
                "name": c.name,
                "terms": [f"{'-' if t.sign < 0 else '+'}{t.arm}:{t.metric}" for t in c.terms],
                "expect": c.expect,
                "margin": c.margin,
                "key": c.key,
                "summary": s.to_dict() if s else None,
                "verdict": verdict(c, s),
                "ppl_change": _ppl(c, s),
                "arms_alone": {k: v.to_dict() for k, v in alone.items()},
                # whether the paired difference is larger than the seed-to-seed spread of each term
                "beyond_spread": (abs(s.mean) > max(spreads)) if s and spreads and c.expect != "comparable" else None,
            }
        )
    drawn = {}
    for kind in group.plots:
        if kind == "routing":
            for arm in group.arms:
                p = plots.routing(
                    results,
                    arm,
                    out / "plots" / f"{group.name}-routing-{arm}.png",
                    f"{arm}, seed {min(results.get(arm, {0: 0}))}: mean routing weight per domain",
                )
                if p:
                    drawn[f"routing {arm}"] = p
        else:
            draw = {"curves": plots.curves, "domains": plots.domains, "usage": plots.usage}[kind]
            p = draw(results, group.arms, out / "plots" / f"{group.name}-{kind}.png", f"{group.title[:70]}")
            if p:
                drawn[kind] = p
    runs = [r for arm in group.arms for r in results.get(arm, {}).values()]
    return {
        "name": group.name,
        "claim": str(group.claim),
        "title": group.title,
        "paper": " ".join(group.paper.split()),
        "runs": len(runs),
        "train_minutes": sum(r["metrics"].get("train_minutes", 0.0) for r in runs),
        "specialisation": _per_layer(group, results) if "routing" in group.plots else None,
        "notes": " ".join(group.notes.split()),
        "discussion": " ".join(group.discussion.split()),
        "arms": group.arms,
        "comparisons": comparisons,
        "verdict": claim_verdict(group, [c["verdict"] for c in comparisons]),
        "command": f"{command} --only {group.name}",
        "plots": {k: str(p.relative_to(out)) for k, p in drawn.items()},
    }


def _per_layer(group: Group, results: Results) -> dict[str, dict[str, dict]]:
    """{arm: {layer: summary over seeds}} of the MoE arms' specialisation per layer."""
    out = {}
    for arm in group.arms:
        runs = results.get(arm, {})
        layers = sorted(
            {k for r in runs.values() for k in r["metrics"] if k.startswith("spec.layer")},
            key=lambda k: int(k[len("spec.layer") :]),
        )
        if layers:
            out[arm] = {
                k[len("spec.") :]: summarise({s: r["metrics"][k] for s, r in runs.items()}).to_dict() for k in layers
            }
    return out


def _ppl(c, s) -> float | None:
    """The comparison as a perplexity ratio minus 1, when it is a sum of losses."""
    if s is None or not all(LOSS_METRIC.match(t.metric) for t in c.terms):
        return None
    return math.expm1(s.mean)


# ----------------------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    lines = [
        f"# diffmoe reproduction report: suite `{report['suite']}`",
        "",
        report["description"],
        "",
        f"Seeds 0-{report['seeds'] - 1}; the arms of a seed share data order and initial weights, so each "
        "comparison is computed per seed (paired) and summarised by its mean, standard deviation and "
        "Student-t 95 % interval. Losses are nats per token on the whole held-out split (lower is "
        "better); a comparison is a signed sum of per-seed metrics, so a negative loss difference "
        "favours its first arm.",
        "",
        f"Regenerate: `{report['command']}` trains what is missing and rewrites this file, its "
        f"`report.json` (every number) and `plots/`; `{report['command']} --report-only` rewrites them "
        "from the finished runs alone. Each section's command does the same for one group.",
        "",
        "**Signs agree**: `yes` when the 95 % interval excludes 0 on the paper's side (for "
        "'comparable': lies within the stated margin), `no` when it excludes 0 on the other side, "
        "`inconclusive` otherwise. A claim agrees when all its key comparisons do.",
        "",
        "## Summary",
        "",
        "| claim | paper | diffmoe (key comparisons, mean [95 % interval]) | signs agree |",
        "|---|---|---|---|",
    ]
    for g in report["groups"]:
        key = [c for c in g["comparisons"] if c["key"]]
        measured = "<br>".join(f"{c['name']}: {_short(c)}" for c in key)
        lines.append(f"| {g['claim']}. {g['title']} | {g['paper']} | {measured} | {g['verdict']} |")
    lines += [
        "",
        "## Setup",
        "",
        "The suite's run config (every arm starts from it; hyper-parameters are set "
        "once for the model size and shared by all arms):",
        "",
        "```yaml",
        yaml.safe_dump(
            {
                "run": report["run"],
                "vars": report["vars"],
                "datasets": report["datasets"],
                "corpus_mb": report["corpus_mb"],
            },
            sort_keys=False,
        ).rstrip(),
        "```",
        "",
        "| arm | what it changes | parameters (active) | seeds done | held-out loss | s / step |",
        "|---|---|---|---|---|---|",
    ]
    failures = [
        f"- {name} seed {seed}: {error}"
        for name, arm in report["arms"].items()
        for seed, error in arm["failed"].items()
    ]
    for name, arm in report["arms"].items():
        p, s = arm.get("parameters"), arm.get("summary", {})
        params = f"{p['total'] / 1e6:.2f}M ({p['active'] / 1e6:.2f}M)" if p else "-"
        lines.append(
            f"| {name} | {arm['description']} | {params} | {len(arm['runs'])} | "
            f"{_mean_sd(s.get('loss.all'))} | {_mean_sd(s.get('seconds_per_step'), 3)} |"
        )
    if failures:
        lines += ["", "Runs whose last attempt failed (the next `diffmoe repro` tries them again):", ""] + failures
    for g in report["groups"]:
        lines += [
            "",
            f"## {g['claim']}. {g['title']}",
            "",
            f"Paper: {g['paper']}",
            "",
            f"Command: `{g['command']}`. Signs agree: **{g['verdict']}**. Its {g['runs']} runs trained "
            f"for {g['train_minutes']:.0f} min here (runs shared with other groups count in each).",
            "",
            "| comparison | seeds | mean | sd | 95 % interval | as perplexity | each term alone: mean (sd) "
            "| beyond each term's sd | per seed | signs agree |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in g["comparisons"]:
            s = c["summary"]
            name = c["name"] + ("" if c["key"] else " (detail)")
            if s is None:
                lines.append(f"| {name} | 0 | | | | | | | | not run |")
                continue
            alone = "; ".join(f"{k} {v['mean']:.4f} ({_num(v['sd'])})" for k, v in c["arms_alone"].items())
            seeds = ", ".join(f"s{k} {v:+.4f}" for k, v in s["values"].items())
            ppl = f"{100 * c['ppl_change']:+.1f} %" if c["ppl_change"] is not None else ""
            lines.append(
                f"| {name} | {s['n']} | {s['mean']:+.4f} | {_num(s['sd'])} | "
                f"[{_num(s['lo'], sign=True)}, {_num(s['hi'], sign=True)}] | {ppl} | {alone} | "
                f"{ {True: 'yes', False: 'no', None: '-'}[c['beyond_spread']] } | {seeds} | {c['verdict']} |"
            )
        if g["notes"]:
            lines += ["", g["notes"]]
        if g["discussion"]:
            lines += ["", f"Reading (written after the runs): {g['discussion']}"]
        if g["specialisation"]:
            layers = list(next(iter(g["specialisation"].values())))
            lines += [
                "",
                "Specialisation per layer (mean +- sd over seeds):",
                "",
                "| arm | " + " | ".join(layers) + " |",
                "|---" * (1 + len(layers)) + "|",
            ]
            for arm, per in g["specialisation"].items():
                lines.append(f"| {arm} | " + " | ".join(_mean_sd(per.get(k), 3) for k in layers) + " |")
        for kind, path in g["plots"].items():
            lines += ["", f"![{g['name']} {kind}]({path})"]
    return "\n".join(lines) + "\n"


def _short(c: dict) -> str:
    s = c["summary"]
    if s is None:
        return "not run"
    text = f"{s['mean']:+.4f} [{_num(s['lo'], sign=True)}, {_num(s['hi'], sign=True)}], {s['n']} seeds"
    if c["ppl_change"] is not None:
        text += f" ({100 * c['ppl_change']:+.1f} % ppl)"
    return text


def _num(x: float | None, digits: int = 4, sign: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _mean_sd(s: dict | None, digits: int = 4) -> str:
    if not s:
        return "-"
    return f"{s['mean']:.{digits}f}" + (f" +- {s['sd']:.{digits}f}" if s["n"] > 1 else "")
