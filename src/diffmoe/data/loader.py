"""The training data loader: micro-batch ``k`` of a deterministic, endless pass over a prepared split,
assembled ahead of the training step in a background thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from ..schema import ConfigError


class BatchStream:
    """Micro-batch ``k`` of a deterministic, endless pass over a dataset in seeded epoch permutations.

    batch(k) -> (input_ids [B, C], labels [B, C]) int64, where rank r of W takes the B sequences at
    positions (k * W + r) * B ... + B - 1 of the concatenated permutations. A pure function of
    (seed, k, rank, world), so a resumed run reads what the uninterrupted run read.
    """

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if len(dataset) == 0:
            raise ConfigError(f"invalid config: data.path={str(dataset.path)!r}: the train split has no rows")
        self.dataset, self.batch_size, self.seed, self.rank, self.world = dataset, batch_size, seed, rank, world
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))}
        return self._perms[epoch]

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.dataset)
        start = (k * self.world + self.rank) * self.batch_size
        rows = [int(self._perm(p // n)[p % n]) for p in range(start, start + self.batch_size)]
        items = [self.dataset[i] for i in rows]
        return torch.stack([it["input_ids"] for it in items]), torch.stack([it["labels"] for it in items])

    def prefetch(self, start: int, depth: int = 2) -> "Prefetcher":
        """Batches start, start + 1, ... with the next ``depth`` assembled in a background thread; use it
        as a context manager (``with stream.prefetch(k) as batches: next(batches)``)."""
        return Prefetcher(self.batch, start, depth)


class Prefetcher:
    """Iterates fn(start), fn(start + 1), ... computed by a daemon thread up to ``depth`` items ahead.

    The stream is endless: an exception raised by fn reaches the consumer at the item that raised it and
    closes the prefetcher. :meth:`close` (also on leaving a ``with`` block) stops the thread; items
    already computed are dropped, and asking for more is an error.
    """

    def __init__(self, fn: Callable[[int], Any], start: int, depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(fn, start), daemon=True, name="diffmoe-prefetch")
        self._thread.start()

    def _work(self, fn: Callable[[int], Any], k: int) -> None:
        while not self._stop.is_set():
            try:
                item = (fn(k), None)
            except BaseException as err:  # handed to the consumer, which re-raises it
                item = (None, err)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[1] is not None:
                return
            k += 1

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._stop.is_set():
            raise RuntimeError("the prefetcher is closed (after an error in the loader, or by close())")
        while True:
            try:
                value, err = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the prefetching thread stopped without a batch or an error") from None
        if err is not None:
            self.close()
            raise err
        return value

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
