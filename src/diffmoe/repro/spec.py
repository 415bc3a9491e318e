"""The experiment definitions under ``experiments/``: suites, arms and groups, read from YAML.

- ``suites/<suite>.yaml``: the model size, data and hyper-parameters every arm starts from, the seeds,
  the datasets arms may train on, and ``vars`` (sizes that scale with the suite, e.g. ``$T``).
- ``arms/<arm>.yaml``: one trained configuration: overrides of the suite's run config (only the factor
  an arm varies), the dataset it trains on.
- ``groups/<NN-name>.yaml``: one claim: its arms, what the paper found, and the comparisons that test
  it, each a signed sum of per-seed metrics of arms (see :mod:`diffmoe.repro.stats`).

An arm is the same YAML in every suite; ``"$name"`` values are replaced by the suite's ``vars``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..schema import ConfigError

EXPECT = ("negative", "positive", "comparable", "open")
PLOTS = ("curves", "domains", "routing", "usage")
METRIC = re.compile(
    r"^((loss|after_T|first_T|after_half|prompt|prompt_half|at\d+)\.\w+|spec\.(layer\d+|upper_minus_first)"
    r"|experts_per_segment|seconds_per_step|train_minutes)$"
)
"""The metrics a run records (:func:`diffmoe.repro.runner.measure`)."""


@dataclass
class Suite:
    """Everything an arm of this suite starts from."""

    name: str
    description: str
    seeds: int
    run: dict
    """A RunConfig as a dict (model / data / train) without ``data.path``."""
    datasets: dict[str, dict]
    """Name -> PrepareConfig options (``context_len``, ``vocab_size``, ``batching``, ``embedding``)."""
    corpus_mb: float | None = 4.0
    """The built-in corpus's cap per domain (MB of text; None: all of it)."""
    vars: dict[str, Any] = field(default_factory=dict)


@dataclass
class Arm:
    name: str
    description: str
    run: dict = field(default_factory=dict)
    """Overrides of the suite's run config, merged key by key."""
    dataset: str = "similarity"
    requires: list[str] = field(default_factory=list)
    """Python modules the arm needs (e.g. an optional extra); a missing one skips the arm, loudly."""


@dataclass
class Term:
    sign: int
    arm: str
    metric: str


@dataclass
class Comparison:
    """sum(sign x metric of arm) per seed; its mean over seeds is tested against ``expect``."""

    name: str
    terms: list[Term]
    expect: str
    """``negative`` / ``positive``: the paper's sign; ``comparable``: |value| within ``margin``."""
    margin: float = 0.0
    key: bool = True
    """Whether the claim's verdict rests on this comparison (else it is a detail row)."""


@dataclass
class Group:
    name: str
    claim: str
    title: str
    paper: str
    arms: list[str]
    comparisons: list[Comparison]
    notes: str = ""
    discussion: str = ""
    """Written after the runs, without numbers: why a sign disagrees or stays inconclusive (scale, tokens,
    data), so that the report says it beside the measurement."""
    plots: list[str] = field(default_factory=lambda: ["curves", "domains"])


def _read(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"experiment file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping, got {type(data).__name__}")
    return data


