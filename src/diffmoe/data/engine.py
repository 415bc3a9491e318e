"""The engine that runs ``prepare``'s per-shard stages: datatrove's executors.

A :class:`ShardStage` is a list of independent tasks (read + tokenize one group of files, embed one
shard's documents, write one output shard, ...). :meth:`Engine.run` hands a stage to a datatrove
executor, one datatrove task per stage task:

- ``local``: ``LocalPipelineExecutor``, ``workers`` tasks at a time on this machine (default: all cores);
- ``slurm``: ``SlurmPipelineExecutor``: an sbatch array over the unfinished tasks; this process waits for
  their markers, polling every ``poll_s`` seconds, and fails when the array ends without them;
- ``ray``: ``RayPipelineExecutor`` on the Ray cluster (``ray.init(**init)`` when none is connected).

The executor's own options (partition, time, cpus_per_task, mem_per_cpu_gb, sbatch_args,
env_command, ...) come from a YAML file (:meth:`EngineConfig.from_yaml`), with per-stage overrides under
``stages:`` (``embed: {gpus_per_task: 1}``).

Every task writes its outputs under temporary names and renames them, then its *marker*
(``work/markers/STAGE/NNNNN.json``); a task with a marker is never run again, so a killed ``prepare``
resumes where it stopped. A task runs on one thread (BLAS, OpenMP, torch, tokenizers): its results never
depend on a thread count, and ``workers`` tasks use ``workers`` cores.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import tmp_path
from .errors import DataError
from .progress import StageProgress

EXECUTORS = ("local", "slurm", "ray")
_RESERVED = {"pipeline", "tasks", "logging_dir", "depends", "skip_completed", "workers"}
_PROGRESS_EVERY_S = 0.5


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class StageError(RuntimeError):
    """A stage's tasks did not all finish (a cluster job failed or was cancelled); the message says where
    their logs are."""


# ------------------------------------------------------------------------------------------ stages
class ShardStage(ABC):
    """A stage of independent tasks. Subclasses hold only paths and options (they are pickled to the
    workers); they load their inputs inside :meth:`run_task` and write their outputs atomically."""

    name: str = "stage"
    unit: str = "tasks"
    """What :meth:`sizes` counts, for progress: ``MB``, ``docs``, ``rows`` or ``tasks``."""

    @abstractmethod
    def sizes(self) -> list[float]:
        """Work per task, in ``unit`` (its length is the number of tasks)."""

    @abstractmethod
    def run_task(self, index: int, progress: "TaskProgress") -> dict:
        """Run task ``index``; returns what its marker records (JSON-able)."""


class Markers:
    """Completion markers of one stage: ``work/markers/STAGE/NNNNN.json``."""

    def __init__(self, work: Path, stage: str):
        self.directory = Path(work) / "markers" / stage

    def path(self, index: int) -> Path:
        return self.directory / f"{index:05d}.json"

    def done(self, index: int) -> bool:
        return self.path(index).is_file()

    def read(self, index: int) -> dict:
        return json.loads(self.path(index).read_text("utf-8"))["info"]

    def write(self, index: int, info: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(index)
        tmp = tmp_path(path)
        tmp.write_text(json.dumps({"task": index, "finished": time.time(), "info": info}), encoding="utf-8")
        os.replace(tmp, path)


class TaskProgress:
    """A task's units done, written to ``work/progress/STAGE/NNNNN`` at most every half second for the
    coordinator's progress display."""

    def __init__(self, work: Path, stage: str, index: int):
        self.path = Path(work) / "progress" / stage / f"{index:05d}"
        self.done = 0.0
        self._last = 0.0

    def advance(self, units: float) -> None:
        self.done += units
        now = time.monotonic()
        if now - self._last >= _PROGRESS_EVERY_S:
            self._last = now
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = tmp_path(self.path)
            tmp.write_text(f"{self.done}", encoding="utf-8")
            os.replace(tmp, self.path)


# ------------------------------------------------------------------------------------------ tasks
def run_marked_task(stage: ShardStage, work: Path, index: int) -> None:
    """Run task ``index`` of ``stage`` unless its marker exists, on one thread (BLAS, OpenMP, torch and the
    tokenizers' pool alike: a task is one core, parallelism comes from running tasks side by side, and no
    result depends on a thread count), then mark it."""
    markers = Markers(work, stage.name)
    if markers.done(index):
        return
    from threadpoolctl import threadpool_limits

    torch_threads = _torch_threads(1)
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by every encode_batch call
    try:
        with threadpool_limits(limits=1):
            info = stage.run_task(index, TaskProgress(work, stage.name, index))
    finally:
        _torch_threads(torch_threads)
        if parallelism is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallelism
    markers.write(index, info)


