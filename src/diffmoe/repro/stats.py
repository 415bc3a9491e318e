"""Paired comparisons over seeds, their intervals and verdicts.

A comparison is a signed sum of metrics of a group's arms, computed per seed (arms of one seed share
their data order and initial weights, so the seed-to-seed noise they share cancels) and summarised by
its mean, standard deviation and Student-t 95 % interval over the seeds where every term was measured.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .spec import Comparison, Group

# two-sided 95 % Student-t quantiles t(0.975, df), df = 1 .. 30
_T95 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t95(df: int) -> float:
    """The two-sided 95 % quantile of Student's t with ``df`` degrees of freedom (normal beyond 30)."""
    return _T95[df - 1] if df <= len(_T95) else 1.960


@dataclass
class Summary:
    """Mean, sample standard deviation and 95 % interval of per-seed values (no interval for one seed)."""

    values: dict[int, float]
    mean: float
    sd: float
    lo: float
    hi: float

    @property
    def n(self) -> int:
        return len(self.values)

    def to_dict(self) -> dict:
        return {**asdict(self), "values": {str(k): v for k, v in self.values.items()}, "n": self.n}


def summarise(values: dict[int, float]) -> Summary | None:
    if not values:
        return None
    xs = list(values.values())
    n = len(xs)
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    half = t95(n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    return Summary(values, mean, sd, mean - half, mean + half)


Results = dict[str, dict[int, dict]]
"""{arm: {seed: result.json contents}}."""


def metric(results: Results, arm: str, seed: int, name: str) -> float | None:
    value = results.get(arm, {}).get(seed, {}).get("metrics", {}).get(name)
    return None if value is None or not math.isfinite(value) else float(value)


def paired(comparison: Comparison, results: Results, seeds: range) -> Summary | None:
    """The comparison's value per seed where every term is measured, summarised."""
    values = {}
    for seed in seeds:
        terms = [metric(results, t.arm, seed, t.metric) for t in comparison.terms]
        if all(v is not None for v in terms):
            values[seed] = sum(t.sign * v for t, v in zip(comparison.terms, terms))
    return summarise(values)


def arm_spread(comparison: Comparison, results: Results, seeds: range) -> dict[str, Summary]:
    """Each term's metric alone over the seeds (its seed-to-seed spread), by ``arm:metric``."""
    out = {}
    for t in comparison.terms:
        values = {s: v for s in seeds if (v := metric(results, t.arm, s, t.metric)) is not None}
        summary = summarise(values)
        if summary is not None:
            out[f"{t.arm}:{t.metric}"] = summary
    return out


def verdict(comparison: Comparison, s: Summary | None) -> str:
    """Whether the measurement agrees with the paper's sign: ``yes`` / ``no`` when the 95 % interval
    excludes 0 on the paper's / the other side (``comparable``: lies within / outside +-margin),
    ``inconclusive`` otherwise or with fewer than 2 seeds. ``open`` comparisons answer ``lower`` /
    ``higher`` / ``no difference detected``; ``not run`` without measurements."""
    if s is None:
        return "not run"
    if s.n < 2:
        return "inconclusive (1 seed)" if comparison.expect != "open" else "no difference detected (1 seed)"
    below, above = s.hi < 0, s.lo > 0
    if comparison.expect == "negative":
        return "yes" if below else "no" if above else "inconclusive"
    if comparison.expect == "positive":
        return "yes" if above else "no" if below else "inconclusive"
    if comparison.expect == "comparable":
        m = comparison.margin
        return "yes" if -m <= s.lo and s.hi <= m else "no" if s.lo > m or s.hi < -m else "inconclusive"
    return "lower" if below else "higher" if above else "no difference detected"


def claim_verdict(group: Group, verdicts: list[str]) -> str:
    """The claim's verdict from its key comparisons' verdicts (in the group's order): ``no`` when any
    disagrees, ``not run`` when none was measured, ``partly run`` when some were not, ``yes`` when all
    agree, else ``inconclusive``; an open question is ``answered`` once all its key rows are measured."""
    key = [v for c, v in zip(group.comparisons, verdicts) if c.key]
    if all(v == "not run" for v in key):
        return "not run"
    if any(c.expect == "open" for c in group.comparisons if c.key):
        return "answered" if "not run" not in key else "partly run"
    if any(v == "no" for v in key):
        return "no"
    if "not run" in key:
        return "partly run"
    return "yes" if all(v == "yes" for v in key) else "inconclusive"
