"""Held-out evaluation during training: loss and perplexity per domain on a fixed set of rows (per
dataset and domain for a mixture)."""

from __future__ import annotations

import math

from ..eval.perplexity import evaluate


class Evaluator:
    """Evaluates a model on ``max_batches`` x ``batch_size`` evenly spaced held-out rows (all of them
    when ``max_batches`` is None), the batches shared out over the ``world`` ranks and the sums
    all-reduced, so every rank gets the same result, that of one process.

    ``heldout``: one dataset's held-out split, or ``{name: split}`` for a mixture (each evaluated so).
    """

    def __init__(self, heldout, batch_size: int, max_batches: int | None, rank: int = 0, world: int = 1):
        self.heldout, self.batch_size, self.max_batches = heldout, batch_size, max_batches
        self.rank, self.world = rank, world

    def __call__(self, model) -> dict[str, dict]:
        """{domain: {"tokens", "loss", "ppl"}} plus "all" (see :func:`diffmoe.eval.perplexity.evaluate`); for
        a mixture, {"NAME/domain": ...} and "NAME/all" per dataset, and "all" over every dataset's tokens."""
        if not isinstance(self.heldout, dict):
            return self._evaluate(model, self.heldout)
        out, tokens, loss = {}, 0, 0.0
        for name, dataset in self.heldout.items():
            result = self._evaluate(model, dataset)
            out.update({f"{name}/{domain}": v for domain, v in result.items()})
            tokens += result["all"]["tokens"]
            loss += result["all"]["loss"] * result["all"]["tokens"]
        mean = loss / max(tokens, 1)
        out["all"] = {"tokens": tokens, "loss": mean, "ppl": math.exp(mean)}
        return out

    def _evaluate(self, model, dataset) -> dict[str, dict]:
        return evaluate(model, dataset, self.batch_size, self.max_batches, rank=self.rank, world=self.world)
