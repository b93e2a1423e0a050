"""Hyperparameter search: each strategy finds the known optimum of a synthetic objective within its budget
(the optimum computed here, by formula or brute force), pruning stops bad trials early (counted), parallel
workers share one journal study, results and plots land in the run folder, PBT on Ray Tune beats its
initial population trained without it, a Ray Tune search finds the optimum, and `nexus hpo` runs a
4-trial search of a small MoE model end to end."""
import itertools
import json
import os
import struct
from pathlib import Path

import optuna
import pytest

from nexus.training import hpo

optuna.logging.set_verbosity(optuna.logging.WARNING)

X0, Y0 = 1.3, -0.7  # the optimum of the synthetic objective


def bowl(params, trial):
    """(x - X0)^2 + (y - Y0)^2: minimum 0 at (X0, Y0)."""
    return (params["x"] - X0) ** 2 + (params["y"] - Y0) ** 2


def bowl_in_a_worker(params, trial):
    trial.set_user_attr("pid", os.getpid())
    return bowl(params, trial)


def png_size(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


def test_grid_search_runs_every_combination_and_returns_the_best():
    grid = hpo.ParamGrid(learning_rate=[1e-5, 1e-4, 1e-3], batch_size=[16, 32, 64], warmup_steps=[500, 1000, 2000])

    def loss(p):  # a smooth bowl around lr 1e-4, batch 32, warmup 1000 (on the grid)
        import math

        return ((math.log10(p["learning_rate"]) + 4) ** 2 + (p["batch_size"] / 32 - 1) ** 2
                + (p["warmup_steps"] / 1000 - 1) ** 2)

    result = hpo.grid_search(lambda params, trial: loss(params), grid)
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    assert result.n_trials == grid.size == 27
    assert sorted(tuple(sorted(t.params.items())) for t in result.study.trials) == sorted(
        tuple(sorted(c.items())) for c in combos)  # each combination exactly once
    brute = min(combos, key=loss)
    assert result.best_params == brute == {"learning_rate": 1e-4, "batch_size": 32, "warmup_steps": 1000}
    assert result.best_value == loss(brute) == 0.0


def test_random_search_within_its_budget_and_space_types():
    space = {"x": (-2.0, 2.0), "y": (-2.0, 2.0), "lr": (1e-5, 1e-1, "log"), "layers": (1, 4), "act": ["gelu", "relu"]}
    seen = []

    def objective(params, trial):
        seen.append(params)
        return bowl(params, trial)

    result = hpo.random_search(objective, space, n_trials=60, seed=0)
    assert result.n_trials == 60 == len(seen)
    # 60 uniform draws in the 4x4 square: P(none within 0.5 of the optimum) = (1 - pi 0.25 / 16)^60 < 0.05
    assert result.best_value < 0.25
    assert result.best_value == min(bowl(p, None) for p in seen)
    assert all(isinstance(p["layers"], int) and 1 <= p["layers"] <= 4 for p in seen)
    assert all(1e-5 <= p["lr"] <= 1e-1 and p["act"] in ("gelu", "relu") for p in seen)
    assert {p["layers"] for p in seen} == {1, 2, 3, 4}
    assert sum(p["lr"] < 1e-3 for p in seen) > 20  # log-uniform: half the draws below the geometric middle


@pytest.mark.parametrize("acquisition", [hpo.AcquisitionFunction.ExpectedImprovement,
                                         hpo.AcquisitionFunction.UpperConfidenceBound])
def test_bayesian_gp_finds_the_optimum_that_random_draws_miss(acquisition):
    space = {"x": (-5.0, 5.0), "y": (-5.0, 5.0)}
    config = hpo.BayesianOptConfig(n_trials=14, acquisition_fn=acquisition, n_startup_trials=6, seed=0)
    result = hpo.bayesian_optimization(bowl, space, config=config)
    baseline = hpo.random_search(bowl, space, n_trials=14, seed=0)
    assert result.n_trials == 14
    assert isinstance(result.study.sampler, optuna.samplers.GPSampler)
    assert result.best_value < 0.05 and abs(result.best_params["x"] - X0) < 0.25
    assert result.best_value < baseline.best_value / 10  # the surrogate, not luck: 10x better than random


def test_bayesian_tpe_alternative():
    config = hpo.BayesianOptConfig(n_trials=40, surrogate="tpe", n_startup_trials=10, seed=0)
    result = hpo.bayesian_optimization(bowl, {"x": (-5.0, 5.0), "y": (-5.0, 5.0)}, config=config)
    assert isinstance(result.study.sampler, optuna.samplers.TPESampler)
    assert result.best_value < 0.2


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="acquisition_fn must be one of"):
        hpo.BayesianOptConfig(acquisition_fn="thompson")
    with pytest.raises(ValueError, match="n_trials must be a positive integer"):
        hpo.BayesianOptConfig(n_trials=0)
    with pytest.raises(ValueError, match="search space lr: a log range needs low > 0"):
        hpo.random_search(bowl, {"lr": (0.0, 1.0, "log")}, n_trials=2)
    with pytest.raises(ValueError, match="ParamGrid batch_size: expected a non-empty list"):
        hpo.ParamGrid(batch_size=[])


