"""Experiment trackers behind one interface, and the loss / learning-rate plot of a run.

``report_to`` (a ``TrainingArguments`` field and run-file key) names the trackers of a run:

=============  =========================================================  ===========================
name           where the run goes                                         extra
=============  =========================================================  ===========================
tensorboard    event files in ``<run>/tensorboard`` (the default)          (core dependency)
wandb          a W&B offline run in ``<run>/wandb/offline-run-*``          ``nexus-train[track]``
mlflow         an MLflow store: ``sqlite:///<run>/mlflow.db`` unless the   ``nexus-train[track]``
               run or ``MLFLOW_TRACKING_URI`` names another URI
neptune        a Neptune offline run in ``<run>/neptune/offline``          ``nexus-train[track]``
clearml        a ClearML offline session, copied to ``<run>/clearml``      ``nexus-train[track]``
=============  =========================================================  ===========================

Nothing here talks to the network: W&B, Neptune and ClearML run offline (``neptune sync``,
``wandb sync`` and ``Task.import_offline_session`` upload later, by hand) and the telemetry of W&B,
MLflow and ClearML is switched off before they are imported.

Each tracker has ``open(run_dir, config)``, ``log(metrics, step)`` and ``close()``.

Example::
    trackers = open_trackers(["tensorboard", "mlflow"], "runs/tiny", {"lr": 3e-3})
    trackers.log({"loss": 2.5, "lr": 3e-3}, step=10)
    trackers.close()
"""
from __future__ import annotations

import abc
import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

TRACKERS = ("tensorboard", "wandb", "mlflow", "neptune", "clearml")
EXTRA_HINT = "pip install 'nexus-train[track]'"
CURVES_PNG = "training_curves.png"
CURVES_SIZE = (10.0, 4.0)  # inches; at CURVES_DPI the PNG is 1000 x 400 pixels
CURVES_DPI = 100

# Before any tracker is imported: no usage statistics, no update checks, no uploads.
_OFFLINE_ENV = {
    "WANDB_SILENT": "true",
    "WANDB_DISABLE_GIT": "true",
    "WANDB_DISABLE_CODE": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "CLEARML_OFFLINE_MODE": "1",
    "NEPTUNE_MODE": "offline",
}


def resolve_report_to(report_to: list[str] | str | None) -> list[str]:
    """The tracker names of ``report_to`` (a name, a list, ``"none"`` or ``"all"``), checked and deduplicated."""
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if names in (["none"], []):
        return []
    if names == ["all"]:
        return list(TRACKERS)
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"report_to: unknown tracker {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(TRACKERS)} (or 'none', 'all')")
    return list(dict.fromkeys(names))


class MissingExtraError(ImportError, RuntimeError):
    """An optional dependency is not installed; the message names the pip extra that installs it."""


def _import(module: str, name: str):
    """Import an optional tracker module, or fail naming the extra that installs it."""
    for key, value in _OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(f"report_to={name!r} needs {module}: {EXTRA_HINT}") from exc


def check_available(names: list[str]) -> None:
    """Fail at once, naming the extra, when a tracker of ``names`` is not installed."""
    modules = {"wandb": "wandb", "mlflow": "mlflow", "neptune": "neptune", "clearml": "clearml"}
    for name in names:
        if name in modules:
            _import(modules[name], name)


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys; values kept when plain (str, number, bool), else ``str()``."""
    if not isinstance(config, dict):
        return {prefix or "config": config if isinstance(config, (str, int, float, bool)) else str(config)}
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = value if isinstance(value, (str, int, float, bool)) else str(value)
    return out


def _scalars(metrics: dict) -> dict[str, float]:
    """The numeric entries of ``metrics`` as floats (booleans and non-numbers left out)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker(abc.ABC):
    """One experiment tracker: ``open(run_dir, config)``, ``log(metrics, step)``, ``close()``."""

    name = ""

    @abc.abstractmethod
    def open(self, run_dir: Path, config: dict) -> None: ...

    @abc.abstractmethod
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...


