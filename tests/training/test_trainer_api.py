"""Seed 003's Trainer API (issue 12): TrainingArguments' names and meanings, Trainer(model, train_dataset,
val_dataset, optimizer, args) for any model, epochs, explicit-path checkpoints, the builders (one process here,
2 Gloo ranks through the harness against a one-process run), QAT's seed names, task and system metrics."""
import copy
import dataclasses
import functools
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from nexus.config import ConfigError, config_from_dict
from nexus.training import checkpoint as ckpt
from nexus.training import metrics as M
from nexus.training.distributed.zero import ZeROConfig
from nexus.training.qat import ObserverType, QATConfig, QATLinear, QuantizationScheme
from nexus.training.trainer import (MPIBackend, MPIConfig, ModelParallelConfig, Trainer, TrainerCallback,
                                    TrainingArguments)
from tests.distributed.harness import run_distributed_checks
from tests.distributed.models import MOE_CONFIG, spawns

# ---- tiny models and data ----------------------------------------------------------------------------------


def _data(n=48, dim=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=dtype)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return TensorDataset(x, y)


class Classifier(torch.nn.Module):
    """Returns logits (needs loss_fn=), or with ``form`` a loss, a dict or a tuple holding the loss (HF style)."""

    def __init__(self, dim=6, form="logits", dropout=0.0, dtype=torch.float32):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(dim, 16, dtype=dtype), torch.nn.Linear(16, 2, dtype=dtype)
        self.drop = torch.nn.Dropout(dropout)
        self.form = form

    def forward(self, x, labels=None):
        logits = self.fc2(self.drop(torch.relu(self.fc1(x))))
        if self.form == "logits":
            return logits
        loss = F.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits} if self.form == "dict" else (loss, logits) if self.form == "tuple" else loss


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), progress_bar=False, tensorboard=False, device="cpu", system_metrics=False,
                train_batch_size=8, learning_rate=0.05, logging_steps=1, eval_steps=1000, save_steps=1000)
    base.update(kw)
    return TrainingArguments(**base)


def _records(tmp_path):
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


# ---- TrainingArguments: seed 003's names, seed 004's synonyms ---------------------------------------------


