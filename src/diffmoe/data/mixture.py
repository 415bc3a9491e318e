"""Weighted mixtures of prepared datasets at training time (``data.mixture``).

Global sample position ``p`` (step ``s = p // G`` of the global batch ``G``, slot ``p % G``) is drawn
from dataset ``d`` by a pure function of ``(seed, G, p)``, so batches are the same on any number of ranks
and a resumed run reads what the uninterrupted one read:

1. step ``s`` takes ``floor(w_d G)`` rows from each dataset ``d`` plus, for the ``R = G - sum floor(w_d G)``
   rows left, one more from the datasets picked by systematic sampling of their fractional parts with an
   offset ``u_s`` drawn from ``(seed, s)``: each dataset's count per step is within one row of ``w_d G``
   and its expectation is exactly ``w_d G``;
2. the step's slots are assigned to those datasets by a seeded permutation of ``(seed, s)``;
3. the ``j``-th row ever drawn from dataset ``d`` is row ``perm_{d,e}[j mod n_d]`` of its epoch
   ``e = j // n_d`` (a seeded permutation per dataset and epoch): each dataset is read without
   replacement, epoch after epoch, whatever its weight.

Each dataset's packed rows keep their In-Context Pretraining order inside a row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..schema import ConfigError
from .dataset import PackedDataset
from .loader import Prefetcher

_CHUNK_STEPS = 4096


@dataclass(frozen=True)
class Source:
    """One dataset of a mixture: a name (for evaluation), its path and its weight (normalised to sum 1)."""

    name: str
    path: str
    weight: float


def sources_of(data_cfg) -> list[Source]:
    """The datasets a run trains on: ``data.mixture`` (weights normalised), else ``data.path`` alone."""
    if not data_cfg.mixture:
        return [Source(Path(str(data_cfg.path)).name or "data", str(data_cfg.path), 1.0)]
    total = float(sum(entry["weight"] for entry in data_cfg.mixture))
    names = [
        entry.get("name") or Path(str(entry["path"])).name or f"data{i}" for i, entry in enumerate(data_cfg.mixture)
    ]
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return [Source(name, str(entry["path"]), entry["weight"] / total) for name, entry in zip(unique, data_cfg.mixture)]


def open_datasets(sources: list[Source], split: str) -> list[PackedDataset]:
    """Each source's ``split``, checked to share a tokenizer (by its sha256) and a sequence length."""
    datasets = [PackedDataset(s.path, split) for s in sources]
    first, reference = datasets[0], datasets[0].manifest
    for source, dataset in zip(sources[1:], datasets[1:]):
        m = dataset.manifest
        if m["files"].get("tokenizer.json") != reference["files"].get("tokenizer.json"):
            raise ConfigError(
                f"invalid config: data.mixture: {source.path} has another tokenizer than "
                f"{sources[0].path} (tokenizer.json sha256 {m['files'].get('tokenizer.json', '?')[:12]} vs "
                f"{reference['files'].get('tokenizer.json', '?')[:12]}); prepare every dataset of a "
                "mixture with the same --tokenizer (e.g. the first dataset's directory)"
            )
        if dataset.row_len != first.row_len:
            raise ConfigError(
                f"invalid config: data.mixture: {source.path} has sequences of {dataset.context_len} "
                f"tokens, {sources[0].path} of {first.context_len}; prepare them with the same "
                "--context-len"
            )
    return datasets