MAX_RESOURCE = 27


def learning_curve(params, trial):
    """A trial's 'validation loss' after each of MAX_RESOURCE steps: falls like 1/step towards its final
    value (x - 0.3)^2, so a bad x is already behind at the first steps."""
    final = (params["x"] - 0.3) ** 2
    for step in range(1, MAX_RESOURCE + 1):
        value = final + 1.0 / step
        trial.report(value, step)
        trial.set_user_attr("steps", step)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return final


@pytest.mark.parametrize("strategy", ["hyperband", "successive_halving"])
def test_pruning_stops_bad_trials_early_and_keeps_the_optimum(strategy):
    space = {"x": (-3.0, 3.0)}
    if strategy == "hyperband":
        result = hpo.hyperband(learning_curve, space, n_trials=30, max_resource=MAX_RESOURCE, reduction_factor=3,
                               seed=0)
        assert isinstance(result.study.pruner, optuna.pruners.HyperbandPruner)
    else:
        result = hpo.successive_halving(learning_curve, space, n_trials=30, reduction_factor=3, seed=0)
        assert isinstance(result.study.pruner, optuna.pruners.SuccessiveHalvingPruner)
    states = optuna.trial.TrialState
    pruned = result.study.get_trials(states=(states.PRUNED,))
    complete = result.study.get_trials(states=(states.COMPLETE,))
    steps = sum(t.user_attrs["steps"] for t in result.study.trials)
    early = [t for t in pruned if t.user_attrs["steps"] < MAX_RESOURCE]  # Hyperband may also prune at its last rung
    assert len(early) >= 15, len(early)
    assert all(t.user_attrs["steps"] in (1, 3, 9, 27) for t in pruned)  # at the rungs: min_resource * 3^k
    assert steps < 0.6 * 30 * MAX_RESOURCE  # the budget the pruner saved
    mean = lambda trials: sum((t.params["x"] - 0.3) ** 2 for t in trials) / len(trials)  # noqa: E731
    assert mean(pruned) > mean(complete)  # it stopped the worse ones
    assert result.best_value < 0.05 and abs(result.best_params["x"] - 0.3) < 0.25
    assert result.n_pruned == len(pruned)


def test_parallel_workers_share_a_journal_study_and_write_results(tmp_path):
    result = hpo.random_search(bowl_in_a_worker, {"x": (-2.0, 2.0), "y": (-2.0, 2.0)}, n_trials=8, n_workers=2,
                               seed=0, output_dir=tmp_path)
    trials = result.study.trials
    assert len(trials) == 8
    pids = {t.user_attrs["pid"] for t in trials}
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes, not this one
    assert len({(t.params["x"], t.params["y"]) for t in trials}) == 8  # workers seeded apart: no repeats
    assert result.best_value == min(t.value for t in trials)
    # the study, reloaded from its journal file by Optuna itself
    journal = optuna.storages.journal.JournalFileBackend(str(tmp_path / "study.journal"))
    storage = optuna.storages.JournalStorage(journal)
    reloaded = optuna.load_study(study_name="nexus", storage=storage)
    assert reloaded.best_params == result.best_params and len(reloaded.trials) == 8
    summary = json.loads((tmp_path / "best_params.json").read_text())
    assert summary["best_params"] == result.best_params and summary["n_complete"] == 8
    assert len(json.loads((tmp_path / "trials.json").read_text())) == 8
    for name in ("optimization_history", "slice", "param_importances"):
        width, height = png_size(tmp_path / "plots" / f"{name}.png")
        assert width > 100 and height > 100


