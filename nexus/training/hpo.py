"""Hyperparameter search: grid, random, Bayesian (GP or TPE), Hyperband and successive halving on
Optuna; population-based training and the same search spaces on Ray Tune.

Every entry point minimises (or, with ``direction="maximize"``, maximises) an objective
``objective(params: dict, trial) -> float``: ``params`` holds this trial's values by name and
``trial`` is the Optuna trial, for ``trial.report(value, step)`` and ``trial.should_prune()``
(raise ``optuna.TrialPruned`` when it says so). A search space maps each name to an Optuna
distribution, to ``(low, high)`` (ints give an integer range), to ``(low, high, "log")``, or to a list
of choices. Each call returns an ``HPOResult`` with ``best_params``, ``best_value`` and the Optuna
``study``; with ``output_dir`` the study (a journal file), ``best_params.json``, ``trials.json`` and
Optuna's plots (PNG) are written there. ``n_workers > 1`` runs trials in that many processes on the
study's storage (a local journal file, or the SQLite / journal URL given as ``storage``); the
objective must then be picklable (a module-level function).

Example::
    def objective(params, trial):
        return (params["learning_rate"] - 3e-3) ** 2 + params["warmup_steps"] / 1e4

    result = grid_search(objective, ParamGrid(learning_rate=[1e-3, 3e-3], warmup_steps=[0, 100]))
    result = bayesian_optimization(objective, {"learning_rate": (1e-4, 1e-1, "log"), "warmup_steps": (0, 500)},
                                   config=BayesianOptConfig(n_trials=50,
                                                            acquisition_fn=AcquisitionFunction.ExpectedImprovement))
    result.best_params, result.best_value, result.study

A Trainer factory can be the objective's body; ``PruningCallback`` feeds its evaluations to the pruner::

    def objective(params, trial):
        args = TrainingArguments(learning_rate=params["learning_rate"], warmup_steps=params["warmup_steps"],
                                 max_steps=200, eval_steps=20, output_dir=f"runs/hpo/trial_{trial.number}")
        pruning = PruningCallback(trial, "val_loss")
        trainer = Trainer(build_model(), train_dataset, val_dataset, None, args, callbacks=[pruning])
        trainer.train()
        if pruning.pruned:
            raise TrialPruned()
        return pruning.last

Optuna is the ``[hpo]`` extra (``pip install 'nexus-train[hpo]'``), as is Ray Tune.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import functools
import json
import math
import multiprocessing
import os
import random
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nexus.training.trainer import TrainerCallback

EXTRA_HINT = "pip install 'nexus-train[hpo]'"
DIRECTIONS = ("minimize", "maximize")
SAMPLERS = ("tpe", "random", "gp", "grid")
PRUNERS = ("none", "hyperband", "successive_halving", "median")


def _optuna():
    try:
        import optuna
    except ImportError as exc:
        from nexus.training.tracking import MissingExtraError

        raise MissingExtraError(f"hyperparameter search needs Optuna: {EXTRA_HINT}") from exc
    return optuna


def _ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves the machine
    if "RAY_ADDRESS" not in os.environ:
        # a one-node Ray on loopback only: by default Ray binds every interface and advertises this machine's
        # address; set RAY_ADDRESS (or this variable to 1) before the first import to join a cluster
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
        from ray import tune  # noqa: F401
    except ImportError as exc:
        from nexus.training.tracking import MissingExtraError

        raise MissingExtraError(f"population-based training and Ray Tune searches need ray[tune]: "
                                f"{EXTRA_HINT}") from exc
    return ray


def __getattr__(name: str):
    if name == "TrialPruned":  # raise it when trial.should_prune() says so
        return _optuna().TrialPruned
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- configuration ------------------------------------------------------------------------------
class AcquisitionFunction(enum.Enum):
    """What the Gaussian-process surrogate maximises to pick the next trial (Optuna's GP sampler)."""

    ExpectedImprovement = "ei"  # Optuna's log expected improvement
    UpperConfidenceBound = "ucb"  # Optuna's UCB: mean + sqrt(beta * variance) of the (negated) objective
    EI = "ei"
    UCB = "ucb"


@dataclasses.dataclass(kw_only=True)
class BayesianOptConfig:
    """Bayesian optimisation: ``surrogate`` "gp" (Optuna's GPSampler, ``acquisition_fn``) or "tpe"
    (Optuna's TPESampler); the first ``n_startup_trials`` are random."""

    n_trials: int = 50
    acquisition_fn: AcquisitionFunction | str = AcquisitionFunction.ExpectedImprovement
    surrogate: str = "gp"
    n_startup_trials: int = 10
    ucb_beta: float = 2.0
    seed: int | None = 0

    def __post_init__(self):
        if isinstance(self.acquisition_fn, str):
            try:
                self.acquisition_fn = AcquisitionFunction(self.acquisition_fn.lower())
            except ValueError:
                names = ", ".join(sorted({m.value for m in AcquisitionFunction}))
                raise ValueError(f"acquisition_fn must be one of {names}, got {self.acquisition_fn!r}") from None
        if self.surrogate not in ("gp", "tpe"):
            raise ValueError(f"surrogate must be gp or tpe, got {self.surrogate!r}")
        if self.surrogate == "tpe" and self.acquisition_fn is not AcquisitionFunction.ExpectedImprovement:
            raise ValueError(f"acquisition_fn {self.acquisition_fn.name} needs surrogate 'gp': TPE maximises "
                             "its own expected-improvement ratio")
        for name in ("n_trials", "n_startup_trials"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.ucb_beta > 0:
            raise ValueError(f"ucb_beta must be positive, got {self.ucb_beta}")


class ParamGrid(Mapping):
    """The values of each hyperparameter for ``grid_search``: every combination is one trial.

    Example: ``ParamGrid(learning_rate=[1e-5, 1e-4, 1e-3], batch_size=[16, 32, 64], warmup_steps=[500, 1000, 2000])``
    """

    def __init__(self, **values: list):
        if not values:
            raise ValueError("ParamGrid needs at least one hyperparameter")
        for name, choices in values.items():
            if isinstance(choices, (str, bytes)) or not isinstance(choices, (list, tuple)) or not choices:
                raise ValueError(f"ParamGrid {name}: expected a non-empty list of values, got {choices!r}")
            for v in choices:
                if v is not None and not isinstance(v, (bool, int, float, str)):
                    raise ValueError(f"ParamGrid {name}: values must be numbers, strings, booleans or None, got {v!r}")
        self._values = {name: list(choices) for name, choices in values.items()}

    def __getitem__(self, name: str) -> list:
        return self._values[name]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    @property
    def size(self) -> int:
        """The number of combinations."""
        return math.prod(len(v) for v in self._values.values())

    def __repr__(self) -> str:
        return f"ParamGrid({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"


@dataclasses.dataclass
class HPOResult:
    """What a search found: ``best_params`` (a dict), ``best_value``, and the Optuna ``study``."""

    best_params: dict
    best_value: float
    study: Any
    output_dir: Path | None = None

    @property
    def n_trials(self) -> int:
        return len(self.study.trials)

    @property
    def n_pruned(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=(_optuna().trial.TrialState.PRUNED,)))

    @property
    def n_complete(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=(_optuna().trial.TrialState.COMPLETE,)))


