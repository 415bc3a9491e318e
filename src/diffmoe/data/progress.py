"""Progress of ``prepare``'s stages and the table of their timings.

On a terminal each stage shows a progress bar with its rate and ETA; otherwise (a log file, CI) it
writes a plain line at most every ``LINE_EVERY_S`` seconds and one when it ends, never carriage
returns. :class:`Timings` keeps each stage's wall time, documents and bytes for the closing table and
the manifest's ``run`` block.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm

LINE_EVERY_S = 30.0


@dataclass
class StageTime:
    """One stage's wall time, and the documents and bytes it went through (None: not applicable)."""

    stage: str
    seconds: float
    documents: int | None = None
    bytes: int | None = None

    def row(self) -> dict:
        s = max(self.seconds, 1e-9)
        return {
            "stage": self.stage,
            "seconds": round(self.seconds, 3),
            "documents_per_s": None if self.documents is None else round(self.documents / s, 1),
            "mb_per_s": None if self.bytes is None else round(self.bytes / 1e6 / s, 3),
        }


@dataclass
class Timings:
    """The stages' times, in order."""

    stages: list[StageTime] = field(default_factory=list)

    def add(self, stage: str, seconds: float, documents: int | None = None, nbytes: int | None = None) -> None:
        self.stages.append(StageTime(stage, seconds, documents, nbytes))

    @property
    def total(self) -> float:
        return sum(s.seconds for s in self.stages)

    def rows(self, documents: int, nbytes: int) -> list[dict]:
        """One row per stage, then ``total`` (end to end over ``documents`` and ``nbytes`` of input)."""
        return [s.row() for s in self.stages] + [StageTime("total", self.total, documents, nbytes).row()]

    def table(self, documents: int, nbytes: int) -> str:
        """A markdown table: stage, wall time, documents/s, MB/s."""
        lines = ["| stage | wall s | documents/s | MB/s |", "|---|---|---|---|"]
        for row in self.rows(documents, nbytes):
            rate = "" if row["documents_per_s"] is None else f"{row['documents_per_s']:,.0f}"
            mbs = "" if row["mb_per_s"] is None else f"{row['mb_per_s']:.2f}"
            lines.append(f"| {row['stage']} | {row['seconds']:.1f} | {rate} | {mbs} |")
        return "\n".join(lines)


class StageProgress:
    """Progress of one stage towards ``total`` units (``unit``: ``MB``, ``docs``, ``rows``, ``tasks``).

    ``update(done)`` sets the units done so far (from any thread); ``close()`` ends the stage. Silent
    when ``enabled`` is false.
    """

    def __init__(self, stage: str, total: float, unit: str, enabled: bool = True, stream=None):
        self.stage, self.total, self.unit, self.enabled = stage, max(float(total), 0.0), unit, enabled
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.done = 0.0
        self._last_line = self.start
        self.bar = None
        if enabled and _is_terminal(self.stream):
            self.bar = tqdm(
                total=round(self.total, 2),
                desc=stage,
                unit=f" {unit}",
                file=self.stream,
                dynamic_ncols=True,
                leave=True,
                unit_scale=False,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f}{unit} "
                "[{elapsed}<{remaining}, {rate_fmt}]",
            )

    def update(self, done: float) -> None:
        done = min(float(done), self.total)
        if done <= self.done:
            return
        if self.bar is not None:
            self.bar.update(round(done - self.done, 2))
        self.done = done
        now = time.perf_counter()
        if self.enabled and self.bar is None and now - self._last_line >= LINE_EVERY_S:
            self._last_line = now
            self._line(now)

    def close(self) -> None:
        if self.bar is not None:
            self.update(self.total)
            self.bar.close()
        elif self.enabled:
            self.done = self.total
            self._line(time.perf_counter(), final=True)

    def _line(self, now: float, final: bool = False) -> None:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if final:
            text = f"{self.stage}: done, {self.total:,.1f} {self.unit} in {elapsed:.1f} s ({rate:,.1f} {self.unit}/s)"
        else:
            pct = 100 * self.done / self.total if self.total else 100.0
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            text = (
                f"{self.stage}: {pct:.0f}% ({self.done:,.1f}/{self.total:,.1f} {self.unit}, {rate:,.1f} "
                f"{self.unit}/s, ETA {_clock(eta)})"
            )
        print(text, file=self.stream, flush=True)


def _clock(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
