"""Experiment trackers: one Trainer run reports to all five, each read back from its real local store
(TensorBoard's EventAccumulator, MLflow's own client on the SQLite store, the W&B offline run file,
Neptune's offline operation log, ClearML's offline session), against the run's metrics.jsonl; no
connection leaves the machine; the loss / learning-rate PNG; missing extras named."""
import json
import socket
import struct
import sys
import zipfile
from pathlib import Path

import pytest

from nexus.training import tracking
from nexus.training.trainer import TrainingArguments
from tests.training.test_trainer import make_trainer

STEPS = 4


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every in-process connection to anything but loopback or a Unix socket."""
    attempts = []
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def local(sock, address):
        if sock.family == socket.AF_UNIX:
            return True
        host = address[0]
        return host in ("localhost", "::1") or host.startswith("127.")

    def guarded(original):
        def call(sock, address):
            if not local(sock, address):
                attempts.append(address)
                raise OSError(f"test forbids network access to {address}")
            return original(sock, address)
        return call

    monkeypatch.setattr(socket.socket, "connect", guarded(connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guarded(connect_ex))
    yield attempts
    assert attempts == [], f"trackers tried to reach {attempts}"


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One short Trainer run reporting to every tracker; returns (output dir, trainer, metrics.jsonl records)."""
    import os

    out = tmp_path_factory.mktemp("tracked")
    home = tmp_path_factory.mktemp("home")  # ClearML's cache and W&B's settings stay in the test's folders
    saved = {k: os.environ.get(k) for k in ("HOME", "CLEARML_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR",
                                            "MLFLOW_TRACKING_URI")}
    os.environ.update(HOME=str(home), CLEARML_CACHE_DIR=str(home / "clearml"),
                      WANDB_CONFIG_DIR=str(home / "wandb"), WANDB_CACHE_DIR=str(home / "wandb_cache"))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    attempts = []
    connect = socket.socket.connect

    def guarded(sock, address):
        if sock.family != socket.AF_UNIX and not (address[0] in ("localhost", "::1") or address[0].startswith("127.")):
            attempts.append(address)
            raise OSError(f"test forbids network access to {address}")
        return connect(sock, address)

    socket.socket.connect = guarded
    try:
        trainer = make_trainer(out, report_to=list(tracking.TRACKERS), tensorboard=True, log_interval=1,
                               eval_interval=2)
        trainer.train(max_steps=STEPS)
    finally:
        socket.socket.connect = connect
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert attempts == [], f"trackers tried to reach {attempts}"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, trainer, records


def logged(records, key):
    """{step: value} of ``key`` in the run's metrics.jsonl: the oracle every tracker is compared with."""
    return {r["step"]: r[key] for r in records if key in r}


def test_run_logged_train_and_validation_metrics(tracked_run):
    _, _, records = tracked_run
    assert sorted(logged(records, "loss")) == list(range(1, STEPS + 1))
    assert sorted(logged(records, "val_loss")) == [0, 2, 4]  # the baseline, then every eval_interval