# ---- search spaces ------------------------------------------------------------------------------
def to_distribution(name: str, spec: Any):
    """One entry of a search space as an Optuna distribution (see the module docstring)."""
    optuna = _optuna()
    dist = optuna.distributions
    if isinstance(spec, dist.BaseDistribution):
        return spec
    if isinstance(spec, list):
        if not spec:
            raise ValueError(f"search space {name}: an empty list of choices")
        return dist.CategoricalDistribution(spec)
    if isinstance(spec, tuple) and len(spec) in (2, 3):
        low, high = spec[0], spec[1]
        log = len(spec) == 3
        if log and spec[2] != "log":
            raise ValueError(f"search space {name}: the third item of a range must be 'log', got {spec[2]!r}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
            raise ValueError(f"search space {name}: a range needs numbers low < high, got {spec!r}")
        if log and low <= 0:
            raise ValueError(f"search space {name}: a log range needs low > 0, got {spec!r}")
        if isinstance(low, int) and isinstance(high, int):
            return dist.IntDistribution(low, high, log=log)
        return dist.FloatDistribution(float(low), float(high), log=log)
    raise ValueError(f"search space {name}: expected an Optuna distribution, (low, high), (low, high, 'log') "
                     f"or a list of choices, got {spec!r}")


def search_space(space: Mapping) -> dict:
    """Every entry of ``space`` as an Optuna distribution."""
    if not isinstance(space, Mapping) or not space:
        raise ValueError(f"a search space must be a non-empty mapping of names to ranges, got {space!r}")
    return {name: to_distribution(name, spec) for name, spec in space.items()}


def suggest(trial, name: str, distribution) -> Any:
    """Draw ``name`` from ``distribution`` through the trial's public suggest API."""
    dist = _optuna().distributions
    if isinstance(distribution, dist.FloatDistribution):
        return trial.suggest_float(name, distribution.low, distribution.high, log=distribution.log,
                                   step=distribution.step)
    if isinstance(distribution, dist.IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, log=distribution.log,
                                 step=distribution.step)
    if isinstance(distribution, dist.CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    raise ValueError(f"{name}: unsupported distribution {distribution!r}")


class _Objective:
    """Optuna's ``objective(trial)`` around the user's ``objective(params, trial)`` (picklable)."""

    def __init__(self, objective: Callable, distributions: dict):
        self.objective, self.distributions = objective, distributions

    def __call__(self, trial) -> float:
        params = {name: suggest(trial, name, d) for name, d in self.distributions.items()}
        value = self.objective(params, trial)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"the objective must return a number, got {value!r}")
        return float(value)


# ---- samplers and pruners -----------------------------------------------------------------------
def make_sampler(kind: str, seed: int | None = None, *, n_startup_trials: int = 10, grid: dict | None = None,
                 acquisition_fn: AcquisitionFunction | str = AcquisitionFunction.ExpectedImprovement,
                 ucb_beta: float = 2.0):
    """Optuna's sampler for ``kind``: tpe, random, gp (``acquisition_fn``) or grid (``grid``: name -> values)."""
    optuna = _optuna()
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "gp":
        acquisition_fn = AcquisitionFunction(acquisition_fn) if isinstance(acquisition_fn, str) else acquisition_fn
        if acquisition_fn is AcquisitionFunction.UpperConfidenceBound:
            return _ucb_gp_sampler(seed, n_startup_trials, ucb_beta)
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials)
    if kind == "grid":
        if not grid:
            raise ValueError("the grid sampler needs the grid's values")
        return optuna.samplers.GridSampler(dict(grid), seed=seed)
    raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {kind!r}")