class MixtureStream:
    """Micro-batch ``k`` of rank ``rank`` of ``world`` from a weighted mixture (see the module docstring).

    batch(k) -> (input_ids [B, C], labels [B, C]) int64: the B sequences at global positions
    (k * world + rank) * B ... of the mixture's sequence, with ``global_batch`` = G positions per step.
    """

    def __init__(
        self,
        datasets: list,
        weights: list[float],
        batch_size: int,
        seed: int,
        global_batch: int,
        rank: int = 0,
        world: int = 1,
    ):
        for d in datasets:
            if len(d) == 0:
                raise ConfigError(f"invalid config: data.mixture: {d.path} has no training rows")
        if global_batch % batch_size:
            raise ValueError(f"the global batch {global_batch} must be a multiple of the micro-batch {batch_size}")
        w = np.asarray(weights, dtype=np.float64)
        self.datasets, self.weights = datasets, w / w.sum()
        self.batch_size, self.seed, self.global_batch, self.rank, self.world = (
            batch_size,
            seed,
            global_batch,
            rank,
            world,
        )
        exact = self.weights * global_batch
        self.base = np.floor(exact).astype(np.int64)
        frac = exact - self.base
        self.remainder = int(global_batch - self.base.sum())
        self.bounds = np.concatenate([[0.0], np.cumsum(frac)])
        if self.remainder:
            self.bounds *= self.remainder / self.bounds[-1]
        self._before: np.ndarray = np.zeros((1, len(datasets)), dtype=np.int64)  # rows drawn before step s
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._slots: tuple = (-1, None, None)

    # ------------------------------------------------------------------------------------------ draws
    def counts(self, steps: np.ndarray) -> np.ndarray:
        """int64 [len(steps), datasets]: rows each step takes from each dataset."""
        steps = np.asarray(steps, dtype=np.int64)
        out = np.broadcast_to(self.base, (len(steps), len(self.base))).copy()
        if self.remainder:
            u = np.array([self._offset(int(s)) for s in steps])[:, None]
            out += (np.ceil(self.bounds[1:][None, :] - u) - np.ceil(self.bounds[:-1][None, :] - u)).astype(np.int64)
        return out

    def _offset(self, step: int) -> float:
        chunk = step // _CHUNK_STEPS
        return float(np.random.default_rng([self.seed, 0x6D6978, chunk]).random(_CHUNK_STEPS)[step % _CHUNK_STEPS])

    def drawn_before(self, step: int) -> np.ndarray:
        """int64 [datasets]: rows drawn from each dataset by the steps before ``step``."""
        have = len(self._before) - 1
        if step > have:
            counts = self.counts(np.arange(have, step))
            self._before = np.concatenate([self._before, self._before[-1] + np.cumsum(counts, axis=0)])
        return self._before[step]

    def step_slots(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset of each slot of ``step``, how many slots of the same dataset precede it): int64 [G] each."""
        if self._slots[0] != step:
            labels = np.repeat(np.arange(len(self.datasets)), self.counts(np.array([step]))[0])
            slots = np.random.default_rng([self.seed, 0x736C6F74, step]).permutation(labels)
            order = np.argsort(slots, kind="stable")
            first_of = np.searchsorted(slots[order], slots[order])  # first sorted position of each label
            within = np.empty(len(slots), dtype=np.int64)
            within[order] = np.arange(len(slots)) - first_of
            self._slots = (step, slots, within)
        return self._slots[1], self._slots[2]

    def rows(self, position: int, count: int) -> list[tuple[int, int]]:
        """(dataset, row) of global positions position ... position + count - 1 (within one step)."""
        step, first = divmod(position, self.global_batch)
        slots, within = self.step_slots(step)
        before = self.drawn_before(step)
        out = []
        for slot in range(first, first + count):
            d = int(slots[slot])
            j = int(before[d] + within[slot])  # the j-th row ever drawn from d
            n = len(self.datasets[d])
            out.append((d, int(self._perm(d, j // n)[j % n])))
        return out

    def _perm(self, dataset: int, epoch: int) -> np.ndarray:
        key = (dataset, epoch)
        if key not in self._perms:
            for old in [k for k in self._perms if k[0] == dataset]:
                del self._perms[old]
            self._perms[key] = np.random.default_rng([self.seed, 0x6D78, dataset, epoch]).permutation(
                len(self.datasets[dataset])
            )
        return self._perms[key]

    # ------------------------------------------------------------------------------------------ batches
    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = (k * self.world + self.rank) * self.batch_size
        items = [self.datasets[d][r] for d, r in self.rows(start, self.batch_size)]
        return torch.stack([it["input_ids"] for it in items]), torch.stack([it["labels"] for it in items])

    def prefetch(self, start: int, depth: int = 2) -> Prefetcher:
        """Batches start, start + 1, ... with the next ``depth`` assembled in a background thread."""
        return Prefetcher(self.batch, start, depth)


def check_mixture(mixture) -> None:
    """Validate ``data.mixture`` (a list of ``{path, weight[, name]}``), naming the offending entry."""
    from ..schema import check

    check(
        isinstance(mixture, list) and len(mixture) >= 1,
        "data.mixture",
        mixture,
        "must be a non-empty list of {path, weight} (or null: train on data.path)",
    )
    for i, entry in enumerate(mixture):
        where = f"data.mixture[{i}]"
        check(isinstance(entry, dict), where, entry, "must be a mapping with path and weight")
        unknown = sorted(set(entry) - {"path", "weight", "name"})
        check(
            not unknown,
            f"{where}.{unknown[0] if unknown else ''}",
            entry.get(unknown[0]) if unknown else None,
            "unknown key (known: path, weight, name)",
        )
        check(
            isinstance(entry.get("path"), (str, os.PathLike)) and str(entry.get("path")),
            f"{where}.path",
            entry.get("path"),
            "must name a prepared dataset directory",
        )
        weight = entry.get("weight")
        check(
            isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight > 0,
            f"{where}.weight",
            weight,
            "must be a positive number",
        )
        name = entry.get("name")
        check(
            name is None or (isinstance(name, str) and name and "/" not in name and "." not in name),
            f"{where}.name",
            name,
            "must be a non-empty string without '/' or '.'",
        )
