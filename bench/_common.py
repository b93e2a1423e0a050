"""Shared helpers for the scripts in ``bench/``: device set-up, paired timing, a table and a JSON record.

On a shared machine one timing per implementation lets the machine's load pick the winner. So every
script that compares implementations times them in alternation: ``pairs`` rounds (at least
``MIN_PAIRS``), each round timing every arm once in a fixed order (A B A B ...). Each round gives the
ratio time(arm) / time(baseline) of two timings taken back to back; a script reports the median of
those per-pair ratios with their min and max. When ``(max - min) / median`` exceeds ``max_spread``
(default ``MAX_SPREAD``) the verdict is ``inconclusive: spread X%`` instead of a winner.

    from bench._common import add_pair_arguments, blocked_timer, compare, print_table, setup, write_json
    env = setup()                                              # device, on_gpu, min_run_time, info
    result = compare({"reference": ref, "kernel": ker}, baseline="reference", pairs=5,
                     measure=blocked_timer(env.device, env.min_run_time))
    c = result.comparisons["kernel"]                           # c.ratio_median, c.ratio_min, c.ratio_max, c.verdict
    write_json("op_name", rows, info=env.info, comparisons=result.to_json("group"))

Each timing uses ``torch.utils.benchmark.Timer.blocked_autorange`` (it synchronises CUDA itself).
Run scripts from the repository root: ``PYTHONPATH=. python bench/<name>.py`` or ``nexus bench <name>``.
JSON goes to ``bench/results/`` or to the folder named by ``NEXUS_BENCH_RESULTS``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.utils.benchmark as torch_benchmark

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MIN_PAIRS = 5
MAX_SPREAD = 0.25  # (max - min) / median of the per-pair ratios above this: too noisy to name a winner


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
    """Time ``fn()`` (no arguments): ``warmup`` untimed calls, then blocked runs for ``min_run_time`` s,
    with ``torch.get_num_threads()`` CPU threads (what ``setup(threads=...)`` set)."""
    for _ in range(warmup):
        fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    # Timer alone would run fn on 1 thread whatever the script asked for
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return Timing(median_s=measurement.median, iqr_s=measurement.iqr, runs=len(measurement.times))


def blocked_timer(device: torch.device | str = "cpu",
                  min_run_time: float = 0.1) -> Callable[[Callable[[], Any]], float]:
    """A ``measure`` for ``compare``: median seconds per call of ``fn`` over ``min_run_time`` s of blocked runs."""
    return lambda fn: time_fn(fn, device=device, min_run_time=min_run_time, warmup=0).median_s


# ---- paired comparisons ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Comparison:
    """``arm`` against ``baseline`` from paired timings (seconds): ``arm_s[i]`` and ``baseline_s[i]`` were
    taken in the same round ``i``. Ratio ``i`` is ``arm_s[i] / baseline_s[i]``: below 1 the arm is faster."""

    baseline: str
    arm: str
    baseline_s: tuple[float, ...]
    arm_s: tuple[float, ...]
    max_spread: float = MAX_SPREAD
    min_pairs: int = MIN_PAIRS

    def __post_init__(self):
        object.__setattr__(self, "baseline_s", tuple(float(t) for t in self.baseline_s))
        object.__setattr__(self, "arm_s", tuple(float(t) for t in self.arm_s))
        if len(self.arm_s) != len(self.baseline_s):
            raise ValueError(f"{self.arm!r} has {len(self.arm_s)} timings but baseline {self.baseline!r} has "
                             f"{len(self.baseline_s)}: paired timings come one per round from each")
        if not self.arm_s:
            raise ValueError(f"no paired timings for {self.arm!r} against {self.baseline!r}")
        for name, times in ((self.baseline, self.baseline_s), (self.arm, self.arm_s)):
            for i, t in enumerate(times):
                if not (math.isfinite(t) and t > 0):
                    raise ValueError(f"timing {i} of {name!r} is {t}: seconds must be finite and positive")
        if not self.max_spread > 0:
            raise ValueError(f"max_spread must be positive, got {self.max_spread}")

    @property
    def pairs(self) -> int:
        return len(self.arm_s)

    @property
    def ratios(self) -> tuple[float, ...]:
        return tuple(a / b for a, b in zip(self.arm_s, self.baseline_s))

    @property
    def ratio_median(self) -> float:
        return statistics.median(self.ratios)

    @property
    def ratio_min(self) -> float:
        return min(self.ratios)

    @property
    def ratio_max(self) -> float:
        return max(self.ratios)

    @property
    def spread(self) -> float:
        """(max - min) / median of the per-pair ratios, as a fraction."""
        return (self.ratio_max - self.ratio_min) / self.ratio_median

    @property
    def conclusive(self) -> bool:
        return self.pairs >= self.min_pairs and self.spread <= self.max_spread

    @property
    def verdict(self) -> str:
        """``faster`` / ``slower`` (every pair agrees), ``no clear difference`` (the range holds 1) or
        ``inconclusive: ...`` (too few pairs, or a spread wider than ``max_spread``; a sign that every
        pair agrees on is still named in brackets)."""
        if self.pairs < self.min_pairs:
            return f"inconclusive: {self.pairs} pairs, need {self.min_pairs}"
        if self.spread > self.max_spread:
            # the size of the difference is unknown, but its sign can still be unanimous
            side = ""
            if self.ratio_max < 1 or self.ratio_min > 1:
                side = f" ({'faster' if self.ratio_max < 1 else 'slower'} in every pair)"
            return f"inconclusive: spread {self.spread:.0%}{side}"
        if self.ratio_max < 1:
            return "faster"
        if self.ratio_min > 1:
            return "slower"
        return "no clear difference"

    def describe(self) -> str:
        """One line: ``arm / baseline: median 1.06x [min 1.02x, max 1.09x] over 5 pairs, spread 7%: slower``."""
        return (f"{self.arm} / {self.baseline}: median {self.ratio_median:.3g}x [min {self.ratio_min:.3g}x, "
                f"max {self.ratio_max:.3g}x] over {self.pairs} pairs, spread {self.spread:.0%}: {self.verdict}")

    def to_json(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "arm": self.arm, "baseline_s": list(self.baseline_s),
                "arm_s": list(self.arm_s), "ratios": list(self.ratios), "median": self.ratio_median,
                "min": self.ratio_min, "max": self.ratio_max, "spread": self.spread,
                "max_spread": self.max_spread, "conclusive": self.conclusive, "verdict": self.verdict}


class Alternation:
    """Timings recorded in a fixed turn order, ``names[0], names[1], ..., names[0], ...`` for ``pairs``
    rounds. Recording out of turn is an error: the alternation is what keeps load drift out of the ratios.

    ``drop(name)`` removes an arm (it failed) and its timings; the others keep their turns.
    """

    def __init__(self, names: Sequence[str], pairs: int):
        names = list(names)
        if not names:
            raise ValueError("an alternation needs at least one arm")
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be distinct, got {names}")
        if pairs < 1:
            raise ValueError(f"pairs must be at least 1, got {pairs}")
        self.names = names
        self.pairs = pairs
        self.times: dict[str, list[float]] = {n: [] for n in names}
        self.rounds_done = 0
        self._turn = 0

    @property
    def done(self) -> bool:
        return self.rounds_done >= self.pairs

    @property
    def expected(self) -> str | None:
        """The arm whose timing comes next, or None when all rounds are done."""
        return None if self.done or not self.names else self.names[self._turn]

    def record(self, name: str, seconds: float) -> None:
        if self.done:
            raise ValueError(f"all {self.pairs} rounds are recorded; got another timing for {name!r}")
        if name != self.expected:
            raise ValueError(f"timing for {name!r} out of turn: round {self.rounds_done + 1} expects {self.expected!r}")
        self.times[name].append(float(seconds))
        self._advance()

    def drop(self, name: str) -> None:
        if name not in self.names:
            raise ValueError(f"no arm named {name!r} in {self.names}")
        index = self.names.index(name)
        self.names.remove(name)
        del self.times[name]
        if index < self._turn:
            self._turn -= 1
        if self.names and self._turn >= len(self.names):  # the dropped arm was the last of a round
            self._turn = 0
            self.rounds_done += 1

    def _advance(self) -> None:
        self._turn += 1
        if self._turn == len(self.names):
            self._turn = 0
            self.rounds_done += 1


@dataclasses.dataclass
class Compared:
    """What ``compare`` measured: per-round seconds of each arm, arms that failed, and each arm's
    ``Comparison`` against the baseline."""

    baseline: str
    times: dict[str, list[float]]
    errors: dict[str, str]
    comparisons: dict[str, Comparison]

    def median_s(self, name: str) -> float:
        return statistics.median(self.times[name])

    def cells(self, name: str) -> dict[str, Any]:
        """Table cells for arm ``name``: ``ratio`` (median), ``min``, ``max``, ``verdict`` (or the error)."""
        if name in self.errors:
            return {"ratio": "", "min": "", "max": "", "verdict": self.errors[name]}
        if name == self.baseline:
            return {"ratio": 1.0, "min": "", "max": "", "verdict": "baseline"}
        c = self.comparisons[name]
        return {"ratio": c.ratio_median, "min": c.ratio_min, "max": c.ratio_max, "verdict": c.verdict}

    def to_json(self, group: str = "") -> list[dict[str, Any]]:
        """One record per compared arm (ratios, median, min, max, verdict), tagged with ``group``."""
        out = [{"group": group, **c.to_json()} for c in self.comparisons.values()]
        out += [{"group": group, "baseline": self.baseline, "arm": n, "error": e} for n, e in self.errors.items()]
        return out


def _error_text(exc: BaseException) -> str:
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"error: {type(exc).__name__}: {first_line[:60]}"


def compare(arms: Mapping[str, Callable[[], Any]], *, baseline: str, measure: Callable[[Callable[[], Any]], float],
            pairs: int = MIN_PAIRS, warmup: int = 1, max_spread: float = MAX_SPREAD) -> Compared:
    """Time ``arms`` (name -> zero-argument callable) in alternation and compare each with ``baseline``.

    Every arm is first called ``warmup`` times untimed (compilation, caches); one that raises there or
    later is reported in ``errors`` and leaves the rounds, except the baseline, whose error propagates.
    Then ``pairs`` rounds each call ``measure(fn)`` (seconds) once per arm, in the order of ``arms``.
    """
    if baseline not in arms:
        raise ValueError(f"baseline {baseline!r} is not one of the arms {list(arms)}")
    errors: dict[str, str] = {}
    for name, fn in arms.items():
        try:
            for _ in range(warmup):
                fn()
        except Exception as exc:  # a failing peer is a row of the table, not the end of the run
            if name == baseline:
                raise
            errors[name] = _error_text(exc)
    alternation = Alternation([n for n in arms if n not in errors], pairs)
    while not alternation.done:
        name = alternation.expected
        try:
            seconds = measure(arms[name])
        except Exception as exc:
            if name == baseline:
                raise
            errors[name] = _error_text(exc)
            alternation.drop(name)
            continue
        alternation.record(name, seconds)
    comparisons = {n: Comparison(baseline, n, alternation.times[baseline], t, max_spread=max_spread)
                   for n, t in alternation.times.items() if n != baseline}
    return Compared(baseline=baseline, times=alternation.times, errors=errors, comparisons=comparisons)


def _pairs_arg(text: str) -> int:
    value = int(text)
    if value < MIN_PAIRS:
        raise argparse.ArgumentTypeError(f"--pairs must be at least {MIN_PAIRS} (got {value}): "
                                         "a median over fewer pairs does not hold on a shared machine")
    return value


def _spread_arg(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--max-spread must be a positive fraction such as 0.25 (got {text})")
    return value


def positive_int_arg(flag: str) -> Callable[[str], int]:
    """An argparse ``type=`` for ``flag``: an int >= 1, else an error naming the flag."""
    def parse(text: str) -> int:
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be at least 1 (got {value})")
        return value
    return parse


_threads_arg = positive_int_arg("--threads")


def add_pair_arguments(parser: argparse.ArgumentParser) -> None:
    """``--pairs`` (rounds of alternation, at least ``MIN_PAIRS``), ``--max-spread`` (a fraction) and
    ``--threads`` (torch CPU threads; pass it on to ``setup``)."""
    parser.add_argument("--pairs", type=_pairs_arg, default=MIN_PAIRS,
                        help=f"rounds of alternation, each timing every implementation once (>= {MIN_PAIRS})")
    parser.add_argument("--max-spread", type=_spread_arg, default=MAX_SPREAD,
                        help="(max - min) / median of the per-pair ratios above which a row is inconclusive")
    parser.add_argument("--threads", type=_threads_arg, default=None,
                        help="torch CPU threads (default: torch's choice); on a loaded CPU, 1 keeps timings "
                             "steady, since parallel regions otherwise wait for descheduled threads")


RATIO_NOTE = ("ratio = time / {baseline} time in the same round; median of {pairs} rounds with min and max; "
              "inconclusive when (max - min) / median > {spread:.0%}")


# ---- device -----------------------------------------------------------------------------------

def bandwidth_rows(arms: Mapping[str, Callable[[], Any]], *, group: Mapping[str, Any], absent: Mapping[str, str],
                   nbytes: int, measure: Callable[[Callable[[], Any]], float], pairs: int, max_spread: float,
                   copy_bw: float, rows: list, comparisons: list) -> None:
    """Time ``arms`` in alternation against ``"reference"`` and append a row per arm to ``rows`` (ms, GB/s
    of ``nbytes`` moved, % of the copy bandwidth, ratio cells) and the pairs to ``comparisons``; the
    ``absent`` arms (impl -> why) get a row with that verdict first. ``group``: the row's other columns."""
    rows.extend({"impl": impl, **group, "verdict": why} for impl, why in absent.items())
    result = compare(arms, baseline="reference", pairs=pairs, measure=measure, max_spread=max_spread)
    comparisons.extend(result.to_json("/".join(str(v) for v in group.values())))
    for impl in arms:
        row = {"impl": impl, **group}
        if impl in result.times:
            seconds = result.median_s(impl)
            bw = gbps(nbytes, seconds)
            row.update({"ms": seconds * 1e3, "GB/s": bw, "% copy": 100 * bw / copy_bw})
        rows.append({**row, **result.cells(impl)})


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