def _ucb_gp_sampler(seed, n_startup_trials, beta):
    """Optuna's GPSampler choosing points by Optuna's own UCB acquisition (its public API offers log EI only)."""
    optuna = _optuna()
    import optuna._gp.acqf as acqf

    base = optuna.samplers.GPSampler
    if not hasattr(base, "_get_acqf_and_best_params") or not hasattr(acqf, "UCB"):
        raise NotImplementedError(f"this Optuna ({optuna.__version__}) GP sampler does not expose its UCB "
                                  "acquisition; use AcquisitionFunction.ExpectedImprovement")

    class UCBGPSampler(base):
        def _get_acqf_and_best_params(self, completed_trials, gprs_list, search_space, normalized_params,
                                      running, standardized_score_vals):
            if len(gprs_list) != 1:
                raise NotImplementedError("UCB is for one objective without constraints")
            best = normalized_params[standardized_score_vals[:, 0].argmax(), None]
            return acqf.UCB(gpr=gprs_list[0], search_space=search_space, beta=beta), best

    return UCBGPSampler(seed=seed, n_startup_trials=n_startup_trials)


def make_pruner(kind: str, *, min_resource: int = 1, max_resource: int | str = "auto", reduction_factor: int = 3):
    """Optuna's pruner for ``kind``: none, hyperband, successive_halving or median."""
    optuna = _optuna()
    if kind == "none":
        return optuna.pruners.NopPruner()
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_resource, max_resource=max_resource,
                                              reduction_factor=reduction_factor)
    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=reduction_factor)
    if kind == "median":
        return optuna.pruners.MedianPruner(n_warmup_steps=min_resource)
    raise ValueError(f"pruner must be one of {', '.join(PRUNERS)}, got {kind!r}")


# ---- the search ---------------------------------------------------------------------------------
def _storage_url(storage: str | None, output_dir: Path | None, n_workers: int) -> str | None:
    """Where the study lives: the given URL, a journal file in ``output_dir``, a temporary journal file for
    parallel workers, or None (memory) for one process."""
    if storage is not None:
        return storage
    if output_dir is not None:
        return str(output_dir / "study.journal")
    if n_workers > 1:
        return str(Path(tempfile.mkdtemp(prefix="nexus_hpo_")) / "study.journal")
    return None


def open_storage(url: str | None):
    """An Optuna storage for ``url``: an SQL URL (``sqlite:///...``), a journal file path, or None (memory)."""
    optuna = _optuna()
    if url is None:
        return optuna.storages.InMemoryStorage()
    if "://" in url:
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}
                                          if url.startswith("sqlite") else None)
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(url))


def _run_worker(study_name: str, storage_url: str, objective: _Objective, sampler_factory: Callable, seed: int | None,
                pruner, n_trials: int | None) -> None:
    """One worker process: load the shared study and run its share of the trials."""
    optuna = _optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage_url),
                              sampler=sampler_factory(seed), pruner=pruner)
    study.optimize(objective, n_trials=n_trials)