def _fields(path: Path, data: dict, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    missing = [k for k in required if k not in data]
    unknown = [k for k in data if k not in required + optional]
    if missing:
        raise ConfigError(f"{path}: missing field(s) {', '.join(missing)}")
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {', '.join(unknown)}; known: {', '.join(required + optional)}")


@dataclass
class Experiments:
    """The ``experiments/`` directory: suites, arms and groups by name."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not (self.root / "groups").is_dir():
            raise ConfigError(
                f"{self.root}: not an experiments directory (no groups/ inside); run from the "
                "repository root or pass --experiments"
            )

    def suite(self, name: str) -> Suite:
        path = self.root / "suites" / f"{name}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in (self.root / "suites").glob("*.yaml"))
            raise ConfigError(f"unknown suite {name!r}: no {path}; known: {', '.join(known)}")
        data = _read(path)
        _fields(path, data, ("description", "seeds", "run", "datasets"), ("corpus_mb", "vars"))
        suite = Suite(name=name, **data)
        if not isinstance(suite.seeds, int) or suite.seeds < 1:
            raise ConfigError(f"{path}: seeds={suite.seeds!r} must be a positive integer")
        return suite

    def arm(self, name: str) -> Arm:
        path = self.root / "arms" / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown arm {name!r}: no {path}")
        data = _read(path)
        _fields(path, data, ("description",), ("run", "dataset", "requires"))
        return Arm(name=name, **data)

    def group_names(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "groups").glob("*.yaml"))

    def group(self, name: str) -> Group:
        path = self.root / "groups" / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown group {name!r}; known: {', '.join(self.group_names())}")
        data = _read(path)
        _fields(path, data, ("claim", "title", "paper", "arms", "comparisons"), ("notes", "discussion", "plots"))
        comparisons = [_comparison(path, i, c, data["arms"]) for i, c in enumerate(data.pop("comparisons"))]
        unknown = [p for p in data.get("plots", ()) if p not in PLOTS]
        if unknown:
            raise ConfigError(f"{path}: unknown plot(s) {', '.join(unknown)}; choose from {', '.join(PLOTS)}")
        return Group(name=name, comparisons=comparisons, **data)

    def groups(self, only: list[str] | None = None) -> list[Group]:
        """All groups in name order, or those whose name (or its part after ``NN-``) is in ``only``."""
        names = self.group_names()
        if only:
            short = {n.split("-", 1)[-1]: n for n in names}
            unknown = [o for o in only if o not in names and o not in short]
            if unknown:
                raise ConfigError(f"unknown group(s) {', '.join(unknown)}; known: {', '.join(names)}")
            names = [n for n in names if n in only or n.split("-", 1)[-1] in only]
        return [self.group(n) for n in names]


def _comparison(path: Path, index: int, data: Any, arms: list[str]) -> Comparison:
    where = f"{path}: comparisons[{index}]"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping")
    _fields(Path(where), data, ("name", "terms", "expect"), ("margin", "key"))
    if not isinstance(data["terms"], list) or not data["terms"]:
        raise ConfigError(f'{where}: terms must be a non-empty list of "[-]ARM:METRIC" strings')
    terms = []
    for raw in data["terms"]:
        if not isinstance(raw, str):
            raise ConfigError(f'{where}: term {raw!r} must be a string "[-]ARM:METRIC" (quote it in YAML)')
        sign, text = (-1, raw[1:]) if raw.startswith("-") else (1, raw.lstrip("+"))
        arm, sep, metric = text.partition(":")
        if not sep or arm not in arms:
            raise ConfigError(
                f"{where}: term {raw!r} must be [-]ARM:METRIC with ARM one of the group's arms ({', '.join(arms)})"
            )
        if not METRIC.match(metric):
            raise ConfigError(f"{where}: term {raw!r}: unknown metric {metric!r}; see diffmoe.repro.runner.measure")
        terms.append(Term(sign, arm, metric))
    if data["expect"] not in EXPECT:
        raise ConfigError(f"{where}: expect={data['expect']!r}: choose one of {', '.join(EXPECT)}")
    return Comparison(
        name=data["name"],
        terms=terms,
        expect=data["expect"],
        margin=float(data.get("margin", 0.0)),
        key=bool(data.get("key", True)),
    )


def check_group(suite: Suite, group: Group, arms: dict[str, Arm]) -> None:
    """Refuse, before anything trains, a group whose arms do not build in ``suite`` or whose terms ask for
    an evaluation a run never makes (``at<pct>`` off its evaluation steps)."""
    if "T" not in suite.vars:
        raise ConfigError(f"suite {suite.name}: vars must define T (the segment length the metrics split at)")
    for name in group.arms:
        arm = arms[name]
        if arm.dataset not in suite.datasets:
            raise ConfigError(
                f"arm {name}: dataset {arm.dataset!r} is not one of suite {suite.name}'s ({', '.join(suite.datasets)})"
            )
        run_config(suite, arm, 0, "data")
    for c in group.comparisons:
        for t in c.terms:
            cfg = run_config(suite, arms[t.arm], 0, "data")
            pct = re.match(r"at(\d+)\.", t.metric)
            if pct:
                steps, every = cfg.train.steps, cfg.train.eval_every
                evaluated = {round(100 * k / steps) for k in range(every, steps + 1, every)} | {100}
                if int(pct[1]) not in evaluated:
                    raise ConfigError(
                        f"group {group.name}: {t.arm}:{t.metric}: arm {t.arm} in suite {suite.name} "
                        f"evaluates at {', '.join(f'{p} %' for p in sorted(evaluated))} of its steps"
                    )


def merge(base: dict, override: dict) -> dict:
    """``base`` with ``override`` merged in, mapping by mapping (other values replace)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def substitute(data: Any, values: dict[str, Any], where: str) -> Any:
    """Replace every string ``"$name"`` in ``data`` by ``values[name]``."""
    if isinstance(data, dict):
        return {k: substitute(v, values, f"{where}.{k}") for k, v in data.items()}
    if isinstance(data, list):
        return [substitute(v, values, where) for v in data]
    if isinstance(data, str) and data.startswith("$"):
        if data[1:] not in values:
            raise ConfigError(f"{where}: {data} is not one of the suite's vars ({', '.join(values) or 'none'})")
        return values[data[1:]]
    return data


def run_config(suite: Suite, arm: Arm, seed: int, data_path: str | Path) -> RunConfig:
    """The arm's RunConfig in ``suite`` for ``seed``, training on ``data_path``."""
    data = substitute(merge(suite.run, arm.run), suite.vars, f"arm {arm.name}")
    data = merge(data, {"data": {"path": str(data_path)}, "train": {"seed": seed}})
    try:
        return RunConfig.from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"arm {arm.name} in suite {suite.name}: {err}") from None


def dataset_recipe(suite: Suite, name: str) -> dict:
    """How dataset ``name`` is prepared: its options, and those of the suite's first dataset when that
    one's tokenizer is reused (every dataset but the first)."""
    first = next(iter(suite.datasets))
    recipe = dict(suite.datasets[name])
    if name != first:
        recipe["tokenizer_of"] = suite.datasets[first]
    return recipe


def run_key(suite: Suite, arm: Arm, seed: int) -> str:
    """A short hash of what the run trains (config and dataset recipe, not where they live): a changed
    arm or suite trains anew in a new directory instead of resuming a different run."""
    cfg = run_config(suite, arm, seed, "data").to_dict()
    recipe = {"run": cfg, "dataset": dataset_recipe(suite, arm.dataset), "corpus_mb": suite.corpus_mb}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