def test_sqlite_storage(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    result = hpo.random_search(bowl, {"x": (-2.0, 2.0), "y": (-2.0, 2.0)}, n_trials=3, storage=url, seed=0)
    assert len(optuna.load_study(study_name="nexus", storage=url).trials) == 3
    assert result.n_complete == 3


# ---- Ray Tune: one local Ray for the module -----------------------------------------------------
@pytest.fixture(scope="module")
def ray_session():
    hpo.init_ray(num_cpus=2)  # the [hpo] extra; installed with [test]
    import ray

    yield ray
    ray.shutdown()


def test_the_local_ray_listens_on_loopback_only(ray_session):
    import psutil

    assert {n["NodeManagerAddress"] for n in ray_session.nodes()} == {"127.0.0.1"}
    gcs = ray_session.get_runtime_context().gcs_address
    assert gcs.startswith("127.0.0.1:"), gcs
    # every socket Ray's own servers listen on (this user's processes: no root needed)
    addresses = [c.laddr.ip for proc in psutil.process_iter(["name"]) if proc.info["name"] in ("raylet", "gcs_server")
                 for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
    assert addresses and {a.removeprefix("::ffff:") for a in addresses} == {"127.0.0.1"}, addresses


def descend(params, restore_dir, save_dir):
    """One PBT interval: 10 gradient steps w <- w - lr w on f(w) = w^2 from the saved w (1.0 at the start)."""
    w = json.loads((restore_dir / "w.json").read_text())["w"] if restore_dir is not None else 1.0
    for _ in range(10):
        w -= params["lr"] * w
    (save_dir / "w.json").write_text(json.dumps({"w": w}))
    return w * w


@pytest.mark.slow
def test_pbt_improves_over_its_initial_population(ray_session, tmp_path):
    intervals = 8
    result = hpo.population_based_training(
        descend, {"lr": (1e-3, 1e-2, "log")}, mutations={"lr": (0.05, 0.5, "log")}, population_size=4,
        n_intervals=intervals, resample_probability=1.0, seed=0, num_cpus=2, output_dir=tmp_path)
    assert len(result.initial_values) == 4
    # each initial member trained for all intervals at its own lr, without PBT: (1 - lr)^(2 * 10 * intervals)
    initial_lrs = [1 - v ** (1 / 20) for v in result.initial_values]  # from w^2 = (1 - lr)^20 after one interval
    assert all(1e-3 - 1e-9 <= lr <= 1e-2 + 1e-9 for lr in initial_lrs)
    without_pbt = min((1 - lr) ** (20 * intervals) for lr in initial_lrs)
    # Ray's explore steps vary from run to run (trial order); every explore here resamples lr from [0.05, 0.5],
    # above every initial lr, so the outcome does not: the first perturbation (after interval 1) already
    # gives a member (1 - 0.05)^20 per interval, and exploit copies its state to the others: best <= 0.95^140
    # ~ 8e-4 against (1 - 0.01)^160 ~ 0.2 without PBT. (A wider mutation range, from 1e-3, lost 1 run in ~6.)
    assert result.best_value < without_pbt / 100, (result.best_value, without_pbt)
    assert result.best_params["lr"] > max(initial_lrs)  # explore moved lr out of the initial population's range
    saved = json.loads((result.best_checkpoint / "w.json").read_text())["w"]
    assert saved**2 == pytest.approx(result.best_value)  # the checkpoint is the best member's state


@pytest.mark.slow
def test_ray_tune_search_finds_the_optimum(ray_session, tmp_path):
    result = hpo.ray_tune_search(bowl, {"x": (-2.0, 2.0), "y": (-2.0, 2.0)}, n_trials=8, sampler="random", seed=0,
                                 max_concurrent=2, output_dir=tmp_path)
    assert len(result.study.trials) == 8
    assert result.best_value == pytest.approx(bowl(result.best_params, None))
    assert result.best_value == pytest.approx(min(t.value for t in result.study.trials if t.value is not None))
    assert result.best_value < 1.0  # 8 draws in the 4x4 square: P(none within 1 of the optimum) = (1 - pi/16)^8 < 0.2
    assert (tmp_path / "best_params.json").exists() and (tmp_path / "plots" / "optimization_history.png").exists()


# ---- nexus hpo ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_nexus_hpo_runs_a_four_trial_search_of_the_small_model(small_run, tmp_path, capsys):
    from nexus.cli import main
    from nexus_kernels import forced

    path = small_run("hpo")
    out = tmp_path / "hpo"
    path.write_text(path.read_text() + f"""
hpo:
  sampler: random
  pruner: none
  n_trials: 4
  max_steps: 2
  output_dir: {out}
  space:
    training.max_lr: {{low: 1.0e-4, high: 1.0e-2, log: true}}
    optimizer.type: {{choices: [adamw, lion]}}
""")
    with forced("reference"):
        assert main(["hpo", "--config", str(path)]) == 0
    summary = json.loads((out / "best_params.json").read_text())
    trials = json.loads((out / "trials.json").read_text())
    assert summary["n_trials"] == 4 and len(trials) == 4
    assert all(t["state"] == "COMPLETE" and t["user_attrs"]["steps"] == 2 for t in trials)
    best = min(trials, key=lambda t: t["value"])
    assert summary["best_value"] == best["value"] and summary["best_params"] == best["params"]
    # each trial trained with its own values: its run folder's checkpoint holds them
    import torch

    for t in trials:
        state = torch.load(out / f"trial_{t['number']}" / "checkpoint_step_2.pt", weights_only=True)
        assert state["args"]["learning_rate"] == pytest.approx(t["params"]["training.max_lr"])
        assert state["optimizer_type"] == {"adamw": "AdamW", "lion": "Lion"}[t["params"]["optimizer.type"]]
    assert "best value" in capsys.readouterr().out


def test_pruning_callback_feeds_the_trainers_evaluations_and_stops_it(tmp_path):
    """Each evaluation goes to the trial at the Trainer's step; a prune stops training there."""
    from tests.training.test_trainer import make_trainer

    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))  # any loss > 0 is pruned
    trial = study.ask()
    trainer = make_trainer(tmp_path, eval_interval=2)
    callback = hpo.PruningCallback(trial, "val_loss")
    trainer.callbacks.append(callback)
    result = trainer.train(max_steps=6)
    assert callback.pruned and result.step == 2 and result.stop_reason == "callback"
    assert study.trials[0].intermediate_values == {2: pytest.approx(callback.last)}
    assert callback.last == pytest.approx(trainer.evaluate()["val_loss"])  # the Trainer's own evaluation