def test_tensorboard_events_read_back(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, records = tracked_run
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    for key in ("loss", "lr", "val_loss", "grad_norm"):
        got = {e.step: e.value for e in acc.Scalars(key)}
        want = logged(records, key)
        assert got.keys() == want.keys()
        assert all(got[s] == pytest.approx(want[s], rel=1e-6) for s in want)  # stored as float32


def test_mlflow_store_read_back_through_its_client(tracked_run):
    from mlflow.tracking import MlflowClient

    out, trainer, records = tracked_run
    assert (out / "mlflow.db").exists()  # the default store: SQLite in the run folder
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(trainer.args.wandb_project)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert float(run.data.params["training.learning_rate"]) == trainer.args.learning_rate
    for key in ("loss", "lr", "val_loss"):
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == pytest.approx(logged(records, key), rel=1e-12)


def _wandb_records(path: Path):
    """The protobuf records of a W&B run file (LevelDB log format: 7-byte ':W&B' header, 32 KiB blocks,
    7-byte chunk headers: CRC32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    raw, block = path.read_bytes(), 32768
    assert raw[:4] == b":W&B"
    pos, chunk = 7, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pos += 7
        if kind == 0:
            pos += block - pos % block if pos % block else 0
            continue
        chunk += raw[pos:pos + length]
        pos += length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            yield record
            chunk = b""


def test_wandb_offline_run_read_back(tracked_run):
    out, trainer, records = tracked_run
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history, project, config = {}, None, {}
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":  # rows of one step may come in several records
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(record.history.step.num, {}).update(row)
        elif kind == "run":
            project = record.run.project
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    assert project == trainer.args.wandb_project
    assert config["training"]["learning_rate"] == trainer.args.learning_rate
    for key in ("loss", "lr", "val_loss"):
        want = logged(records, key)
        assert {s: history[s][key] for s in want} == pytest.approx(want, rel=1e-12)
        assert all(history[s]["_step"] == s for s in want)


def test_neptune_offline_operations_read_back(tracked_run):
    out, trainer, records = tracked_run
    (log,) = (out / "neptune" / "offline").glob("run__*/data-1.log")
    series: dict = {}
    config = {}
    for line in log.read_text().splitlines():
        op = json.loads(line)["obj"]
        if op["type"] == "LogFloats":
            for point in op["values"]:
                series.setdefault("/".join(op["path"]), {})[point["step"]] = point["value"]
        elif op["path"][0] == "config" and "value" in op:
            config["/".join(op["path"][1:])] = op["value"]
    assert config["training.learning_rate"] == trainer.args.learning_rate
    for key in ("loss", "lr", "val_loss"):
        assert series[key] == pytest.approx(logged(records, key), rel=1e-12)


def test_clearml_offline_session_read_back(tracked_run):
    out, trainer, records = tracked_run
    (session,) = (out / "clearml").glob("*.zip")
    with zipfile.ZipFile(session) as z:
        task = json.loads(z.read("task.json"))
        events = [e for line in z.read("metrics.jsonl").decode().splitlines() if line.strip()
                  for e in json.loads(line)]
    assert task["project_name"] == trainer.args.wandb_project and task["name"] == out.name
    hyper = task["hyperparams"]["config"]
    assert float(hyper["training.learning_rate"]["value"]) == trainer.args.learning_rate
    scalars: dict = {}
    for e in events:
        if e["type"] == "training_stats_scalar":
            scalars.setdefault(e["metric"], {})[e["iter"]] = e["value"]
    for key in ("loss", "lr", "val_loss"):
        assert scalars[key] == pytest.approx(logged(records, key), rel=1e-12)


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG signature and IHDR chunk (PNG spec, section 11.2.2)."""
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


def test_trainer_writes_the_loss_and_lr_plot(tracked_run):
    from matplotlib.image import imread

    out, _, _ = tracked_run
    png = out / tracking.CURVES_PNG
    width, height = _png_size(png)
    assert (width, height) == (int(tracking.CURVES_SIZE[0] * tracking.CURVES_DPI),
                               int(tracking.CURVES_SIZE[1] * tracking.CURVES_DPI)) == (1000, 400)
    pixels = imread(png)  # decodes the whole image: a truncated or corrupt file fails here
    assert pixels.shape[:2] == (400, 1000) and pixels[..., :3].std() > 0.05  # drawn, not blank


def test_plot_keeps_the_latest_record_of_a_repeated_step(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 3.0, "lr": 0.1}, {"step": 2, "loss": 2.0, "lr": 0.2},
            {"step": 2, "loss": 1.5, "lr": 0.2}, {"step": 3, "loss": 1.0, "lr": 0.3}]  # step 2 logged again (resume)
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["loss"] for r in tracking.read_metrics(jsonl)] == [3.0, 1.5, 1.0]
    assert _png_size(tracking.plot_training_curves(jsonl)) == (1000, 400)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert tracking.plot_training_curves(empty) is None


@pytest.mark.parametrize("name,module", [("wandb", "wandb"), ("mlflow", "mlflow"), ("neptune", "neptune"),
                                         ("clearml", "clearml")])
def test_missing_extra_is_named_before_any_file_is_written(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # import -> ImportError, installed or not
    trainer = make_trainer(tmp_path, report_to=["tensorboard", name])
    with pytest.raises(ImportError, match=r"pip install 'nexus-train\[track\]'"):
        trainer.train(max_steps=1)
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tensorboard").exists()


def test_report_to_names_and_the_older_switches():
    assert TrainingArguments().resolve_report_to() == ["tensorboard"]
    assert TrainingArguments(use_wandb=True).resolve_report_to() == ["tensorboard", "wandb"]
    assert TrainingArguments(tensorboard=False).resolve_report_to() == []
    assert TrainingArguments(report_to="mlflow").resolve_report_to() == ["mlflow"]
    assert TrainingArguments(report_to="none", use_wandb=True).resolve_report_to() == ["wandb"]
    assert TrainingArguments(report_to="all").resolve_report_to() == list(tracking.TRACKERS)
    with pytest.raises(ValueError, match=r"report_to: unknown tracker 'comet'"):
        TrainingArguments(report_to=["tensorboard", "comet"])


def test_report_to_in_a_run_file(tmp_path):
    from nexus.config import build_dataclass

    args = build_dataclass(TrainingArguments, {"report_to": ["mlflow", "neptune"], "max_steps": 2}, "run: training")
    assert args.resolve_report_to() == ["mlflow", "neptune"]


def test_mlflow_tracking_uri_is_honoured(tracked_run, tmp_path, no_network):
    """A user-set tracking URI receives the run instead of the run folder (here a copy of the tracked run's
    store: an existing SQLite store, so no schema migration to wait for)."""
    import shutil

    from mlflow.tracking import MlflowClient

    out, _, _ = tracked_run
    store = tmp_path / "elsewhere.db"
    shutil.copy(out / "mlflow.db", store)
    trackers = tracking.open_trackers(["mlflow"], tmp_path / "run", {"a": {"b": 1}}, project="exp",
                                      mlflow_tracking_uri=f"sqlite:///{store}")
    trackers.log({"loss": 2.0, "note": "text is skipped", "flag": True}, step=7)
    trackers.close()
    assert not (tmp_path / "run" / "mlflow.db").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.data.params == {"a.b": "1"}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(7, 2.0)]
    assert set(run.data.metrics) == {"loss"}