def optimize(objective: Callable, space: Mapping, *, n_trials: int | None, sampler_factory: Callable,
             seed: int | None = 0, pruner=None, n_workers: int = 1, storage: str | None = None,
             study_name: str = "nexus", output_dir: str | Path | None = None,
             direction: str = "minimize") -> HPOResult:
    """The common core: a study of ``n_trials`` trials of ``objective`` over ``space`` with the sampler
    ``sampler_factory(seed)`` and ``pruner``, on ``n_workers`` processes. ``n_trials=None`` runs until the
    sampler stops the study (the grid)."""
    optuna = _optuna()
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be minimize or maximize, got {direction!r}")
    if n_trials is not None and (isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials <= 0):
        raise ValueError(f"n_trials must be a positive integer, got {n_trials!r}")
    if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers <= 0:
        raise ValueError(f"n_workers must be a positive integer, got {n_workers!r}")
    if not callable(objective):
        raise TypeError(f"objective must be callable as objective(params, trial), got {objective!r}")
    wrapped = _Objective(objective, search_space(space))
    output_dir = Path(output_dir) if output_dir is not None else None
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
    url = _storage_url(storage, output_dir, n_workers)
    study = optuna.create_study(study_name=study_name, storage=open_storage(url), sampler=sampler_factory(seed),
                                pruner=pruner, direction=direction, load_if_exists=True)
    if n_workers == 1:
        study.optimize(wrapped, n_trials=n_trials)
    else:
        shares = ([n_trials // n_workers + (i < n_trials % n_workers) for i in range(n_workers)]
                  if n_trials is not None else [None] * n_workers)
        # spawn: a fresh interpreter per worker (forking a process with torch's or Optuna's threads can hang)
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(n_workers, mp_context=context) as pool:
            futures = [pool.submit(_run_worker, study_name, url, wrapped, sampler_factory,
                                   None if seed is None else seed + i, pruner, share)
                       for i, share in enumerate(shares) if share != 0]
            for future in futures:
                future.result()  # a worker's error is raised here
        study = optuna.load_study(study_name=study_name, storage=open_storage(url))
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise RuntimeError(f"no trial of study {study_name!r} completed ({len(study.trials)} trials: "
                           "every one failed or was pruned)")
    result = HPOResult(best_params=dict(study.best_params), best_value=study.best_value, study=study,
                       output_dir=output_dir)
    if output_dir is not None:
        write_results(result, output_dir)
    return result


def _sampler_factory(kind: str, **options) -> Callable:
    return functools.partial(_make_seeded_sampler, kind, options)


def _make_seeded_sampler(kind: str, options: dict, seed: int | None):
    return make_sampler(kind, seed, **options)


def grid_search(objective: Callable, param_grid: ParamGrid | Mapping, **options: Any) -> HPOResult:
    """Every combination of ``param_grid`` once (Optuna's GridSampler).

    ``options``: ``n_workers``, ``storage``, ``study_name``, ``output_dir``, ``direction``, ``seed``
    (the order in which the grid is visited).
    """
    grid = param_grid if isinstance(param_grid, ParamGrid) else ParamGrid(**dict(param_grid))
    space = {name: list(values) for name, values in grid.items()}
    parallel = options.get("n_workers", 1) > 1
    # one process runs exactly the grid; parallel workers run until the sampler has handed out every point
    return optimize(objective, space, n_trials=None if parallel else grid.size,
                    sampler_factory=_sampler_factory("grid", grid=space), **options)


def random_search(objective: Callable, space: Mapping, n_trials: int = 50, **options: Any) -> HPOResult:
    """``n_trials`` independent draws from ``space`` (Optuna's RandomSampler, seeded by ``seed``)."""
    return optimize(objective, space, n_trials=n_trials, sampler_factory=_sampler_factory("random"), **options)


def bayesian_optimization(objective: Callable, space: Mapping, config: BayesianOptConfig | None = None,
                          **options: Any) -> HPOResult:
    """Sequential model-based search: Optuna's GPSampler with ``config.acquisition_fn`` (or TPE)."""
    config = config or BayesianOptConfig()
    factory = (_sampler_factory("gp", n_startup_trials=config.n_startup_trials, acquisition_fn=config.acquisition_fn,
                                ucb_beta=config.ucb_beta) if config.surrogate == "gp"
               else _sampler_factory("tpe", n_startup_trials=config.n_startup_trials))
    options.setdefault("seed", config.seed)
    return optimize(objective, space, n_trials=config.n_trials, sampler_factory=factory, **options)


def hyperband(objective: Callable, space: Mapping, n_trials: int = 50, max_resource: int = 81, *,
              min_resource: int = 1, reduction_factor: int = 3, sampler: str = "tpe", **options: Any) -> HPOResult:
    """Hyperband (Optuna's HyperbandPruner: successive-halving brackets): the objective reports its
    value at steps 1..``max_resource`` with ``trial.report`` and stops when ``trial.should_prune()``."""
    pruner = make_pruner("hyperband", min_resource=min_resource, max_resource=max_resource,
                         reduction_factor=reduction_factor)
    return optimize(objective, space, n_trials=n_trials, sampler_factory=_sampler_factory(sampler), pruner=pruner,
                    **options)


def successive_halving(objective: Callable, space: Mapping, n_trials: int = 50, *, min_resource: int = 1,
                       reduction_factor: int = 4, sampler: str = "tpe", **options: Any) -> HPOResult:
    """Asynchronous successive halving (Optuna's SuccessiveHalvingPruner); the objective reports as for
    ``hyperband``."""
    pruner = make_pruner("successive_halving", min_resource=min_resource, reduction_factor=reduction_factor)
    return optimize(objective, space, n_trials=n_trials, sampler_factory=_sampler_factory(sampler), pruner=pruner,
                    **options)


# ---- what a search leaves in its folder ---------------------------------------------------------
def write_results(result: HPOResult, output_dir: str | Path) -> None:
    """``best_params.json``, ``trials.json`` and Optuna's plots (``plots/*.png``) in ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    study = result.study
    states = [t.state.name for t in study.trials]
    summary = {"best_params": result.best_params, "best_value": result.best_value,
               "direction": study.direction.name.lower(), "study_name": study.study_name,
               "n_trials": len(states), **{f"n_{s.lower()}": states.count(s) for s in sorted(set(states))}}
    (output_dir / "best_params.json").write_text(json.dumps(summary, indent=2) + "\n")
    trials = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
               "intermediate_values": {str(k): v for k, v in sorted(t.intermediate_values.items())},
               "user_attrs": t.user_attrs} for t in study.trials]
    (output_dir / "trials.json").write_text(json.dumps(trials, indent=1, default=str) + "\n")
    write_plots(study, output_dir / "plots")


def write_plots(study, folder: str | Path) -> list[Path]:
    """Optuna's matplotlib plots of ``study`` as PNGs in ``folder``: optimization history, slice, parameter
    importances (with two or more completed trials; needs scikit-learn), intermediate values (when trials
    reported). Returns the files written."""
    try:
        import matplotlib
    except ImportError as exc:
        from nexus.training.tracking import MissingExtraError

        raise MissingExtraError(f"Optuna's plots need matplotlib: {EXTRA_HINT}") from exc
    import sys

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # no display needed; an interactive session keeps its own backend
    import matplotlib.pyplot as plt

    optuna = _optuna()
    vis = optuna.visualization.matplotlib
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    plots: dict[str, Callable] = {"optimization_history": vis.plot_optimization_history, "slice": vis.plot_slice}
    if len(complete) >= 2:
        plots["param_importances"] = vis.plot_param_importances
    if any(t.intermediate_values for t in study.trials):
        plots["intermediate_values"] = vis.plot_intermediate_values
    written = []
    for name, plot in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            try:
                axes = plot(study)
            except ImportError:  # parameter importances need scikit-learn: skip that plot
                continue
        first = axes.flat[0] if hasattr(axes, "flat") else axes
        path = folder / f"{name}.png"
        first.figure.savefig(path, dpi=80)
        plt.close(first.figure)
        written.append(path)
    return written


# ---- Ray Tune -----------------------------------------------------------------------------------
def init_ray(num_cpus: int | None = None) -> None:
    """Start a local one-node Ray (no dashboard, no usage statistics) unless one is already running
    (``ray.init(address=...)`` first to use a cluster)."""
    ray = _ray()
    if not ray.is_initialized():
        # a one-node Ray whose processes listen on 127.0.0.1 only (see _ray)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)


def _ship_by_value(objective: Callable) -> None:
    """Let Ray's workers run ``objective`` even where its module cannot be imported (a script, a test
    file, a cluster node without the user's code): cloudpickle sends that module's code by value.
    Modules of installed packages (site-packages) travel by reference as usual."""
    import sys

    from ray import cloudpickle  # Ray pickles with its own copy of cloudpickle

    module = sys.modules.get(getattr(objective, "__module__", None) or "")
    path = getattr(module, "__file__", None) or ""
    if module is None or module.__name__ == "__main__" or "site-packages" in path or "dist-packages" in path:
        return
    if module.__name__.split(".")[0] == __name__.split(".")[0]:  # nexus itself is installed beside Ray
        return
    cloudpickle.register_pickle_by_value(module)


def to_ray_domain(name: str, distribution):
    """An Optuna distribution as the Ray Tune domain with the same support."""
    from ray import tune

    dist = _optuna().distributions
    if isinstance(distribution, dist.CategoricalDistribution):
        return tune.choice(list(distribution.choices))
    if isinstance(distribution, dist.IntDistribution):
        if distribution.log:
            return tune.lograndint(distribution.low, distribution.high + 1)
        return tune.randint(distribution.low, distribution.high + 1)  # Ray's upper bound is exclusive
    if isinstance(distribution, dist.FloatDistribution):
        if distribution.log:
            return tune.loguniform(distribution.low, distribution.high)
        return tune.uniform(distribution.low, distribution.high)
    raise ValueError(f"{name}: no Ray Tune domain for {distribution!r}")


class RayTrial:
    """What a Ray Tune trial passes as ``trial``: ``report(value, step)`` goes to Ray (whose scheduler
    stops a bad trial at its next report); ``should_prune()`` is therefore always False."""

    def __init__(self, metric: str):
        self.metric = metric

    def report(self, value: float, step: int) -> None:
        from ray import tune

        tune.report({self.metric: float(value), "step": step})

    def should_prune(self) -> bool:
        return False


def _ray_objective(config: dict, *, objective: Callable, names: list[str], metric: str) -> None:
    params = {name: config[name] for name in names}
    value = objective(params, RayTrial(metric))
    from ray import tune

    tune.report({metric: float(value), "final": 1})


def ray_tune_search(objective: Callable, space: Mapping, n_trials: int = 20, *, sampler: str = "tpe",
                    seed: int | None = 0, scheduler: str | None = None, max_resource: int | None = None,
                    max_concurrent: int | None = None, num_cpus: int | None = None,
                    cpus_per_trial: float = 1, direction: str = "minimize",
                    output_dir: str | Path | None = None) -> HPOResult:
    """The same search on Ray Tune (a local Ray, or the cluster ``ray.init`` joined): Optuna's sampler
    drives Ray's OptunaSearch over ``space``; ``scheduler="asha"`` stops bad trials at their reports
    (``max_resource`` reports at most). ``objective(params, trial)`` runs in Ray's workers."""
    optuna = _optuna()
    _ray()
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be minimize or maximize, got {direction!r}")
    distributions = search_space(space)
    output_dir = Path(output_dir).resolve() if output_dir is not None else None
    storage = optuna.storages.InMemoryStorage()
    mode = "min" if direction == "minimize" else "max"
    metric = "value"
    searcher = OptunaSearch(space=distributions, metric=metric, mode=mode, sampler=make_sampler(sampler, seed),
                            study_name="nexus", storage=storage)
    trial_scheduler = None
    if scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        trial_scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_resource or 100, grace_period=1)
    elif scheduler is not None:
        raise ValueError(f"scheduler must be None or 'asha', got {scheduler!r}")
    init_ray(num_cpus)
    _ship_by_value(objective)
    trainable = tune.with_resources(
        tune.with_parameters(_ray_objective, objective=objective, names=list(distributions), metric=metric),
        {"cpu": cpus_per_trial})
    storage_path = output_dir or Path(tempfile.mkdtemp(prefix="nexus_ray_"))
    tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(
        search_alg=searcher, scheduler=trial_scheduler, num_samples=n_trials, metric=metric, mode=mode,
        max_concurrent_trials=max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(name="ray_tune", storage_path=str(storage_path), verbose=0))
    grid = tuner.fit()
    study = optuna.load_study(study_name="nexus", storage=storage)
    best = grid.get_best_result(metric=metric, mode=mode, scope="last")
    result = HPOResult(best_params={name: best.config[name] for name in distributions},
                       best_value=float(best.metrics[metric]), study=study, output_dir=output_dir)
    if output_dir is not None:
        write_results(result, output_dir)
    return result


