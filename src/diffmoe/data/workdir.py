"""``prepare``'s work directory (``OUT/.prepare-tmp``): its plan, the markers of its global stages, and
the rules for claiming an output directory, resuming an interrupted run or refusing a changed one.

``plan.json`` records what decides the output: every option of :class:`~diffmoe.data.PrepareConfig`, the
corpus specs, each input file's name, size and modification time, the read tasks, and the size and time
of an imported neighbours file or tokenizer. The same command run again (after a crash, a kill, a
preempted job) finds the same plan and resumes: finished tasks and global stages are not redone. A
changed command is refused with the differences named, unless ``overwrite``. How the stages run (workers,
executor) is not part of the plan: it never changes the output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from ..atomic import fsync_dir
from . import store as st
from .errors import DataError

WORKDIR = ".prepare-tmp"
PLAN_FORMAT = 1
_TEMPORARY = re.compile(r"\..+\.tmp-\d+")


def flat_options(config) -> dict:
    """The config as ``{"ordering.batching": "similarity", ...}``."""
    out = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = value

    walk("", asdict(config))
    return out


def file_stamp(path: str | None) -> dict | None:
    """Size and modification time of a local file (or of a directory's tokenizer.json), or None."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        return None
    stat = p.stat()
    return {"path": str(p), "bytes": stat.st_size, "mtime": stat.st_mtime}


def build_plan(specs: list[str], config, files, ignored, tasks) -> dict:
    tokenizer = config.tokenizer.source
    return {
        "format": PLAN_FORMAT,
        "options": flat_options(config),
        "corpus": list(specs),
        "inputs": [f.to_dict() for f in files],
        "ignored": dict(sorted(ignored.items())),
        "tasks": [[p.to_list() for p in task] for task in tasks],
        "stamps": {
            "tokenizer": None if tokenizer in ("train", "gpt2") else file_stamp(tokenizer),
            "neighbours": file_stamp(config.ordering.neighbours),
        },
    }


def plan_differences(old: dict, new: dict) -> list[str]:
    """What differs between two plans, in words (empty when they are the same)."""
    if old.get("format") != new.get("format"):
        return [f"the work directory is of another diffmoe version (plan format {old.get('format')})"]
    out = []
    for key in sorted(set(old["options"]) | set(new["options"])):
        a, b = old["options"].get(key), new["options"].get(key)
        if a != b:
            out.append(f"option {key} was {a!r}, now {b!r}")
    if old["corpus"] != new["corpus"]:
        out.append(f"corpus was {old['corpus']}, now {new['corpus']}")
    before = {f["name"]: f for f in old["inputs"]}
    after = {f["name"]: f for f in new["inputs"]}
    added = [n for n in after if n not in before]
    removed = [n for n in before if n not in after]
    changed = [n for n in after if n in before and before[n] != after[n]]
    for what, names in (("added", added), ("removed", removed), ("changed (size or time)", changed)):
        if names:
            out.append(
                f"{len(names)} input file(s) {what}: {', '.join(names[:3])}" + (" ..." if len(names) > 3 else "")
            )
    if not (added or removed or changed) and old["tasks"] != new["tasks"]:
        out.append("the input files are cut into other tasks")
    for name in ("tokenizer", "neighbours"):
        if old["stamps"].get(name) != new["stamps"].get(name):
            out.append(f"the {name} file changed")
    return out


# ------------------------------------------------------------------------------------------ the directory
_OUR_FILES = re.compile(
    r"(manifest\.json|tokenizer\.json|documents\.jsonl|sources\.jsonl"
    r"|(train|heldout)(-\d{5}\.npy|\.(domain_tokens|row_order|docs)\.npy))"
)


def is_ours(name: str) -> bool:
    """Names ``prepare`` writes: final files, their temporaries (``.NAME.tmp-PID``), its work directory."""
    temporary = re.fullmatch(r"\.(.+)\.tmp-\d+", name)
    return name == WORKDIR or _OUR_FILES.fullmatch(temporary.group(1) if temporary else name) is not None


def remove_ours(out: Path) -> None:
    """Delete everything ``prepare`` wrote in ``out`` (its work directory included)."""
    for path in out.iterdir():
        if not is_ours(path.name):
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def claim(out: Path, overwrite: bool, plan: dict) -> bool:
    """Make ``out`` ready for ``plan``; returns whether an interrupted run of the same plan is resumed.

    ``out`` must be new, empty, hold a previous dataset (replaced only with ``overwrite``; its manifest
    is deleted first, so the directory never loads as a dataset until the new manifest is written), or
    the leftovers of an interrupted ``prepare``: resumed when its plan is this one, refused with the
    differences otherwise (``overwrite`` starts afresh).
    """
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    foreign = sorted(p.name for p in out.iterdir() if not is_ours(p.name))
    if foreign:
        raise DataError(
            f"output directory {out} is not empty and holds files prepare did not write "
            f"({', '.join(foreign[:3])}); choose a new or empty directory"
        )
    work = out / WORKDIR
    if (out / st.MANIFEST).exists():
        if not overwrite:
            raise DataError(f"{out} already holds a prepared dataset; pass overwrite=True / --overwrite to replace it")
        (out / st.MANIFEST).unlink()
        fsync_dir(out)
    elif (work / "plan.json").is_file():
        try:
            old = json.loads((work / "plan.json").read_text("utf-8"))
            differences = plan_differences(old, plan)
        except (OSError, ValueError, KeyError, TypeError):
            differences = ["its plan.json is unreadable"]
        if not differences:
            _remove_temporaries(out)
            return True
        if not overwrite:
            raise DataError(
                f"{out} holds an interrupted prepare of another command: "
                + "; ".join(differences[:6])
                + ". Run that command again to resume it, or pass "
                "overwrite=True / --overwrite to start afresh"
            )
    remove_ours(out)
    work.mkdir()
    st.write_json_atomic(work / "plan.json", plan)
    return False


def _remove_temporaries(out: Path) -> None:
    """Temporary files and folders of killed processes (``.NAME.tmp-PID``), in ``out`` and its work directory."""
    for directory, dirnames, filenames in os.walk(out):
        for name in filenames + dirnames:
            if _TEMPORARY.fullmatch(name):
                path = Path(directory) / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


class GlobalStages:
    """Markers of the global stages (``markers/global/NAME.json``): done once, with what they recorded."""

    def __init__(self, work: Path):
        self.directory = Path(work) / "markers" / "global"

    def done(self, name: str) -> bool:
        return (self.directory / f"{name}.json").is_file()

    def info(self, name: str) -> dict:
        return json.loads((self.directory / f"{name}.json").read_text("utf-8"))["info"]

    def mark(self, name: str, info: dict | None = None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        st.write_json_atomic(self.directory / f"{name}.json", {"finished": time.time(), "info": info or {}})