class TensorBoardTracker(Tracker):
    """Scalars as TensorBoard event files in ``<run_dir>/tensorboard``."""

    name = "tensorboard"

    def open(self, run_dir: Path, config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A Weights & Biases run, offline by default: ``<run_dir>/wandb/offline-run-*/run-<id>.wandb``."""

    name = "wandb"

    def __init__(self, project: str = "nexus", mode: str = "offline", run_name: str | None = None):
        self.project, self.mode, self.run_name = project, mode, run_name

    def open(self, run_dir: Path, config: dict) -> None:
        wandb = _import("wandb", self.name)
        settings = wandb.Settings(console="off", save_code=False, disable_git=True)
        self.run = wandb.init(project=self.project, mode=self.mode, dir=str(run_dir), name=self.run_name,
                              config=config, resume="allow", settings=settings, reinit="create_new")
        self.run_dir = Path(self.run.dir).parent if self.run.dir else None  # the offline-run-* folder

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflowTracker(Tracker):
    """An MLflow run through ``MlflowClient`` (no global active run): params from the config, metrics by step.

    The store is ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else SQLite at ``<run_dir>/mlflow.db``
    (artifacts beside it in ``<run_dir>/mlflow-artifacts``).
    """

    name = "mlflow"

    def __init__(self, experiment: str = "nexus", tracking_uri: str | None = None, run_name: str | None = None):
        self.experiment, self.tracking_uri, self.run_name = experiment, tracking_uri, run_name

    def open(self, run_dir: Path, config: dict) -> None:
        _import("mlflow", self.name)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        run_dir = Path(run_dir).resolve()
        default = self.tracking_uri is None and not os.environ.get("MLFLOW_TRACKING_URI")
        self.uri = (f"sqlite:///{run_dir / 'mlflow.db'}" if default
                    else self.tracking_uri or os.environ["MLFLOW_TRACKING_URI"])
        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            artifacts = (run_dir / "mlflow-artifacts").as_uri() if default else None
            experiment_id = self.client.create_experiment(self.experiment, artifact_location=artifacts)
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]  # MLflow's value length limit
        for start in range(0, len(params), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items() if math.isfinite(v)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class NeptuneTracker(Tracker):
    """A Neptune run in offline mode: its operation log in ``<run_dir>/neptune/offline/run__*/``."""

    name = "neptune"

    def __init__(self, project: str = "nexus", run_name: str | None = None):
        self.project, self.run_name = project, run_name

    def open(self, run_dir: Path, config: dict) -> None:
        neptune = _import("neptune", self.name)
        previous = os.environ.get("NEPTUNE_DATA_DIRECTORY")
        os.environ["NEPTUNE_DATA_DIRECTORY"] = str(Path(run_dir) / "neptune")  # read when the run is created
        try:
            self.run = neptune.init_run(
                mode="offline", project=f"{self.project}/offline" if "/" not in self.project else self.project,
                name=self.run_name, capture_stdout=False, capture_stderr=False, capture_traceback=False,
                capture_hardware_metrics=False, source_files=[], git_ref=False)
        finally:
            if previous is None:
                os.environ.pop("NEPTUNE_DATA_DIRECTORY", None)
            else:
                os.environ["NEPTUNE_DATA_DIRECTORY"] = previous
        self.run["config"] = flatten(config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.run[key].append(value, step=step)

    def close(self) -> None:
        self.run.stop()


_CLEARML_FRAMEWORKS = ("matplotlib", "tensorflow", "tensorboard", "pytorch", "xgboost", "scikit", "fastai", "lightgbm",
                       "hydra", "detect_repository", "tfdefines", "joblib", "megengine", "catboost", "gradio")


class ClearMLTracker(Tracker):
    """A ClearML task in offline mode; its session zip is copied to ``<run_dir>/clearml/`` when closed.

    ClearML's automatic hooks (frameworks, argparse, console, resource monitor) are off: the Trainer
    reports what it logs and nothing else. ``Task.import_offline_session(zip)`` uploads it later.
    """

    name = "clearml"

    def __init__(self, project: str = "nexus", run_name: str | None = None):
        self.project, self.run_name = project, run_name

    def open(self, run_dir: Path, config: dict) -> None:
        clearml = _import("clearml", self.name)
        self.run_dir = Path(run_dir)
        clearml.Task.set_offline(offline_mode=True)
        # every hook off, the git repository detection too (it runs git in a thread that close() waits for)
        frameworks = dict.fromkeys(_CLEARML_FRAMEWORKS, False)
        self.task = clearml.Task.init(
            project_name=self.project, task_name=self.run_name or self.run_dir.name, reuse_last_task_id=False,
            auto_connect_frameworks=frameworks, auto_connect_arg_parser=False, auto_connect_streams=False,
            auto_resource_monitoring=False)
        self.task.connect(flatten(config), name="config")
        self.logger = self.task.get_logger()
        self.session: Path | None = None  # the offline session zip, once closed

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.logger.report_scalar(title=key, series=key, value=value, iteration=step)

    def close(self) -> None:
        folder = Path(self.task.get_offline_mode_folder())
        self.task.close()  # flushes the reports and zips the session folder beside it
        target = self.run_dir / "clearml"
        target.mkdir(parents=True, exist_ok=True)
        zipped = folder.with_suffix(".zip")
        if zipped.exists():
            self.session = Path(shutil.copy2(zipped, target / zipped.name))
        else:  # an older ClearML that leaves the folder unzipped
            self.session = Path(shutil.copytree(folder, target / folder.name, dirs_exist_ok=True))


class Trackers:
    """The open trackers of one run; ``log`` sends the numeric metrics to each."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def __iter__(self):
        return iter(self.trackers)

    def __getitem__(self, name: str) -> Tracker:
        for tracker in self.trackers:
            if tracker.name == name:
                return tracker
        raise KeyError(name)

    def log(self, metrics: dict, step: int) -> None:
        scalars = _scalars(metrics)
        if scalars:
            for tracker in self.trackers:
                tracker.log(scalars, step)

    def close(self) -> None:
        """Close every tracker; the first failure is raised after all have been closed."""
        first = None
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as exc:  # the others must still flush their files
                first = first or exc
        self.trackers = []
        if first is not None:
            raise first


def build_tracker(name: str, *, project: str = "nexus", run_name: str | None = None, wandb_mode: str = "offline",
                  mlflow_tracking_uri: str | None = None) -> Tracker:
    """The (unopened) tracker called ``name``."""
    if name == "tensorboard":
        return TensorBoardTracker()
    if name == "wandb":
        return WandbTracker(project, wandb_mode, run_name)
    if name == "mlflow":
        return MLflowTracker(project, mlflow_tracking_uri, run_name)
    if name == "neptune":
        return NeptuneTracker(project, run_name)
    if name == "clearml":
        return ClearMLTracker(project, run_name)
    raise ValueError(f"unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")


def open_trackers(report_to: list[str] | str | None, run_dir: str | Path, config: dict | None = None,
                  **options: Any) -> Trackers:
    """Open the trackers named by ``report_to`` for the run in ``run_dir``; ``config`` (a nested dict of
    plain values) is recorded as the run's parameters. ``options``: ``project``, ``run_name``,
    ``wandb_mode``, ``mlflow_tracking_uri``. A missing extra fails before anything is opened."""
    names = resolve_report_to(report_to)
    check_available(names)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    opened: list[Tracker] = []
    try:
        for name in names:
            tracker = build_tracker(name, **options)
            tracker.open(run_dir, dict(config or {}))
            opened.append(tracker)
    except BaseException:
        with contextlib.suppress(Exception):  # the open failure is the error to report
            Trackers(opened).close()
        raise
    return Trackers(opened)


def read_metrics(jsonl: str | Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl``, one per step: a step logged again (a resumed run
    that repeated it) keeps its latest values."""
    by_step: dict[int, dict] = {}
    with open(jsonl) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            record = json.loads(line)
            by_step.setdefault(record["step"], {}).update(record)
    return [by_step[s] for s in sorted(by_step)]


def plot_training_curves(jsonl: str | Path, png: str | Path | None = None) -> Path | None:
    """Draw training and validation loss and the learning rate against the step from a run's
    ``metrics.jsonl`` into ``png`` (default ``training_curves.png`` beside it): 1000 x 400 pixels.

    Returns the PNG's path, or None when the run logged no loss or learning rate yet. Uses
    matplotlib's Agg canvas directly (no pyplot, no global backend change).
    """
    jsonl = Path(jsonl)
    png = Path(png) if png is not None else jsonl.parent / CURVES_PNG
    records = read_metrics(jsonl) if jsonl.exists() else []

    def series(key):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        return [p[0] for p in points], [p[1] for p in points]

    curves = {key: series(key) for key in ("loss", "val_loss", "lr")}
    if not any(xs for xs, _ in curves.values()):
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingExtraError(f"the loss / learning-rate plot needs matplotlib: {EXTRA_HINT}") from exc
    fig = Figure(figsize=CURVES_SIZE, dpi=CURVES_DPI)
    FigureCanvasAgg(fig)
    loss_ax, lr_ax = fig.subplots(1, 2)
    for key, label, style in (("loss", "train loss", "-"), ("val_loss", "validation loss", "o-")):
        xs, ys = curves[key]
        if xs:
            loss_ax.plot(xs, ys, style, label=label, markersize=3)
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    if curves["loss"][0] or curves["val_loss"][0]:
        loss_ax.legend()
    xs, ys = curves["lr"]
    lr_ax.plot(xs, ys, color="tab:green")
    lr_ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    fig.tight_layout()  # moves the axes inside the figure; the canvas keeps its size
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=CURVES_DPI)
    return png
