"""What every benchmark records beside its figures, and how it prints them.

A figure is only worth quoting with the machine, the load on it and the exact command that
produced it, so each benchmark wraps its work in a :class:`BenchRun`, which notes the load
average and the clock at the start, and at the end writes one JSON file::

    {"benchmark": ..., "command": "python -m hmt_plugin.bench ...", "machine": {...},
     "load_avg_start": [1, 5, 15 min], "load_avg_end": [...], "wall_s": ..., "settings": {...},
     "results": {...}}

Tables are printed as Markdown, so they can be pasted into the README as they are.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch


def _first_line_with(path: str, key: str) -> Optional[str]:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, ``platform`` elsewhere)."""
    return _first_line_with("/proc/cpuinfo", "model name") or platform.processor() or "unknown"


def memory_total_gib() -> Optional[float]:
    value = _first_line_with("/proc/meminfo", "MemTotal")
    if value is None:
        return None
    return round(int(value.split()[0]) / 2**20, 1)  # kB -> GiB


def load_average() -> Optional[List[float]]:
    """1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: Any = "cpu", dtype: Optional[str] = None) -> Dict[str, Any]:
    """Hardware and software facts a reader needs to compare figures across machines."""
    device = torch.device(device)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    info: Dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": memory_total_gib(),
        "device": str(device),
        "dtype": dtype,
    }
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
        )
    return info


def git_state() -> Optional[Dict[str, Any]]:
    """The commit of the code being measured and whether the working tree differs from it
    (None outside a git checkout, e.g. an installed wheel)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


class BenchRun:
    """The record of one benchmark invocation.

    Args:
        name (str): the benchmark (``speed``, ``quality``, ...).
        argv (Sequence[str]): its arguments, as given after the benchmark's name.
        command (Optional[str]): the subcommand, where it is not ``name`` (``quality
            --backbone DIR`` runs the ``quality-pretrained`` benchmark).
    """

    def __init__(self, name: str, argv: Sequence[str], command: Optional[str] = None) -> None:
        self.name = name
        self.command = shlex.join(["python", "-m", "hmt_plugin.bench", command or name, *argv])
        self.started_at = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self.load_start = load_average()
        self.git = git_state()  # at the start: the code that is imported and measured
        self._t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def record(
        self, *, settings: Dict[str, Any], results: Dict[str, Any], machine: Dict[str, Any]
    ) -> Dict[str, Any]:
        """The JSON record, with the load average and wall time taken now."""
        return {
            "benchmark": self.name,
            "command": self.command,
            "cwd": os.getcwd(),
            "git": self.git,
            "started_at": self.started_at,
            "wall_s": round(self.elapsed(), 2),
            "load_avg_start": self.load_start,
            "load_avg_end": load_average(),
            "machine": machine,
            "settings": settings,
            "results": results,
        }


    def finish(
        self, out: os.PathLike, tables: Callable[[Dict[str, Any]], str], *,
        settings: Dict[str, Any], results: Dict[str, Any], machine: Dict[str, Any],
    ) -> Dict[str, Any]:
        """:meth:`record`, written to ``out`` as JSON, with ``tables(record)`` printed: the
        end of every benchmark's ``main``."""
        record = self.record(settings=settings, results=results, machine=machine)
        path = write_json(out, record)
        print(tables(record))
        print(f"\nWrote {path}")
        return record


def write_json(path: os.PathLike, record: Dict[str, Any]) -> Path:
    """Write ``record`` to ``path`` (parents created) atomically: an interrupted write never
    leaves half a JSON file behind."""
    from hmt_plugin.checkpointing.io import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(record, indent=2, default=_jsonable) + "\n").encode())
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, (Path, torch.device, torch.dtype)):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; numbers right-aligned, everything else left-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [
        bool(rows) and all(isinstance(r[i], (int, float)) or r[i] is None for r in rows)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def header(record: Dict[str, Any]) -> str:
    """Two lines naming the command, machine, load and wall time of a record."""
    m = record["machine"]
    where = f"{m['cpu_model']}, {m['usable_cpus']} usable CPUs, torch {m['torch']}"
    if "gpu" in m:
        where = f"{m['gpu']} ({m['gpu_memory_gib']} GiB), " + where
    load = f"load average {record['load_avg_start']} at start, {record['load_avg_end']} at end"
    git = record.get("git") or {}
    code = f" at {git['commit'][:10]}{' (modified)' if git.get('dirty') else ''}" if git else ""
    return (
        f"`{record['command']}`{code}\n"
        f"{where}; device {m['device']}, {m['dtype']}; {load}; wall {record['wall_s']:.0f} s"
    )


def apply_quick(args: argparse.Namespace, argv: Sequence[str], quick: Dict[str, Any],
                work_dir: str) -> None:
    """``--quick``: the small settings in ``quick`` and ``work_dir``, except where the command
    line set a value itself."""
    if not args.quick:
        return
    explicit = {a.split("=")[0].lstrip("-") for a in argv if a.startswith("--")}
    for key, value in {**quick, "work_dir": work_dir}.items():
        if key not in explicit:
            setattr(args, key, value)


def stderr(message: str) -> None:
    """Progress lines go to stderr, so stdout holds only the tables."""
    print(message, file=sys.stderr, flush=True)
