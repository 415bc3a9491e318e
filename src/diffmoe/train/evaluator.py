"""Held-out evaluation during training: loss and perplexity per domain on a fixed set of rows."""

from __future__ import annotations

from ..eval.perplexity import evaluate


class Evaluator:
    """Evaluates a model on ``max_batches`` x ``batch_size`` evenly spaced held-out rows (all of them
    when ``max_batches`` is None); every rank evaluates the same rows, so all ranks agree."""

    def __init__(self, heldout, batch_size: int, max_batches: int | None):
        self.heldout, self.batch_size, self.max_batches = heldout, batch_size, max_batches

    def __call__(self, model) -> dict[str, dict]:
        """{domain: {"tokens", "loss", "ppl"}} plus "all" (see :func:`diffmoe.eval.perplexity.evaluate`)."""
        return evaluate(model, self.heldout, self.batch_size, self.max_batches)
