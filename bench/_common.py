"""Shared helpers for the scripts in ``bench/``: timing, device facts, a table and a JSON record.

Each benchmark script does::

    from bench._common import time_fn, device_info, print_table, write_json
    t = time_fn(lambda: op(x), device=x.device)          # Timing(median_s, iqr_s, runs)
    rows.append({"impl": "kernel", "ms": t.median_s * 1e3, "GB/s": gbps(nbytes, t.median_s)})
    print_table(rows); write_json("op_name", rows, config={...})

Timings use ``torch.utils.benchmark.Timer.blocked_autorange`` (it synchronises CUDA itself),
so the median and the inter-quartile spread come from many blocked runs, never one call.
Run scripts from the repository root: ``PYTHONPATH=. python bench/<name>.py``.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.utils.benchmark as torch_benchmark

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call: median and inter-quartile range over ``runs`` measured blocks."""

    median_s: float
    iqr_s: float
    runs: int

    @property
    def spread_pct(self) -> float:
        """IQR as a percentage of the median (the '+-' printed beside timings)."""
        return 100.0 * self.iqr_s / self.median_s if self.median_s > 0 else 0.0


def time_fn(fn: Callable[[], Any], *, device: torch.device | str = "cpu", min_run_time: float = 0.2,
            warmup: int = 2) -> Timing:
    """Time ``fn()`` (no arguments): ``warmup`` untimed calls, then blocked runs for ``min_run_time`` s."""
    for _ in range(warmup):
        fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    measurement = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(
        min_run_time=min_run_time)
    return Timing(median_s=measurement.median, iqr_s=measurement.iqr, runs=len(measurement.times))


def gbps(nbytes: int, seconds: float) -> float:
    """Achieved bandwidth in GB/s (1e9 bytes) for ``nbytes`` read plus written in ``seconds``."""
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


def copy_bandwidth(device: torch.device | str = "cpu", nbytes: int | None = None) -> float:
    """Measured device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written.

    Default size: 1 GiB on CUDA (well past any cache), 64 MiB on CPU (keeps the run short).
    """
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device=device)
    return gbps(2 * nbytes, timing.median_s)


def _git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except ImportError:
        return "not installed"
    return getattr(module, "__version__", "unknown")


def device_info(device: torch.device | str = "cpu", *, measure_bandwidth: bool = True) -> dict[str, Any]:
    """Device name, library versions, git revision, date and (optionally) measured copy GB/s."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_revision": _git_revision(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if measure_bandwidth:
        info["copy_GBps"] = copy_bandwidth(device)
    return info


def default_device() -> torch.device:
    """CUDA when present, otherwise CPU (where scripts run reference paths at small sizes)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_table(rows: Iterable[Mapping[str, Any]], columns: list[str] | None = None) -> str:
    """Print rows (dicts) as an aligned text table and return the text."""
    rows = list(rows)
    if not rows:
        print("(no rows)")
        return "(no rows)"
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    text = "\n".join(lines)
    print(text)
    return text


def write_json(name: str, rows: list[Mapping[str, Any]], *, info: Mapping[str, Any] | None = None,
               config: Mapping[str, Any] | None = None) -> Path:
    """Write ``{"benchmark", "info", "config", "rows"}`` to ``bench/results/<name>-<UTC time>.json``."""
    info = dict(info) if info is not None else device_info(measure_bandwidth=False)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    record = {"benchmark": name, "info": info, "config": dict(config or {}), "rows": [dict(r) for r in rows]}
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path