@dataclasses.dataclass
class PBTResult:
    """Population-based training's outcome: the best member's current ``best_params`` and ``best_value``,
    its last checkpoint, the population's first-interval values, and Ray's ``ResultGrid``."""

    best_params: dict
    best_value: float
    best_checkpoint: Path | None
    initial_values: list[float]
    results: Any


def _pbt_trainable(config: dict, *, objective: Callable, names: list[str]) -> None:
    """One PBT member on Ray: per interval, ``objective(params, restore_dir, save_dir)`` trains from the
    checkpoint in ``restore_dir`` (None at the start; a better member's after an exploit) and saves to
    ``save_dir``, which Ray keeps as this member's checkpoint."""
    from ray import tune

    params = {name: config[name] for name in names}
    checkpoint = tune.get_checkpoint()
    restore, iteration = None, 0
    if checkpoint is not None:
        restore = Path(checkpoint.to_directory())
        iteration = json.loads((restore / "nexus_pbt.json").read_text())["iteration"]
    while True:
        save = Path(tempfile.mkdtemp(prefix="nexus_pbt_"))
        value = float(objective(dict(params), restore, save))
        iteration += 1
        (save / "nexus_pbt.json").write_text(json.dumps({"iteration": iteration, "params": params, "value": value}))
        tune.report({"value": value, "interval": iteration, **{f"param_{k}": v for k, v in params.items()}},
                    checkpoint=tune.Checkpoint.from_directory(str(save)))  # Ray copies it to its storage
        if restore is not None:
            shutil.rmtree(restore, ignore_errors=True)
        restore = save


