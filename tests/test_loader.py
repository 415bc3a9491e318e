"""The training data loader: prefetching in a background thread changes nothing about what is read."""

import threading
import time

import pytest
import torch

from diffmoe.data import PackedDataset
from diffmoe.data.loader import BatchStream, Prefetcher


@pytest.mark.parametrize("world", [1, 2, 3])
def test_prefetched_batches_equal_direct_batches_for_every_rank(tiny_dataset, world):
    data = PackedDataset(tiny_dataset, "train")
    start, n = len(data) // (3 * world) - 5, 12  # the micro-batches around the end of the first epoch
    assert start * 3 * world < len(data) < (start + n) * 3 * world
    seen = []
    for rank in range(world):
        direct = BatchStream(data, 3, seed=5, rank=rank, world=world)
        want = [direct.batch(k) for k in range(start, start + n)]
        with BatchStream(data, 3, seed=5, rank=rank, world=world).prefetch(start, depth=3) as batches:
            got = [next(batches) for _ in range(n)]
        for (a, b), (c, d) in zip(got, want):
            assert torch.equal(a, c) and torch.equal(b, d)
        seen.append(torch.stack([ids for ids, _ in got]))
    # ranks read different rows of each micro-batch: rank r takes rows r*3 .. r*3+2 of the global batch
    if world > 1:
        assert not torch.equal(seen[0], seen[1])


def test_an_error_in_the_loader_reaches_the_consumer_at_its_item():
    def fn(k):
        if k == 3:
            raise ValueError("row 3 is damaged")
        return k

    with Prefetcher(fn, 0, depth=2) as items:
        assert [next(items) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError, match="row 3 is damaged"):
            next(items)
        with pytest.raises(RuntimeError, match="closed"):
            next(items)


def test_prefetch_runs_ahead_and_stops_on_close():
    computed = []

    def fn(k):
        computed.append(k)
        return k

    items = Prefetcher(fn, 10, depth=2)
    deadline = time.time() + 5
    while len(computed) < 3 and time.time() < deadline:  # depth 2 queued + 1 waiting to be put
        time.sleep(0.01)
    assert computed[:3] == [10, 11, 12]
    assert next(items) == 10
    items.close()
    assert not any(t.name == "diffmoe-prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(computed) <= 6