def _torch_threads(n: int | None) -> int | None:
    import sys

    torch = sys.modules.get("torch")
    if torch is None or n is None:
        return None
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before


@dataclass
class EngineConfig:
    """How the per-shard stages run (not part of what ``prepare`` computes: any engine gives the same bytes)."""

    executor: str = "local"
    """``local``, ``slurm`` or ``ray``."""
    workers: int | None = None
    """local: tasks at a time (None: all cores); slurm / ray: at most this many at once (None: no limit)."""
    options: dict = field(default_factory=dict)
    """Keyword arguments of the datatrove executor (``partition``, ``time``, ``cpus_per_task``, ...)."""
    stages: dict = field(default_factory=dict)
    """Per-stage overrides of ``options``: ``{"embed": {"gpus_per_task": 1}}``."""
    init: dict = field(default_factory=dict)
    """ray: arguments of ``ray.init`` when no cluster is connected yet (``{"address": "auto"}``)."""
    poll_s: float = 30.0
    """slurm: seconds between checks of the array's markers."""

    def validate(self) -> None:
        if self.executor not in EXECUTORS:
            raise DataError(f"invalid executor={self.executor!r}: choose one of {', '.join(EXECUTORS)}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise DataError(f"invalid workers={self.workers!r}: must be an integer >= 1")
        allowed = _executor_parameters(self.executor)
        for where, options in [("", self.options)] + [(f"stages.{s}.", o) for s, o in self.stages.items()]:
            if not isinstance(options, dict):
                raise DataError(f"executor config: {where or 'options'} must be a mapping, got {options!r}")
            for key in options:
                if key in _RESERVED:
                    raise DataError(
                        f"executor config: {where}{key} is set by diffmoe prepare itself"
                        + (" (use --workers)" if key == "workers" else "")
                    )
                if key not in allowed:
                    raise DataError(
                        f"executor config: unknown {self.executor} option {where}{key}; the "
                        f"{_executor_class_name(self.executor)} takes {', '.join(sorted(allowed))}"
                    )
        if self.executor == "slurm":
            for key in ("partition", "time"):
                if key not in self.options:
                    raise DataError(f"executor slurm needs {key!r} in --executor-config (sbatch's --{key})")

    @classmethod
    def from_yaml(
        cls, path: str | os.PathLike | None, executor: str = "local", workers: int | None = None
    ) -> "EngineConfig":
        """The engine of ``--executor`` / ``--workers`` with the executor options of a YAML file (keys: the
        executor's arguments, plus ``stages:``, ``init:`` (ray) and ``poll_s:`` (slurm))."""
        data: dict = {}
        if path is not None:
            import yaml

            try:
                data = yaml.safe_load(Path(path).read_text("utf-8")) or {}
            except (OSError, yaml.YAMLError) as e:
                raise DataError(f"{path}: not a readable executor config ({e})") from None
            if not isinstance(data, dict):
                raise DataError(f"{path}: an executor config is a mapping of option: value")
        data = dict(data)
        poll_s = data.pop("poll_s", 30.0)
        if not isinstance(poll_s, (int, float)) or isinstance(poll_s, bool) or poll_s <= 0:
            raise DataError(f"executor config: poll_s={poll_s!r}: must be a positive number of seconds")
        config = cls(
            executor=executor,
            workers=workers,
            stages=data.pop("stages", None) or {},
            init=data.pop("init", None) or {},
            poll_s=float(poll_s),
            options=data,
        )
        config.validate()
        return config


def _executor_class_name(executor: str) -> str:
    return {"local": "LocalPipelineExecutor", "slurm": "SlurmPipelineExecutor", "ray": "RayPipelineExecutor"}[executor]


def _executor_class(executor: str):
    try:
        if executor == "local":
            from datatrove.executor import LocalPipelineExecutor as cls
        elif executor == "slurm":
            from datatrove.executor import SlurmPipelineExecutor as cls
        else:
            from datatrove.executor import RayPipelineExecutor as cls
    except ImportError as e:
        raise DataError(f"executor {executor} needs datatrove: pip install datatrove ({e})") from None
    return cls


def _executor_parameters(executor: str) -> set[str]:
    return set(inspect.signature(_executor_class(executor).__init__).parameters) - {"self"}


class Engine:
    """Runs :class:`ShardStage` s on datatrove executors, with markers and progress (see the module docstring)."""

    def __init__(self, config: EngineConfig, work: Path, show_progress: bool = True):
        config.validate()
        self.config, self.work, self.show_progress = config, Path(work), show_progress
        self.workers = config.workers or (cpu_count() if config.executor == "local" else None)
        self.tasks_run: dict[str, dict] = {}
        """stage -> {"tasks": how many, "ran": how many this run ran (the others were marked done)}."""

    def describe(self) -> dict:
        return {"executor": self.config.executor, "workers": self.workers}

    def run(self, stage: ShardStage) -> list[dict]:
        """Run every unmarked task of ``stage``; returns each task's marker info, in task order."""
        sizes = stage.sizes()
        markers = Markers(self.work, stage.name)
        pending = [i for i in range(len(sizes)) if not markers.done(i)]
        self.tasks_run[stage.name] = {"tasks": len(sizes), "ran": len(pending)}
        if pending:
            _clear(self.work / "progress" / stage.name)
            display = StageProgress(stage.name, sum(sizes), stage.unit, self.show_progress)
            monitor = _Monitor(self.work, stage.name, sizes, display)
            try:
                with monitor:
                    self._execute(stage, len(sizes), pending)
            finally:
                display.close()
        missing = [i for i in range(len(sizes)) if not markers.done(i)]
        if missing:
            raise StageError(
                f"stage {stage.name}: {len(missing)} of {len(sizes)} tasks did not finish (first: "
                f"{missing[:5]}); their logs are in {self._logs(stage.name)}; run the same command "
                "again to retry them"
            )
        return [markers.read(i) for i in range(len(sizes))]

    def _logs(self, stage: str) -> Path:
        return self.work / "logs" / stage

    def _execute(self, stage: ShardStage, tasks: int, pending: list[int]) -> None:
        from loguru import logger

        logger.disable("datatrove")  # its console log here; diffmoe shows progress, per-task logs stay in logs/
        try:
            self._submit(stage, tasks, pending)
        finally:
            logger.enable("datatrove")

    def _submit(self, stage: ShardStage, tasks: int, pending: list[int]) -> None:
        cfg = self.config
        options = {**cfg.options, **cfg.stages.get(stage.name, {})}
        concurrency = min(self.workers, len(pending)) if self.workers else -1
        from ._datatrove import TaskStep

        step = TaskStep(stage, self.work)
        logs = self._logs(stage.name)
        if cfg.executor == "local":
            self._local(step, tasks, concurrency, logs, options)
        elif cfg.executor == "ray":
            import ray

            if not ray.is_initialized():
                ray.init(**cfg.init)
            _executor_class("ray")(
                pipeline=[step], tasks=tasks, workers=concurrency, logging_dir=str(logs), **options
            ).run()
        else:
            executor = _executor_class("slurm")(
                pipeline=[step], tasks=tasks, workers=concurrency, logging_dir=str(logs), **options
            )
            executor.run()  # submits the array and returns
            self._wait_for_slurm(stage.name, tasks, executor.job_id)

    def _local(self, step, tasks: int, workers: int, logs: Path, options: dict) -> None:
        from ._datatrove import QuietLocalExecutor

        options = {"start_method": "forkserver", **options}
        if workers > 1 and options["start_method"] == "forkserver":
            import multiprocess

            # the forkserver imports the stages once, and not the caller's __main__ (which then needs no guard)
            multiprocess.get_context("forkserver").set_forkserver_preload(
                ["diffmoe.data._datatrove", "diffmoe.data.stages"]
            )
        QuietLocalExecutor(pipeline=[step], tasks=tasks, workers=workers, logging_dir=str(logs), **options).run()

    def _wait_for_slurm(self, stage: str, tasks: int, job_id) -> None:
        """Until every task is marked, or the array (datatrove chains arrays: the last one ends last) is gone;
        :meth:`run` then names the tasks that did not finish."""
        markers = Markers(self.work, stage)
        while not all(markers.done(i) for i in range(tasks)):
            if job_id in (None, -1) or not _slurm_job_alive(str(job_id)):
                return
            time.sleep(self.config.poll_s)


def _slurm_job_alive(job_id: str) -> bool:
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return True  # cannot tell: keep waiting for the markers
    return out.returncode == 0 and bool(out.stdout.strip())


def _clear(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


class _Monitor:
    """A thread that sums the finished tasks' sizes and the running tasks' progress files into ``display``."""

    def __init__(self, work: Path, stage: str, sizes: list[float], display: StageProgress):
        self.markers, self.sizes, self.display = Markers(work, stage), sizes, display
        self.progress_dir = Path(work) / "progress" / stage
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="diffmoe-prepare-progress")

    def __enter__(self) -> "_Monitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()

    def _loop(self) -> None:
        while not self._stop.wait(_PROGRESS_EVERY_S):
            self._poll()

    def _poll(self) -> None:
        done = 0.0
        for i, size in enumerate(self.sizes):
            if self.markers.done(i):
                done += size
                continue
            try:
                done += min(float((self.progress_dir / f"{i:05d}").read_text("utf-8")), size)
            except (OSError, ValueError):
                pass
        self.display.update(done)