def test_seed003_training_arguments_examples_as_written():
    args = TrainingArguments(num_epochs=3, train_batch_size=32, eval_batch_size=64, learning_rate=1e-4,
                             warmup_steps=1000, gradient_accumulation_steps=4, max_grad_norm=1.0, logging_steps=100,
                             eval_steps=500, save_steps=1000)
    assert (args.max_lr, args.batch_size, args.log_interval, args.eval_interval, args.save_interval) == \
        (1e-4, 32, 100, 500, 1000)
    assert args.resolve_max_steps(batches_per_epoch=40) == 3 * 40 // 4  # epochs x micro-batches / accumulation
    fp16 = TrainingArguments(fp16=True, fp16_opt_level="O2", fp16_loss_scale=128.0)
    assert fp16.precision == "fp16" and fp16.fp16 and not fp16.bf16
    mp = fp16.mixed_precision()
    assert mp.dtype == "fp16" and mp.loss_scaling == "static" and mp.init_scale == 128.0
    assert TrainingArguments(bf16=True).precision == "bf16"
    # seed 004's names are the same fields, in both directions, and through replace
    old = TrainingArguments(max_lr=0.02, batch_size=4, log_interval=3, eval_interval=6, save_interval=9)
    assert (old.learning_rate, old.train_batch_size, old.logging_steps, old.eval_steps, old.save_steps) == \
        (0.02, 4, 3, 6, 9)
    old.eval_interval = 12
    assert old.eval_steps == 12
    assert old.replace(log_interval=5).logging_steps == 5 and old.replace(fp16=True).precision == "fp16"
    assert dataclasses.replace(old, learning_rate=0.5).max_lr == 0.5


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(eval_steps=2, eval_interval=3), r"eval_steps=2 and its synonym eval_interval=3 .*eval_batches"),
    (dict(learning_rate=0.1, max_lr=0.2), r"learning_rate=0.1 and its synonym max_lr=0.2"),
    (dict(train_batch_size=8, batch_size=4), r"train_batch_size=8 and its synonym batch_size=4"),
    (dict(fp16=True, bf16=True), r"fp16=True and bf16=True"),
    (dict(fp16=True, precision="bf16"), r"fp16=True and precision='bf16'"),
    (dict(fp16_opt_level="O2"), r"fp16_opt_level='O2' needs fp16"),
    (dict(fp16=True, fp16_opt_level="O3"), r"fp16_opt_level must be one of O1, O2"),
    (dict(bf16=True, fp16_loss_scale=128.0), r"fp16_loss_scale"),
    (dict(train_batch_size=0), r"train_batch_size must be a positive integer, got 0"),
    (dict(eval_steps=0), r"eval_steps must be a positive integer"),
    (dict(num_epochs=-1), r"num_epochs must be a positive integer or None, got -1"),
    (dict(eval_batches=0), r"eval_batches"),
    (dict(backend="tcp"), r"backend must be one of nccl, gloo, mpi, got 'tcp'"),
    (dict(local_rank=-3), r"local_rank"),
    (dict(gradient_accumulation_steps=2, gradient_sync_steps=3), r"gradient_sync_steps \(3\) exceeds"),
    (dict(weight_decay=-0.1), r"weight_decay must be >= 0"),
], ids=lambda v: "-".join(v) if isinstance(v, dict) else None)
def test_bad_arguments_name_the_field(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        TrainingArguments(**kwargs)


def test_run_file_takes_the_same_names_and_refuses_disagreeing_synonyms():
    model = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, n_experts=4, moe_top_k=2,
                 mod_layer_interval=2, mamba_layer_interval=2, mamba_head_dim=32, max_seq_len=64)
    raw = dict(model=model, data=dict(vocab_size=512),
               training=dict(seq_len=32, max_steps=10, learning_rate=3e-4, train_batch_size=4, logging_steps=2,
                             eval_steps=5, eval_batches=3, save_steps=10, fp16=True, weight_decay=0.05))
    cfg = config_from_dict(raw, "run.yaml")
    t = cfg.training
    assert (t.max_lr, t.batch_size, t.log_interval, t.eval_interval, t.eval_batches, t.precision) == \
        (3e-4, 4, 2, 5, 3, "fp16")
    assert cfg.optimizer.weight_decay == 0.05  # one value: the optimizer's
    raw["training"].update(eval_interval=3)
    with pytest.raises(ConfigError, match=r"run.yaml: training: eval_steps=5 and its synonym eval_interval=3"):
        config_from_dict(raw, "run.yaml")
    del raw["training"]["eval_interval"]
    raw["optimizer"] = dict(weight_decay=0.1)
    with pytest.raises(ConfigError, match=r"training.weight_decay \(0.05\) and optimizer.weight_decay \(0.1\)"):
        config_from_dict(raw, "run.yaml")


# ---- Trainer(model, train_dataset, val_dataset, optimizer, args) -------------------------------------------


def test_seed003_trainer_example_runs_as_written(tmp_path):
    torch.manual_seed(0)
    model, train_dataset, val_dataset = Classifier(), _data(), _data(24, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    args = TrainingArguments(num_epochs=3, train_batch_size=8, eval_batch_size=12, learning_rate=1e-2, warmup_steps=2,
                             gradient_accumulation_steps=2, max_grad_norm=1.0, logging_steps=3, eval_steps=6,
                             save_steps=9, output_dir=str(tmp_path), progress_bar=False, device="cpu")

    trainer = Trainer(model, train_dataset, val_dataset, optimizer, args, loss_fn=F.cross_entropy)
    result = trainer.train()

    assert result.step == 3 * (48 // 8) // 2 == 9  # 3 epochs of 6 micro-batches, 2 per step
    assert trainer.train_loader.batch_size == 8 and trainer.val_loader.batch_size == 12
    records = _records(tmp_path)
    assert [r["step"] for r in records if "loss" in r] == [3, 6, 9]
    assert [r["epoch"] for r in records if "loss" in r] == [1.0, 2.0, 3.0]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 6, 9]
    assert {"grad_norm", "lr", "samples_per_s", "sys/cpu_percent", "sys/ram_percent"} <= set(records[1])
    assert 0 < records[1]["sys/ram_percent"] <= 100
    assert (tmp_path / "checkpoint_step_9.pt").exists()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())