def population_based_training(objective: Callable, space: Mapping, *, population_size: int = 4,
                              n_intervals: int = 8, perturbation_interval: int = 1,
                              mutations: Mapping | None = None, quantile_fraction: float = 0.25,
                              resample_probability: float = 0.25, seed: int | None = 0,
                              direction: str = "minimize", num_cpus: int | None = None,
                              cpus_per_member: float = 1, output_dir: str | Path | None = None) -> PBTResult:
    """Population-based training on Ray Tune's PBT scheduler (synchronous): ``population_size`` members
    drawn from ``space`` train ``n_intervals`` intervals; every ``perturbation_interval`` the worst
    ``quantile_fraction`` copy a best member's checkpoint (exploit) and perturb its hyperparameters (explore:
    x1.2 / x0.8, or a fresh draw from ``mutations`` (default ``space``) with ``resample_probability``).

    ``objective(params, restore_dir, save_dir) -> float`` runs one interval: load the state in
    ``restore_dir`` when it is not None (a Trainer checkpoint written there earlier), train, write the
    state into ``save_dir`` (``trainer.save_checkpoint(save_dir / "checkpoint.pt")``) and return the value.
    """
    _ray()
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining
    from ray.tune.search import BasicVariantGenerator

    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be minimize or maximize, got {direction!r}")
    for name, value in (("population_size", population_size), ("n_intervals", n_intervals),
                        ("perturbation_interval", perturbation_interval)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    distributions = search_space(space)
    domains = {name: to_ray_domain(name, d) for name, d in distributions.items()}
    mutation_space = ({name: to_ray_domain(name, d) for name, d in search_space(mutations).items()}
                      if mutations is not None else domains)
    mode = "min" if direction == "minimize" else "max"
    if seed is not None:
        random.seed(seed)  # PBT's explore step draws from Python's random in this (the driver) process
    scheduler = PopulationBasedTraining(time_attr="training_iteration", metric="value", mode=mode,
                                        perturbation_interval=perturbation_interval,
                                        hyperparam_mutations=dict(mutation_space), quantile_fraction=quantile_fraction,
                                        resample_probability=resample_probability, synch=True)
    init_ray(num_cpus)
    _ship_by_value(objective)
    trainable = tune.with_resources(
        tune.with_parameters(_pbt_trainable, objective=objective, names=list(distributions)), {"cpu": cpus_per_member})
    output_dir = Path(output_dir).resolve() if output_dir is not None else None
    storage_path = output_dir or Path(tempfile.mkdtemp(prefix="nexus_pbt_"))
    tuner = tune.Tuner(trainable, param_space=domains, tune_config=tune.TuneConfig(
        scheduler=scheduler, num_samples=population_size, reuse_actors=True,
        search_alg=BasicVariantGenerator(random_state=seed)),
        run_config=tune.RunConfig(name="pbt", storage_path=str(storage_path), verbose=0,
                                  stop={"training_iteration": n_intervals}))
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} PBT member(s) failed; the first: {errors[0]!r}") from errors[0]
    best = grid.get_best_result(metric="value", mode=mode, scope="last")
    initial = []
    for r in grid:
        history = r.metrics_dataframe if r.metrics_dataframe is not None else None
        if history is not None and len(history):
            initial.append(float(history.sort_values("training_iteration")["value"].iloc[0]))
    result = PBTResult(best_params={name: best.config[name] for name in distributions},
                       best_value=float(best.metrics["value"]),
                       best_checkpoint=Path(best.checkpoint.path) if best.checkpoint is not None else None,
                       initial_values=initial, results=grid)
    if output_dir is not None:
        (output_dir / "best_params.json").write_text(json.dumps(
            {"best_params": result.best_params, "best_value": result.best_value,
             "best_checkpoint": str(result.best_checkpoint), "initial_values": initial}, indent=2) + "\n")
    return result


