"""The report's plots, small PNGs from the runs' results (:data:`~diffmoe.repro.stats.Results`).

- ``curves``: held-out loss (all domains) against training tokens per arm: the mean over seeds, and a
  band from the lowest to the highest seed;
- ``domains``: held-out perplexity per domain and arm: the mean over seeds, +- one standard deviation;
- ``routing``: per MoE arm, the mean routing weights per domain and expert, one panel per layer (of its
  lowest finished seed: expert indices are arbitrary, so they do not line up across seeds);
- ``usage``: experts in use during training (the layers' own criterion, mean over layers) per arm.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .stats import Results

DPI = 80


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _seeds(results: Results, arm: str) -> list[dict]:
    return [results[arm][s] for s in sorted(results.get(arm, {}))]


def curves(results: Results, arms: list[str], path: Path, title: str) -> Path | None:
    return _over_training(
        results,
        arms,
        "curve",
        lambda p: p["tokens"] / 1e6,
        lambda p: p["all"],
        path,
        title,
        "training tokens (M)",
        "held-out loss, nats",
    )


def domains(results: Results, arms: list[str], path: Path, title: str) -> Path | None:
    plt = _plt()
    present = [a for a in arms if results.get(a)]
    if not present:
        return None
    names = [k[len("loss.") :] for k in _seeds(results, present[0])[0]["metrics"] if k.startswith("loss.")]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    width = 0.8 / len(present)
    for i, arm in enumerate(present):
        ppl = np.array([[math.exp(r["metrics"][f"loss.{d}"]) for d in names] for r in _seeds(results, arm)])
        sd = ppl.std(0, ddof=1) if len(ppl) > 1 else np.zeros(len(names))
        ax.bar(
            np.arange(len(names)) + (i - (len(present) - 1) / 2) * width,
            ppl.mean(0),
            width,
            yerr=sd,
            capsize=2,
            label=f"{arm} ({len(ppl)})",
        )
    ax.set_xticks(range(len(names)), names, fontsize=8)
    return _save(fig, ax, path, title, None, "held-out perplexity", True, plt)


def routing(results: Results, arm: str, path: Path, title: str) -> Path | None:
    from ..eval.analyze import plot_routing

    runs = _seeds(results, arm)
    if not runs or not runs[0].get("routing"):
        return None
    return plot_routing(runs[0]["routing"], path, title, dpi=DPI)


def usage(results: Results, arms: list[str], path: Path, title: str) -> Path | None:
    return _over_training(
        results,
        arms,
        "usage_curve",
        lambda p: p["step"],
        lambda p: np.mean([v for k, v in p.items() if k != "step"]),
        path,
        title,
        "step",
        "experts in use (mean over layers)",
    )


def _over_training(
    results: Results, arms: list[str], series: str, x, y, path: Path, title: str, xlabel: str, ylabel: str
) -> Path | None:
    """One line per arm: y(point) against x(point) over the points of each run's ``series``, the mean
    over seeds in a band from the lowest to the highest seed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    drawn = False
    for arm in arms:
        runs = [r[series] for r in _seeds(results, arm) if r.get(series)]
        if not runs:
            continue
        n = min(len(c) for c in runs)
        values = np.array([[y(p) for p in c[:n]] for c in runs])
        (line,) = ax.plot(
            [x(p) for p in runs[0][:n]], values.mean(0), marker="o", ms=2.5, lw=1.2, label=f"{arm} ({len(runs)})"
        )
        if len(runs) > 1:
            ax.fill_between(
                [x(p) for p in runs[0][:n]], values.min(0), values.max(0), color=line.get_color(), alpha=0.2, lw=0
            )
        drawn = True
    return _save(fig, ax, path, title, xlabel, ylabel, drawn, plt)


def _save(fig, ax, path: Path, title: str, xlabel: str | None, ylabel: str, drawn: bool, plt) -> Path | None:
    if not drawn:
        plt.close(fig)
        return None
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
