"""What every benchmark shares: device and dtype choice, round-robin timing, machine facts, output.

Every benchmark measures its entries side by side in one process: each round runs every entry once,
with the starting entry rotated from round to round, so slow drift (clock, other load) hits all
entries alike; the first rounds are discarded as warm-up and medians are taken over the rest.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Callable

import torch

from ..atomic import write_text_atomic
from ..config import ConfigError
from ..runtime import malloc_mode, reuse_freed_memory
from ..train.metrics import GPU_PEAK_BF16, gpu_peak_flops  # noqa: F401  (the benchmarks import them from here)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else as torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def start(args) -> tuple[torch.device, torch.dtype]:
    """What every benchmark does first: keep freed memory for reuse (see :mod:`diffmoe.runtime`),
    apply ``--threads``, resolve ``--device`` and ``--dtype``."""
    reuse_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    return device, resolve_dtype(args.dtype, device)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16`` (file names, records)."""
    return str(dtype).replace("torch.", "")


def config_files(given: list[Path], device: torch.device, cpu_glob: str, cuda_glob: str) -> list[Path]:
    """The config files given, else those under ./configs matching the device's pattern."""
    files = given or sorted(Path("configs").glob(cuda_glob if device.type == "cuda" else cpu_glob))
    if not files:
        raise ConfigError("no config files given and none found under ./configs")
    return files


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(entries: list[Callable[[], float]], warmup: int, repeats: int) -> tuple[list[list[float]], list[float]]:
    """Run each entry (a callable returning its own measured seconds) once per round.

    Returns (results [entry][kept round], 1-minute load average per kept round). Python's garbage
    collector runs between entries, never inside one: imports leave many objects, so they are frozen.
    """
    n = len(entries)
    results: list[list[float]] = [[] for _ in entries]
    load: list[float] = []
    gc.freeze()
    for r in range(warmup + repeats):
        gc.collect()
        row = [0.0] * n
        for j in range(n):
            i = (j + r) % n
            gc.disable()
            try:
                row[i] = entries[i]()
            finally:
                gc.enable()
        if r >= warmup:
            for res, t in zip(results, row):
                res.append(t)
            load.append(round(os.getloadavg()[0], 2))
    return results, load


def median_ratio(times: list[float], reference: list[float]) -> float:
    """Median over rounds of the per-round ratio: load that drifts between rounds cancels."""
    return statistics.median(t / r for t, r in zip(times, reference))


def machine_info(device: torch.device, dtype: torch.dtype, load_start: float) -> dict:
    """CPU, core and thread counts, library versions, GPU name, date and load averages."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": hf_version,
        "python": platform.python_version(),
        "device": str(device),
        "dtype": dtype_name(dtype),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_1min_start": round(load_start, 2),
        "loadavg_1min_end": round(os.getloadavg()[0], 2),
        "malloc": malloc_mode(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_line(m: dict) -> str:
    """One markdown sentence describing the machine of a result."""
    libs = f"torch {m['torch']}" + (f", transformers {m['transformers']}" if m.get("transformers") else "")
    return (
        f"Machine: {m['cpu']}"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f" ({m['cpu_count']} cores); {m['threads']} torch threads; {libs}; {m['dtype']}; {m['date']}; "
        f"1-min load average {m['loadavg_1min_start']} at start, {m['loadavg_1min_end']} at end; "
        f"malloc: {m.get('malloc', 'default')} (see diffmoe.runtime)."
    )


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n matmul in dtype on device (median of ``repeats`` after one warm-up)."""
    import time

    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = []
    for i in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / statistics.median(times)


def write_results(out: Path, stem: str, table: str, result: dict) -> None:
    """Write ``stem``.md and ``stem``.json under ``out`` (atomically) and print the table."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / f"{stem}.md", table)
    write_text_atomic(out / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    print(table)
    print(f"written: {out / stem}.md, .json")


def fmt_ms(v: float) -> str:
    """Milliseconds with at least 3 significant digits (GPU times are often well under 1 ms)."""
    return f"{v:.1f}" if v >= 100 else f"{v:.3g}"


def config_bench_parser(
    name: str, doc: str, out: str, repeats: int, warmup: int, set_help: str, threads_help: str | None = None
) -> argparse.ArgumentParser:
    """The options the config benchmarks (``model``, ``generate``, ``scale``) share: config files,
    ``--set`` overrides, ``--repeats``, ``--warmup``, ``--threads`` and ``--out``."""
    p = argparse.ArgumentParser(prog=f"diffmoe bench {name}", description=doc.split("\n\n")[0])
    p.add_argument("configs", nargs="*", type=Path, help="config files (default: see the module docstring)")
    p.add_argument(
        "--set",
        nargs="*",
        default=None,
        metavar="SECTION.FIELD=VALUE",
        help=f"overrides applied to every config ({set_help})",
    )
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--threads", type=int, default=None, help=threads_help)
    p.add_argument("--out", type=Path, default=Path(out))
    return p


def device_options(p: argparse.ArgumentParser, dtype_help: str) -> None:
    """``--device``, ``--dtype`` and ``--seed`` of the benchmarks that build models on one device."""
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help=dtype_help)
    p.add_argument("--seed", type=int, default=0)


def parse_checked(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, and refuse ``--repeats`` < 1 or ``--warmup`` < 0."""
    a = p.parse_args(argv)
    if a.repeats < 1 or a.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return a


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """The lines of a markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(cell) for cell in row) + " |" for row in rows
    ]