def test_trial_values_replace_the_run_files_under_either_spelling(tmp_path):
    """configs/hpo_tiny.yaml loads; a trial's training.max_lr replaces the file's learning_rate (its synonym)."""
    import yaml

    from nexus.config import ConfigError, load_config

    cfg = load_config("configs/hpo_tiny.yaml")
    assert cfg.hpo.n_trials == 4 and cfg.hpo.search_space()["training.max_lr"] == (3e-4, 1e-2, "log")
    raw = yaml.safe_load(Path("configs/hpo_tiny.yaml").read_text())
    raw.pop("hpo")
    raw["training"]["learning_rate"] = raw["training"].pop("max_lr")  # the file spells it the seed-003 way
    objective = hpo.RunObjective(raw, cfg.hpo, tmp_path, "hpo_tiny.yaml")
    trial_cfg = objective.run_config({"training.max_lr": 0.005, "optimizer.type": "lion"}, tmp_path / "trial_0")
    assert trial_cfg.training.learning_rate == 0.005 and trial_cfg.optimizer.type == "lion"
    assert trial_cfg.training.output_dir == str(tmp_path / "trial_0")
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path("configs/hpo_tiny.yaml").read_text().replace("optimizer.type:", "optimizer.tpye:"))
    with pytest.raises(ConfigError, match="hpo: space: 'optimizer.tpye': optimizer has no key 'tpye'"):
        load_config(bad)