@dataclasses.dataclass(frozen=True)
class BenchEnv:
    """The device a script runs on, whether it is a GPU, seconds of blocked runs per timing, and ``device_info``."""

    device: torch.device
    on_gpu: bool
    min_run_time: float
    info: dict[str, Any]

    @property
    def copy_bw(self) -> float:
        if "copy_GBps" not in self.info:
            raise ValueError("copy bandwidth was not measured: call setup(measure_bandwidth=True)")
        return self.info["copy_GBps"]


NO_GPU_NOTE = "No GPU: the Triton kernel rows need a GPU; reference paths run at a small size."


def setup(device: torch.device | str | None = None, *, measure_bandwidth: bool = True,
          min_run_time: float = 0.1, no_gpu_note: str | None = NO_GPU_NOTE, threads: int | None = None) -> BenchEnv:
    """Pick the device (CUDA when present), set ``threads`` torch CPU threads (None: leave torch's
    choice), collect ``device_info`` and print the device line.

    ``min_run_time`` is per timing; ``compare`` takes one per arm per round. ``no_gpu_note`` is printed
    on a CPU-only run (None: print nothing).
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    device = torch.device(device) if device is not None else default_device()
    info = device_info(device, measure_bandwidth=measure_bandwidth)
    info["torch_threads"] = torch.get_num_threads()
    line = f"device: {info['device_name']} ({device}); {info['torch_threads']} CPU threads"
    if measure_bandwidth:
        line += f"; copy bandwidth {info['copy_GBps']:.1f} GB/s"
    print(line)
    on_gpu = device.type == "cuda"
    if not on_gpu and no_gpu_note:
        print(no_gpu_note)
    return BenchEnv(device=device, on_gpu=on_gpu, min_run_time=min_run_time, info=info)


# ---- output -----------------------------------------------------------------------------------

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


def results_dir() -> Path:
    """``$NEXUS_BENCH_RESULTS`` when set, else ``bench/results``."""
    return Path(os.environ.get("NEXUS_BENCH_RESULTS") or RESULTS_DIR)


def write_json(name: str, rows: list[Mapping[str, Any]], *, info: Mapping[str, Any] | None = None,
               config: Mapping[str, Any] | None = None,
               comparisons: list[Mapping[str, Any]] | None = None) -> Path:
    """Write ``{"benchmark", "info", "config", "rows", "comparisons"}`` to ``<results>/<name>-<UTC time>.json``.

    ``comparisons``: the ``Compared.to_json`` records (per-pair ratios, median, min, max, verdict).
    """
    info = dict(info) if info is not None else device_info(measure_bandwidth=False)
    directory = results_dir()
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    path = directory / f"{name}-{stamp}.json"
    record = {"benchmark": name, "info": info, "config": dict(config or {}), "rows": [dict(r) for r in rows],
              "comparisons": [dict(c) for c in comparisons or []]}
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path
