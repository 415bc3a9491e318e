"""The two datatrove classes :mod:`.engine` uses, at module level so that they pickle by reference (to
a forkserver, a Slurm array or a Ray worker). Imported only when a stage runs."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from loguru import logger


class TaskStep(PipelineStep):
    """Runs task ``rank`` of a :class:`~diffmoe.data.engine.ShardStage` (nothing when it is marked done)."""

    name = "task"
    type = "diffmoe prepare"

    def __init__(self, stage, work: Path):
        super().__init__()
        self.name = stage.name
        self.stage, self.work = stage, str(work)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from .engine import run_marked_task

        run_marked_task(self.stage, Path(self.work), rank)
        yield from ()


class QuietLocalExecutor(LocalPipelineExecutor):
    """``LocalPipelineExecutor`` with datatrove's console log silenced in the workers (diffmoe shows its
    own progress; errors reach the caller as exceptions)."""

    def run(self):
        with _main_hidden():
            return super().run()

    def _launch_run_for_rank(self, rank, ranks_q, completed=None, completed_lock=None):
        logger.disable("datatrove")
        return super()._launch_run_for_rank(rank, ranks_q, completed, completed_lock)


@contextmanager
def _main_hidden():
    """Start worker processes without re-importing the caller's ``__main__`` (what spawn and forkserver
    do by default): a script that calls ``prepare`` at top level, without ``if __name__ == "__main__":``,
    would otherwise run again in every worker. The tasks need nothing from ``__main__``."""
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.update(saved)
        if "__spec__" not in saved:
            del main.__spec__