# ---- `nexus hpo`: a search over a run file's hpo: section ---------------------------------------
@dataclasses.dataclass(kw_only=True)
class HPOConfig:
    """The ``hpo:`` section of a run file: what ``nexus hpo --config X.yaml`` searches.

    ``space`` maps ``section.key`` of the run file (``training.learning_rate``, ``optimizer.type`` ...) to
    ``{low: L, high: H}`` (integers give an integer range), ``{low: L, high: H, log: true}`` or
    ``{choices: [...]}`` (the grid's values for ``sampler: grid``). Each trial trains the run's model for
    ``max_steps`` steps (default: the run's) with its values set into the run file, in
    ``<output_dir>/trial_<n>``; its evaluations (``metric``) go to the ``pruner``.

    Example (YAML)::
        hpo:
          sampler: tpe            # tpe | random | gp | grid
          pruner: hyperband       # none | hyperband | successive_halving | median
          n_trials: 4
          n_workers: 1            # processes sharing the study's journal file
          max_steps: 4
          space:
            training.learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}
            optimizer.type: {choices: [adamw, lion]}
    """

    space: dict
    sampler: str = "tpe"
    pruner: str = "none"
    n_trials: int = 20
    n_workers: int = 1
    metric: str = "val_loss"
    direction: str = "minimize"
    seed: int | None = 0
    max_steps: int | None = None
    min_resource: int = 1
    reduction_factor: int = 3
    output_dir: str | None = None  # default: <training.output_dir>/hpo
    storage: str | None = None  # default: a journal file in output_dir

    def __post_init__(self):
        if not isinstance(self.space, dict) or not self.space:
            raise ValueError(f"space must map run-file keys (section.key) to ranges, got {self.space!r}")
        for key, entry in self.space.items():
            if not isinstance(key, str) or key.count(".") != 1:
                raise ValueError(f"space: {key!r} must name a run-file key as section.key "
                                 "(e.g. training.learning_rate)")
            spec = space_entry(key, entry)
            if self.sampler == "grid" and not isinstance(spec, list):
                raise ValueError(f"space.{key}: sampler grid needs {{choices: [...]}}, got {entry!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.pruner not in PRUNERS:
            raise ValueError(f"pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be minimize or maximize, got {self.direction!r}")
        if self.metric not in ("val_loss", "val_perplexity"):
            raise ValueError(f"metric must be val_loss or val_perplexity, got {self.metric!r}")
        for name in ("n_trials", "n_workers", "min_resource", "reduction_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be a positive integer, got {self.max_steps!r}")
        if self.reduction_factor < 2:
            raise ValueError(f"reduction_factor must be at least 2, got {self.reduction_factor}")

    def search_space(self) -> dict:
        """The space as ``(low, high)`` / ``(low, high, "log")`` / list entries, keyed by ``section.key``."""
        return {key: space_entry(key, entry) for key, entry in self.space.items()}

    def check_keys(self, sections: dict[str, Any]) -> None:
        """Every space key names a field of a section of the run (``sections``: name -> its dataclass)."""
        for key in self.space:
            section, field = key.split(".")
            cls = sections.get(section)
            if cls is None:
                raise ValueError(f"space: {key!r} names no section of the run file (sections: "
                                 f"{', '.join(n for n in sections if n != 'hpo')})")
            names = cls.field_names() if hasattr(cls, "field_names") else {f.name for f in dataclasses.fields(cls)}
            if field not in names:
                raise ValueError(f"space: {key!r}: {section} has no key {field!r}")


def space_entry(key: str, entry: Any) -> tuple | list:
    """One ``hpo.space`` entry of a run file as a search-space entry (a range tuple or a list of choices)."""
    if not isinstance(entry, dict):
        raise ValueError(f"space.{key}: expected {{low: L, high: H[, log: true]}} or {{choices: [...]}}, got {entry!r}")
    if set(entry) == {"choices"}:
        choices = entry["choices"]
        if not isinstance(choices, list) or not choices:
            raise ValueError(f"space.{key}: choices must be a non-empty list, got {choices!r}")
        return list(choices)
    unknown = set(entry) - {"low", "high", "log"}
    if unknown or not {"low", "high"} <= set(entry):
        raise ValueError(f"space.{key}: expected {{low: L, high: H[, log: true]}} or {{choices: [...]}}, got {entry!r}")
    low, high = (_number(entry[k], f"space.{key}.{k}") for k in ("low", "high"))
    log = entry.get("log", False)
    if not isinstance(log, bool):
        raise ValueError(f"space.{key}.log must be true or false, got {log!r}")
    if not low < high or (log and low <= 0):
        raise ValueError(f"space.{key}: need low < high{' and low > 0 for log' if log else ''}, got {entry!r}")
    return (low, high, "log") if log else (low, high)


def _number(value: Any, where: str) -> int | float:
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    return value


class PruningCallback(TrainerCallback):
    """A Trainer callback feeding each evaluation's ``metric`` to the Optuna trial at the Trainer's step;
    when the pruner says so it stops training and records ``pruned`` (raise ``TrialPruned`` after ``train``)."""

    def __init__(self, trial, metric: str = "val_loss"):
        self.trial, self.metric = trial, metric
        self.pruned = False
        self.last: float | None = None

    def on_evaluate(self, trainer, metrics: dict) -> None:
        self.last = float(metrics[self.metric])
        self.trial.report(self.last, trainer.step)
        if self.trial.should_prune():
            self.pruned = True
            trainer.should_stop = True


class RunObjective:
    """One trial of ``nexus hpo``: the run file's sections with the trial's values set, trained by
    ``nexus.training.run.build_trainer`` in ``<output_dir>/trial_<n>``; returns the last evaluation's metric.
    Holds only plain data, so that worker processes can unpickle it."""

    def __init__(self, raw: dict, hpo: HPOConfig, output_dir: Path, source: str):
        self.raw, self.hpo, self.output_dir, self.source = raw, hpo, Path(output_dir), source

    def run_config(self, params: dict, trial_dir: Path):
        import copy

        from nexus.config import config_from_dict

        from nexus.training.trainer import SYNONYMS

        partner = {**SYNONYMS, **{name: synonym for synonym, name in SYNONYMS.items()}}
        raw = copy.deepcopy(self.raw)
        for key, value in params.items():
            section, field = key.split(".")
            raw[section] = dict(raw.get(section) or {})
            if section == "training":  # the trial's value replaces the file's under either spelling
                raw[section].pop(partner.get(field), None)
            raw[section][field] = value
        raw["training"] = {**(raw.get("training") or {}), "output_dir": str(trial_dir), "progress_bar": False}
        return config_from_dict(raw, f"{self.source} (trial values {params})")

    def __call__(self, params: dict, trial) -> float:
        from nexus.training.run import build_trainer

        trial_dir = self.output_dir / f"trial_{trial.number}"
        cfg = self.run_config(params, trial_dir)
        trainer = build_trainer(cfg, max_steps=self.hpo.max_steps, source=self.source)
        if trainer.val_loader is None:
            raise ValueError("nexus hpo needs a validation split: the trials are compared on it")
        pruning = PruningCallback(trial, self.hpo.metric)
        trainer.callbacks.append(pruning)
        trainer.train()
        if pruning.pruned:
            raise _optuna().TrialPruned(f"pruned at step {trainer.step}")
        value = pruning.last if pruning.last is not None else trainer.evaluate()[self.hpo.metric]
        trial.set_user_attr("steps", trainer.step)
        return value


def search_run_file(path: str | Path, *, n_trials: int | None = None, n_workers: int | None = None) -> HPOResult:
    """What ``nexus hpo --config X.yaml`` runs: the search of the file's ``hpo:`` section."""
    import yaml

    from nexus.config import ConfigError, load_config

    cfg = load_config(path)  # validates every section, the hpo section's keys included
    if cfg.hpo is None:
        raise ConfigError(f"{path}: no 'hpo' section: nothing to search (see configs/hpo_tiny.yaml)")
    raw = yaml.safe_load(Path(path).read_text())
    raw.pop("hpo")
    hpo = dataclasses.replace(cfg.hpo, **{k: v for k, v in (("n_trials", n_trials), ("n_workers", n_workers))
                                          if v is not None})
    output_dir = Path(hpo.output_dir or Path(cfg.training.output_dir) / "hpo")
    objective = RunObjective(raw, hpo, output_dir, str(path))
    space = hpo.search_space()
    pruner = make_pruner(hpo.pruner, min_resource=hpo.min_resource,
                         max_resource=hpo.max_steps or cfg.training.resolve_max_steps() or "auto",
                         reduction_factor=hpo.reduction_factor)
    common = dict(seed=hpo.seed, pruner=pruner, n_workers=hpo.n_workers, storage=hpo.storage,
                  output_dir=output_dir, direction=hpo.direction, study_name="nexus_hpo")
    if hpo.sampler == "grid":
        grid = ParamGrid(**space)
        return optimize(objective, space, n_trials=None if hpo.n_workers > 1 else min(hpo.n_trials, grid.size),
                        sampler_factory=_sampler_factory("grid", grid=space), **common)
    return optimize(objective, space, n_trials=hpo.n_trials, sampler_factory=_sampler_factory(hpo.sampler), **common)
