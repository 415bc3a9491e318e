"""Held-out evaluation during training: loss and perplexity per domain on a fixed set of rows."""

from __future__ import annotations

from ..eval.perplexity import evaluate


class Evaluator:
    """Evaluates a model on ``max_batches`` x ``batch_size`` evenly spaced held-out rows (all of them
    when ``max_batches`` is None), the batches shared out over the ``world`` ranks and the sums
    all-reduced, so every rank gets the same result, that of one process."""

    def __init__(self, heldout, batch_size: int, max_batches: int | None, rank: int = 0, world: int = 1):
        self.heldout, self.batch_size, self.max_batches = heldout, batch_size, max_batches
        self.rank, self.world = rank, world

    def __call__(self, model) -> dict[str, dict]:
        """{domain: {"tokens", "loss", "ppl"}} plus "all" (see :func:`diffmoe.eval.perplexity.evaluate`)."""
        return evaluate(model, self.heldout, self.batch_size, self.max_batches, rank=self.rank, world=self.world)
