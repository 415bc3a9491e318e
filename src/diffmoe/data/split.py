"""Content hashes and the held-out split: whole documents, a fixed fraction of each domain, chosen by a seeded hash.

A document's place in the ranking depends only on its content hash and the seed, so the held-out set
does not change with the input order, the batching method or the other documents of its domain
beyond their number.
"""

from __future__ import annotations

import hashlib

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def content_key(text: str) -> int:
    """64-bit content hash of a document (equal texts, equal keys)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a fast, well-mixed uint64 -> uint64 hash (vectorised)."""
    x = np.asarray(x, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x & _MASK64


def heldout_mask(
    domain_ids: np.ndarray, keys: np.ndarray, eligible: np.ndarray, fraction: float, seed: int
) -> np.ndarray:
    """bool [n]: documents held out.

    Among the ``eligible`` documents of each domain, the ``round(fraction * count)`` with the smallest
    seeded hash of their content ``keys`` are held out — at least one when ``fraction > 0`` and the
    domain has two or more documents, and never all of them.
    """
    scores = mix64(keys ^ mix64(np.array([seed], dtype=np.uint64))[0])
    held = np.zeros(len(keys), dtype=bool)
    if fraction <= 0:
        return held
    for domain in np.unique(domain_ids[eligible]):
        members = np.flatnonzero(eligible & (domain_ids == domain))
        count = len(members)
        take = min(max(int(round(fraction * count)), 1), count - 1)
        if take <= 0:
            continue
        ranked = members[np.lexsort((members, scores[members]))]
        held[ranked[:take]] = True
    return held