def _manual_sgd(model, batches, lr, loss_of):
    """The oracle: a hand-written loop of plain SGD steps."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for batch in batches:
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
    return model


class DictData(Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        return {"x": x, "labels": y}


@pytest.mark.parametrize("form, batches", [("logits", "tuple"), ("loss", "tuple"), ("dict", "dict"),
                                           ("tuple", "tuple"), ("logits", "dict")])
def test_any_model_output_and_batch_form_trains_like_a_hand_written_loop(tmp_path, form, batches):
    torch.manual_seed(0)
    model = Classifier(form=form)
    reference = copy.deepcopy(model)
    data = _data(32)
    loader = DataLoader(DictData(data) if batches == "dict" else data, batch_size=8)  # unshuffled: a known order
    args = _args(tmp_path, max_steps=3, max_grad_norm=None)
    t = Trainer(model, loader, None, torch.optim.SGD(model.parameters(), lr=0.1), args, lr_scheduler=None,
                loss_fn=F.cross_entropy if form == "logits" else None)
    t.train()

    def loss_of(m, batch):
        x, y = (batch["x"], batch["labels"]) if isinstance(batch, dict) else batch
        out = m(x, y)
        return F.cross_entropy(out, y) if form == "logits" else out["loss"] if form == "dict" else \
            out[0] if form == "tuple" else out

    _manual_sgd(reference, list(loader)[:3], 0.1, loss_of)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_a_model_returning_logits_without_loss_fn_is_named(tmp_path):
    t = Trainer(Classifier(), _data(), None, None, _args(tmp_path, max_steps=1))
    with pytest.raises(TypeError, match=r"returned Tensor of shape \(8, 2\).*loss_fn="):
        t.train()
    with pytest.raises(ValueError, match="train_dataset"):
        Trainer(Classifier())
    with pytest.raises(TypeError, match="args must be a TrainingArguments"):
        Trainer(Classifier(), _data(), None, None, {"max_steps": 1})


def test_max_steps_wins_over_epochs_and_weight_decay_reaches_the_default_optimizer(tmp_path):
    t = Trainer(Classifier(), _data(), None, None, _args(tmp_path, num_epochs=5, max_steps=2, weight_decay=0.3),
                loss_fn=F.cross_entropy)
    assert t.train().step == 2
    assert isinstance(t.optimizer, torch.optim.AdamW)
    assert {g["weight_decay"] for g in t.optimizer.param_groups} == {0.3}
    assert t.optimizer.param_groups[0]["initial_lr"] == 0.05  # learning_rate is the schedule's peak


class Count(TrainerCallback):
    def __init__(self):
        self.evals, self.logs, self.saves = [], [], []

    def on_evaluate(self, trainer, metrics):
        self.evals.append(trainer.step)

    def on_log(self, trainer, metrics):
        self.logs.append(trainer.step)

    def on_save(self, trainer, path):
        self.saves.append((trainer.step, path.name))


class CountingData(Dataset):
    def __init__(self, ds):
        self.ds, self.reads = ds, 0

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.reads += 1
        return self.ds[i]


def test_logging_eval_and_save_steps_mean_every_n_steps_and_eval_batches_bounds_validation(tmp_path):
    val = CountingData(_data(40, seed=2))
    count = Count()
    t = Trainer(Classifier(), _data(), val, None, _args(tmp_path, max_steps=7, logging_steps=3, eval_steps=2,
                                                        save_steps=4, eval_batches=2, eval_batch_size=4),
                loss_fn=F.cross_entropy, callbacks=[count])
    t.train()
    assert count.logs == [3, 6, 7]  # and the last step
    assert count.evals == [2, 4, 6, 7]
    assert [s for s in count.saves if s[1].startswith("checkpoint_step")] == \
        [(4, "checkpoint_step_4.pt"), (7, "checkpoint_step_7.pt")]
    assert val.reads == 5 * 2 * 4  # 5 evaluations (with the baseline at step 0) of 2 batches of 4
    val.reads = 0
    t.args.eval_batches = None  # the whole validation set
    t.evaluate()
    assert val.reads == 40


def test_compute_metrics_accuracy_and_f1_equal_scikit_learn(tmp_path):
    from sklearn.metrics import accuracy_score, f1_score

    torch.manual_seed(0)
    model, val = Classifier(), _data(30, seed=3)
    t = Trainer(model, _data(), val, None, _args(tmp_path, max_steps=1, eval_batch_size=7),
                loss_fn=F.cross_entropy, compute_metrics=M.combine(M.accuracy, functools.partial(M.f1, average="macro")))
    got = t.evaluate()
    x, y = val.tensors
    with torch.no_grad():
        logits = model(x)
    pred = logits.argmax(-1)
    assert got["val_accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-6)
    assert got["val_f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-6)
    assert got["val_loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)  # mean over all 30


def test_ready_made_metrics():
    from sklearn.metrics import f1_score

    labels = torch.tensor([0, 1, 2, 2, 1, -100])
    preds = torch.tensor([0, 2, 2, 2, 1, 0])
    assert M.accuracy(M.EvalPrediction(preds, labels)) == {"accuracy": pytest.approx(0.8)}  # -100 ignored
    assert M.f1(M.EvalPrediction(preds, labels), average="micro")["f1"] == pytest.approx(
        f1_score(labels[:5], preds[:5], average="micro"))
    refs = ["the cat sat on the mat", "a quick brown fox jumps"]
    assert M.bleu(M.EvalPrediction(refs, refs))["bleu"] == pytest.approx(100.0)
    assert M.bleu(M.EvalPrediction(["zz yy xx ww vv", "qq rr ss tt uu"], refs))["bleu"] == pytest.approx(0.0)
    vocab = ["the", "cat", "sat", "on", "mat", "a"]
    decode = lambda ids: " ".join(vocab[i] for i in ids)  # noqa: E731
    ids = torch.tensor([[0, 1, 2, 3, 0, 4], [5, 1, 2, 3, 0, 4]])
    out = M.bleu(M.EvalPrediction(ids, ids), decode=decode)
    assert out["bleu"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="decode="):
        M.bleu(M.EvalPrediction(ids, ids))


# ---- checkpoints at explicit paths: resume is exact ----------------------------------------------------------


def _resumable(tmp_path, seed):
    torch.manual_seed(seed)
    model = Classifier(dropout=0.2)  # dropout: the RNG stream must be restored too
    args = _args(tmp_path, max_steps=4, warmup_steps=1, gradient_accumulation_steps=2, max_grad_norm=0.5,
                 eval_steps=2, eval_batches=1, train_batch_size=4, seed=7)
    return Trainer(model, _data(40), _data(16, seed=1), torch.optim.AdamW(model.parameters(), lr=0.05), args,
                   loss_fn=F.cross_entropy)


def test_save_and_load_checkpoint_at_an_explicit_path_resume_exactly(tmp_path):
    straight = _resumable(tmp_path / "a", seed=0)
    straight.train()
    first = _resumable(tmp_path / "b", seed=0)
    first.train(max_steps=2)
    path = tmp_path / "elsewhere" / "checkpoint-1000.pt"
    assert first.save_checkpoint(path) == path and path.exists()
    resumed = _resumable(tmp_path / "c", seed=123)  # another init: everything must come from the file
    resumed.load_checkpoint(path)
    resumed.train()

    a, b = straight.state_dict(), resumed.state_dict()
    assert a["step"] == b["step"] == 4 and a["tokens_seen"] == b["tokens_seen"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for i, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), (i, k)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["scheduler"] == b["scheduler"] and a["data"] == b["data"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert a["best_metric"] == b["best_metric"]
    assert path.exists()  # an explicit path is not pruned


def test_explicit_checkpoint_path_errors(tmp_path):
    t = _resumable(tmp_path, seed=0)
    with pytest.raises(ValueError, match=r"\.dcp names a sharded checkpoint directory"):
        t.save_checkpoint(tmp_path / "x.dcp")
    with pytest.raises(ckpt.CheckpointError, match="missing.pt"):
        t.load_checkpoint(tmp_path / "missing.pt")


# ---- the builders on one process: a world of one -------------------------------------------------------------


def _builder_trainer(tmp_path, **kw):
    torch.manual_seed(0)
    model = Classifier()
    data = _data()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    args = _args(tmp_path, max_steps=3, **kw)
    return model, data, optimizer, args


def test_seed003_builder_examples_as_written_on_one_process(tmp_path, capsys):
    model, data, optimizer, args = _builder_trainer(tmp_path / "plain")
    Trainer(model, data, optimizer, args, loss_fn=F.cross_entropy).train()
    plain = [p.detach().clone() for p in model.parameters()]

    model, data, optimizer, args = _builder_trainer(tmp_path / "dp")
    trainer = Trainer(model, data, optimizer, args, loss_fn=F.cross_entropy).with_data_parallel()
    assert trainer.optimizer is optimizer and trainer.parallel.world_size == 1
    trainer.train()
    assert all(torch.equal(p, q) for p, q in zip(plain, model.parameters()))  # a world of one: unchanged

    config = ModelParallelConfig(tensor_parallel_size=4, pipeline_parallel_size=2)
    model, data, optimizer, args = _builder_trainer(tmp_path / "mp")
    trainer = Trainer(model, data, optimizer, args, loss_fn=F.cross_entropy).with_model_parallel(config)
    assert "world of one" in capsys.readouterr().out
    trainer.train()
    assert all(torch.equal(p, q) for p, q in zip(plain, model.parameters()))

    zero_config = ZeROConfig(stage=3, offload_optimizer=True, offload_params=False)
    model, data, optimizer, args = _builder_trainer(tmp_path / "zero")
    trainer = Trainer(model, data, optimizer, args, loss_fn=F.cross_entropy).with_zero(zero_config)
    trainer.train()
    assert all(torch.equal(p, q) for p, q in zip(plain, model.parameters()))

    qat_config = QATConfig(observer_type=ObserverType.MinMaxObserver, quantization_scheme=QuantizationScheme.PerChannel,
                           fake_quantize=True)
    model, data, optimizer, args = _builder_trainer(tmp_path / "qat")
    trainer = Trainer(model, data, optimizer, args, loss_fn=F.cross_entropy).with_qat(qat_config)
    assert isinstance(model.fc1, QATLinear) and model.fc1.weight_fake_quant.observer.per_channel
    assert type(model.fc1.weight_fake_quant.observer).__name__ == "MinMaxObserver"
    trainer.train()
    assert not all(torch.equal(p, q) for p, q in zip(plain, model.parameters()))  # trained against the rounding

    mpi_config = MPIConfig(backend=MPIBackend.MPICH, init_method="tcp://127.0.0.1:23456", world_size=1, rank=0)
    model, data, optimizer, args = _builder_trainer(tmp_path / "mpi")
    Trainer(model, data, optimizer, args, loss_fn=F.cross_entropy).with_mpi(mpi_config).train()
    assert all(torch.equal(p, q) for p, q in zip(plain, model.parameters()))


def test_builders_compose_and_refuse_the_wrong_order_or_arguments(tmp_path):
    model, data, optimizer, args = _builder_trainer(tmp_path)
    trainer = Trainer(model, data, optimizer, args, loss_fn=F.cross_entropy)
    assert trainer.with_qat(QATConfig()).with_data_parallel() is trainer
    assert trainer.train().step == 3
    with pytest.raises(RuntimeError, match="with_zero: call it before training"):
        trainer.with_zero(ZeROConfig(stage=2))
    with pytest.raises(TypeError, match="with_model_parallel takes a ModelParallelConfig, got dict"):
        Trainer(model, data, optimizer, args).with_model_parallel({"tensor_parallel_size": 2})
    with pytest.raises(ValueError, match=r"world_size=2 but 1 process\(es\) were launched"):
        Trainer(Classifier(), data, None, None, args.replace(world_size=2)).with_data_parallel()
    with pytest.raises(ValueError, match="local_rank=1 but the launcher"):
        Trainer(Classifier(), data, None, None, args.replace(local_rank=1)).with_data_parallel()
    with pytest.raises(ValueError, match="backend='mpi': this torch has no MPI backend"):
        Trainer(Classifier(), data, None, None, args.replace(backend="mpi")).with_data_parallel()
    with pytest.raises(ValueError, match=r"MPIConfig.init_method must be tcp://host:port, got 'node0'"):
        MPIConfig(init_method="node0")
    with pytest.raises(ValueError, match="MPIConfig.rank must be in"):
        MPIConfig(world_size=2, rank=2)
    with pytest.raises(ValueError, match="ModelParallelConfig.tensor_parallel_size must be a positive integer"):
        ModelParallelConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="ModelParallelConfig: distributed.pp_schedule"):
        ModelParallelConfig(pipeline_schedule="zigzag")
    assert MPIConfig(backend="MPICH").backend is MPIBackend.MPICH is MPIBackend("mpich")


def test_qat_seed_names_are_aliases_and_strings():
    assert ObserverType.MinMaxObserver is ObserverType.MIN_MAX
    assert ObserverType.MovingAverageMinMaxObserver is ObserverType.MOVING_AVERAGE_MIN_MAX
    assert QuantizationScheme.PerChannel is QuantizationScheme.PER_CHANNEL
    assert QuantizationScheme.PerTensor is QuantizationScheme.PER_TENSOR
    cfg = QATConfig(observer_type="MinMaxObserver", quantization_scheme="PerTensor")
    assert (cfg.observer_type, cfg.quantization_scheme) == (ObserverType.MIN_MAX, QuantizationScheme.PER_TENSOR)
    assert QATConfig(observer_type="min_max").observer_type is ObserverType.MIN_MAX
    with pytest.raises(ValueError, match="observer_type must be one of"):
        QATConfig(observer_type="MedianObserver")


def test_static_fp16_loss_scale_and_bf16_autocast(tmp_path):
    seen = []

    class Probe(Classifier):
        def forward(self, x, labels=None):
            out = super().forward(x, labels)
            seen.append(out.dtype)
            return out

    t = Trainer(Probe(), _data(), None, None, _args(tmp_path / "fp16", max_steps=2, fp16=True, fp16_loss_scale=128.0,
                                                      fp16_opt_level="O2"), loss_fn=F.cross_entropy)
    assert t.scaler.static and t.scaler.get_scale() == 128.0
    t.train()
    assert t.scaler.get_scale() == 128.0 and seen[-1] == torch.float16
    t = Trainer(Probe(), _data(), None, None, _args(tmp_path / "bf16", max_steps=1, bf16=True),
                loss_fn=F.cross_entropy)
    assert t.scaler is None
    t.train()
    assert seen[-1] == torch.bfloat16


# ---- the builders on 2 Gloo ranks against one process ------------------------------------------------------

STEPS, GLOBAL_BATCH = 3, 8


class Stack(torch.nn.Module):
    """The MLP as a list of blocks (``layers``), which FSDP2 shards one by one (ZeRO stages 2 and 3)."""

    def __init__(self, dim=6):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(dim, 16, dtype=torch.float64),
                                           torch.nn.Linear(16, 2, dtype=torch.float64)])

    def forward(self, x):
        return self.layers[1](torch.relu(self.layers[0](x)))


def _dp_run(out_dir, builder=None, stack=False, metrics=False, **kw):
    """A float64 MLP trained STEPS steps on a global batch of 8 (4 per rank under 2 ranks); with ``metrics``
    then evaluated with compute_metrics on 16 validation rows."""
    torch.manual_seed(0)
    model = Stack() if stack else Classifier(dtype=torch.float64)
    args = TrainingArguments(output_dir=str(out_dir), progress_bar=False, tensorboard=False, device="cpu",
                             system_metrics=False, max_steps=STEPS, train_batch_size=GLOBAL_BATCH, learning_rate=0.05,
                             max_grad_norm=0.5, warmup_steps=1, save_steps=1000, eval_steps=1000, **kw)
    val = _data(16, seed=4, dtype=torch.float64) if metrics else None
    trainer = Trainer(model, _data(dtype=torch.float64), val, torch.optim.AdamW(model.parameters(), lr=0.05), args,
                      loss_fn=F.cross_entropy, compute_metrics=M.combine(M.accuracy, M.f1) if metrics else None)
    if builder is not None:
        trainer = builder(trainer)
    all_reduces = []
    if isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel):  # count DDP's gradient all-reduces
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(state, bucket):
            all_reduces.append(trainer.step)
            return allreduce_hook(state, bucket)

        trainer.model.register_comm_hook(None, counting_hook)
    result = trainer.train()
    from torch.distributed.tensor import DTensor

    params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for n, p in trainer.unwrapped_model.named_parameters()}
    return {"params": params, "loss": result.metrics["loss"], "dp_size": trainer.parallel.dp_size,
            "evaluation": trainer.evaluate() if metrics else None,
            "all_reduces": all_reduces, "sharded": trainer.sharded, "optimizer": type(trainer.optimizer).__name__}


def _tmp(rank):
    import tempfile

    return tempfile.mkdtemp(prefix=f"nexus-trainer-api-r{rank}-")


def check_with_data_parallel(rank, world_size):
    return _dp_run(_tmp(rank), lambda t: t.with_data_parallel(), metrics=True)


def check_with_data_parallel_sync_every_micro_batch(rank, world_size):
    return _dp_run(_tmp(rank), lambda t: t.with_data_parallel(), gradient_accumulation_steps=2, gradient_sync_steps=1)


def check_with_data_parallel_accumulating(rank, world_size):
    return _dp_run(_tmp(rank), lambda t: t.with_data_parallel(), gradient_accumulation_steps=2)


def check_with_mpi(rank, world_size):
    config = MPIConfig(backend=MPIBackend.OpenMPI, init_method="tcp://127.0.0.1:29555", world_size=world_size,
                       rank=rank)
    return _dp_run(_tmp(rank), lambda t: t.with_mpi(config))


def check_with_zero_stage2(rank, world_size):
    return _dp_run(_tmp(rank), lambda t: t.with_zero(ZeROConfig(stage=2)), stack=True)


def check_with_zero_stage1(rank, world_size):
    return _dp_run(_tmp(rank), lambda t: t.with_zero(ZeROConfig(stage=1)))


SEQ = 16


class Windows(Dataset):
    def __init__(self, n=16):
        g = torch.Generator().manual_seed(5)
        self.data = torch.randint(0, MOE_CONFIG["vocab_size"], (n, SEQ + MOE_CONFIG["n_pred_tokens"]), generator=g)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


def _moe_run(out_dir, builder=None):
    from nexus.models.moe import MoEConfig, MoETransformer

    torch.manual_seed(0)
    model = MoETransformer(MoEConfig(**MOE_CONFIG))
    args = TrainingArguments(output_dir=str(out_dir), progress_bar=False, tensorboard=False, device="cpu",
                             system_metrics=False, max_steps=2, train_batch_size=4, seq_len=SEQ, learning_rate=1e-2,
                             save_steps=1000, eval_steps=1000, lr_schedule="constant")
    trainer = Trainer(model, Windows(), None, torch.optim.SGD(model.parameters(), lr=0.1), args)
    if builder is not None:
        trainer = builder(trainer)
    result = trainer.train()
    from torch.distributed.tensor import DTensor

    params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for n, p in trainer.unwrapped_model.named_parameters()}
    return {"params": params, "loss": result.metrics["loss"], "lm_loss": result.metrics["lm_loss"],
            "sharded": trainer.sharded}


def check_with_model_parallel_tp2(rank, world_size):
    return _moe_run(_tmp(rank), lambda t: t.with_model_parallel(ModelParallelConfig(tensor_parallel_size=2)))


def check_with_model_parallel_pp2(rank, world_size):
    return _moe_run(_tmp(rank), lambda t: t.with_model_parallel(ModelParallelConfig(pipeline_parallel_size=2,
                                                                                    pipeline_schedule="gpipe")))


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed_checks([check_with_data_parallel, check_with_data_parallel_sync_every_micro_batch,
                                   check_with_data_parallel_accumulating, check_with_mpi, check_with_zero_stage2,
                                   check_with_zero_stage1,
                                   check_with_model_parallel_tp2, check_with_model_parallel_pp2], world_size=2,
                                  timeout=300)


@spawns
@pytest.mark.parametrize("check, kw", [("check_with_data_parallel", dict(metrics=True)),
                                       ("check_with_data_parallel_sync_every_micro_batch",
                                        dict(gradient_accumulation_steps=2)),
                                       ("check_with_data_parallel_accumulating", dict(gradient_accumulation_steps=2)),
                                       ("check_with_mpi", {}), ("check_with_zero_stage2", dict(stack=True)),
                                       ("check_with_zero_stage1", {})])
def test_data_parallel_builders_on_two_ranks_equal_one_process(two_ranks, tmp_path, check, kw):
    reference = _dp_run(tmp_path, **kw)
    for rank in two_ranks[check]:
        assert rank["dp_size"] == 2
        assert rank["loss"] == pytest.approx(reference["loss"], abs=1e-12)
        if reference["evaluation"] is not None:  # val loss and task metrics over both ranks' shares
            assert set(rank["evaluation"]) == {"val_loss", "val_accuracy", "val_f1"}
            assert rank["evaluation"] == pytest.approx(reference["evaluation"], abs=1e-12)
        for name, tensor in reference["params"].items():
            torch.testing.assert_close(rank["params"][name], tensor, rtol=0, atol=1e-12)
        assert rank["sharded"] == (check == "check_with_zero_stage2")  # FSDP2 shard_grad_op: DTensor parameters
        assert (rank["optimizer"] == "ZeroRedundancyOptimizer") == (check == "check_with_zero_stage1")


@spawns
def test_gradient_sync_steps_sets_how_often_ddp_all_reduces(two_ranks):
    # one bucket (a tiny model): 2 micro-batches per step, synchronised once per step or after each
    assert two_ranks["check_with_data_parallel_accumulating"][0]["all_reduces"] == [0, 1, 2]
    assert two_ranks["check_with_data_parallel_sync_every_micro_batch"][0]["all_reduces"] == [0, 0, 1, 1, 2, 2]
    assert two_ranks["check_with_data_parallel"][0]["all_reduces"] == [0, 1, 2]


@spawns
def test_with_model_parallel_tensor_parallel_on_two_ranks_equals_one_process(two_ranks, tmp_path):
    reference = _moe_run(tmp_path)
    for rank in two_ranks["check_with_model_parallel_tp2"]:
        assert rank["sharded"]
        assert rank["lm_loss"] == pytest.approx(reference["lm_loss"], abs=1e-4)
        for name, tensor in reference["params"].items():
            torch.testing.assert_close(rank["params"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@spawns
def test_with_model_parallel_pipeline_on_two_ranks_equals_one_process(two_ranks, tmp_path):
    reference = _moe_run(tmp_path)
    ranks = two_ranks["check_with_model_parallel_pp2"]
    held = [set(r["params"]) for r in ranks]
    assert not held[0] & held[1] and held[0] | held[1] == set(reference["params"])  # each stage's own layers
    for rank in ranks:
        assert rank["sharded"]
        assert rank["lm_loss"] == pytest.approx(reference["lm_loss"], abs=1e-4)
        for name, tensor in rank["params"].items():
            torch.testing.assert_close(tensor, reference["params"][name], rtol=1e-4, atol=1e-5, msg=name)


def test_optimizer_in_second_place_with_loader_keywords_still_works(tmp_path):
    torch.manual_seed(0)
    model = Classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    t = Trainer(model, optimizer, train_loader=DataLoader(_data(), batch_size=8), loss_fn=F.cross_entropy,
                args=_args(tmp_path, max_steps=1))
    assert t.optimizer is optimizer and t.val_loader is None
    assert t.train().step == 1


def test_auto_schedule_warms_up_over_warmup_steps_then_decays_to_min_lr(tmp_path):
    import math

    t = Trainer(Classifier(), _data(), None, None,
                _args(tmp_path, max_steps=4, warmup_steps=2, learning_rate=0.1, min_lr=0.01), loss_fn=F.cross_entropy)
    t.train()
    logged = [r["lr"] for r in _records(tmp_path) if "lr" in r]

    def expected(step):  # linear warmup to the peak, then half a cosine down to min_lr at max_steps
        if step <= 2:
            return 0.1 * step / 2
        return 0.01 + 0.5 * (0.1 - 0.01) * (1 + math.cos(math.pi * (step - 2) / (4 - 2)))

    assert logged == pytest.approx([expected(s) for s in (1, 2, 3, 4)], rel=1e-9)


def test_max_grad_norm_clips_the_total_gradient_norm(tmp_path):
    torch.manual_seed(0)
    model = Classifier()
    before = [p.detach().clone() for p in model.parameters()]
    t = Trainer(model, _data(), None, torch.optim.SGD(model.parameters(), lr=1.0),
                _args(tmp_path, max_steps=1, max_grad_norm=0.01), lr_scheduler=None, loss_fn=F.cross_entropy)
    result = t.train()
    assert result.metrics["grad_norm"] > 0.01  # the norm before clipping is what is logged
    step = torch.linalg.vector_norm(torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]))
    assert step.item() == pytest.approx(0.01, rel=1e-4)  # SGD lr 1: the update is the clipped gradient
