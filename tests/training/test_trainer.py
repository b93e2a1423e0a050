"""Trainer: accumulation, resume equivalence, atomic checkpoints, NaN stop, best/early stopping, logging."""
import dataclasses
import json
import types
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from nexus.data.sampler import ResumableShuffleSampler
from nexus.training import checkpoint as ckpt
from nexus.training.mixed_precision import GradScaler, MixedPrecisionConfig
from nexus.training.trainer import Trainer, TrainerCallback, TrainingArguments

VOCAB, SEQ, NPRED = 32, 8, 2


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    mtp_logits: tuple
    aux_loss: torch.Tensor


class TinyLM(torch.nn.Module):
    """Embedding -> dropout -> one linear head per predicted token; enough to exercise the loop."""

    def __init__(self, vocab=VOCAB, dim=16, n_pred=NPRED, dropout=0.1):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(vocab, dim)
        self.drop = torch.nn.Dropout(dropout)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(dim, vocab) for _ in range(n_pred))
        self.poison = False
        self.config = types.SimpleNamespace(n_pred_tokens=n_pred)  # as MoETransformer: the Trainer's token windows

    def forward(self, ids):
        h = self.drop(self.embed_tokens(ids))
        logits = [head(h) for head in self.heads]
        if self.poison:
            logits[0] = logits[0] * float("nan")
        return Out(logits[0], tuple(logits[1:]), (h**2).mean() * 1e-3)

    def num_parameters(self, active=False):
        return sum(p.numel() for p in self.parameters())


class Windows(torch.utils.data.Dataset):
    def __init__(self, n=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, VOCAB, (n, SEQ + NPRED), generator=g)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


def make_trainer(tmp_path, *, seed=0, model=None, callbacks=None, **kw):
    torch.manual_seed(seed)
    model = model or TinyLM()
    ds = Windows()
    loader = DataLoader(ds, batch_size=4, sampler=ResumableShuffleSampler(len(ds), seed=seed),
                        generator=torch.Generator().manual_seed(seed))
    val = DataLoader(Windows(16, seed=1), batch_size=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    defaults = dict(output_dir=str(tmp_path), seq_len=SEQ, batch_size=4, gradient_accumulation_steps=2,
                    log_interval=1, eval_interval=2, eval_batches=2, save_interval=3, progress_bar=False,
                    tensorboard=False, device="cpu")
    defaults.update(kw)
    return Trainer(model=model, optimizer=opt, lr_scheduler=sched, train_loader=loader, val_loader=val,
                   args=TrainingArguments(**defaults), callbacks=callbacks)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_resume_reaches_same_parameters_and_loss_as_uninterrupted(tmp_path):
    full = make_trainer(tmp_path / "full")
    res_full = full.train(max_steps=7)

    first = make_trainer(tmp_path / "split")
    first.train(max_steps=3)
    resumed = make_trainer(tmp_path / "split", seed=123)  # a different seed: everything must come from the file
    res = resumed.train(max_steps=7, resume_from=tmp_path / "split" / "checkpoint_step_3.pt")

    assert res.step == res_full.step == 7
    assert res.tokens_seen == res_full.tokens_seen
    for a, b in zip(params(full.model), params(resumed.model)):
        assert torch.equal(a, b)
    assert res.metrics["loss"] == res_full.metrics["loss"]
    assert resumed.optimizer.param_groups[0]["lr"] == full.optimizer.param_groups[0]["lr"]


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    torch.manual_seed(0)
    m1, m2 = TinyLM(dropout=0.0), TinyLM(dropout=0.0)
    m2.load_state_dict(m1.state_dict())
    a = make_trainer(tmp_path / "a", model=m1, gradient_accumulation_steps=2, max_grad_norm=None)
    b = make_trainer(tmp_path / "b", model=m2, gradient_accumulation_steps=1, max_grad_norm=None)
    for t in (a, b):  # SGD: its step is proportional to the gradient (Adam's first step is not)
        t.optimizer = torch.optim.SGD(t.model.parameters(), lr=0.5)
        t.lr_scheduler = None
    b.train_loader = DataLoader(Windows(), batch_size=8, sampler=ResumableShuffleSampler(64, seed=0))
    batch = next(iter(b.train_loader))
    # feed both the same 8 windows: a as two micro-batches of 4, b as one batch of 8
    a._data_iter, b._data_iter = iter([batch[:4], batch[4:]]), iter([batch])
    a._train_step()
    b._train_step()
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_checkpoints_keep_last_k_and_best(tmp_path):
    t = make_trainer(tmp_path, save_interval=1, keep_last=2)
    t.train(max_steps=5)
    names = sorted(p.name for p in tmp_path.glob("checkpoint_step_*.pt"))
    assert names == ["checkpoint_step_4.pt", "checkpoint_step_5.pt"]
    best = ckpt.load_checkpoint(tmp_path / "checkpoint_best.pt")
    evals = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "val_loss" in r and r["step"] > 0]
    lowest = min(evals, key=lambda r: r["val_loss"])
    assert best["best_metric"] == t.best_metric == lowest["val_loss"]
    assert best["step"] == lowest["step"]


def test_best_checkpoint_written_between_save_steps(tmp_path):
    t = make_trainer(tmp_path, save_interval=100, eval_interval=2)
    t.train(max_steps=3)
    best = ckpt.load_checkpoint(tmp_path / "checkpoint_best.pt")
    assert best["step"] in (2, 3) and best["best_metric"] == t.best_metric


def test_resuming_from_an_older_checkpoint_sets_the_later_ones_aside(tmp_path, capsys):
    t = make_trainer(tmp_path, save_interval=2, keep_last=5, eval_interval=1)
    t.train(max_steps=6)
    later = {p.name: p.read_bytes() for p in tmp_path.glob("checkpoint_step_[46].pt")}
    best_step = ckpt.load_checkpoint(tmp_path / "checkpoint_best.pt")["step"]
    assert [s for s, _ in ckpt.step_checkpoints(tmp_path)] == [2, 4, 6] and best_step > 2
    again = make_trainer(tmp_path, save_interval=1, keep_last=5)
    again.train(max_steps=3, resume_from=tmp_path / "checkpoint_step_2.pt")
    assert [s for s, _ in ckpt.step_checkpoints(tmp_path)] == [2, 3]
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint_step_3.pt"
    # the trajectory the user branched from is kept, byte for byte, and said so
    (aside,) = tmp_path.glob("abandoned-*")
    assert {p.name: p.read_bytes() for p in aside.glob("checkpoint_step_*.pt")} == later
    assert ckpt.load_checkpoint(aside / "checkpoint_best.pt")["step"] == best_step
    out = capsys.readouterr().out
    assert "resumed from step 2 (tokens 128)" in out and str(aside) in out


def test_stale_temporary_files_are_removed_at_start_and_said(tmp_path, capsys):
    tmp_path.mkdir(exist_ok=True)
    dead = tmp_path / ".checkpoint_step_3.pt.tmp-999999999"  # no such pid: its writer was killed
    dead.write_bytes(b"half a checkpoint")
    make_trainer(tmp_path).train(max_steps=1)
    assert not dead.exists()
    assert dead.name in capsys.readouterr().out


def test_resuming_a_finished_run_says_so(tmp_path, capsys):
    make_trainer(tmp_path).train(max_steps=3)
    res = make_trainer(tmp_path).train(max_steps=3, resume_from=tmp_path / "checkpoint_step_3.pt")
    assert res.stop_reason == "finished" and res.step == 3
    assert "finished" in capsys.readouterr().out


def test_checkpoint_of_another_optimizer_type_is_named(tmp_path):
    make_trainer(tmp_path).train(max_steps=3)
    t = make_trainer(tmp_path / "other")
    t.optimizer = torch.optim.SGD(t.model.parameters(), lr=0.1)
    with pytest.raises(ckpt.CheckpointError, match="AdamW optimizer, but this run uses SGD"):
        t.load_checkpoint(tmp_path / "checkpoint_step_3.pt")


def test_a_failing_logger_does_not_hide_the_first_error(tmp_path, capsys):
    class Broken(TrainerCallback):
        def on_log(self, trainer, metrics):
            raise RuntimeError("the first error")

        def on_train_end(self, trainer):
            raise OSError("logger: disk full")

    with pytest.raises(RuntimeError, match="the first error"):
        make_trainer(tmp_path, callbacks=[Broken()]).train(max_steps=2)
    assert "logger: disk full" in capsys.readouterr().err


def test_resume_with_a_plain_loader_replays_its_order(tmp_path):
    def plain(t):
        t.train_loader = DataLoader(Windows(), batch_size=4, shuffle=False)
        return t

    full = plain(make_trainer(tmp_path / "full"))
    full.train(max_steps=5)
    plain(make_trainer(tmp_path / "split")).train(max_steps=2)
    resumed = plain(make_trainer(tmp_path / "split"))
    resumed.train(max_steps=5, resume_from=tmp_path / "split" / "checkpoint_step_2.pt")
    for a, b in zip(params(full.model), params(resumed.model)):
        assert torch.equal(a, b)


def test_crash_during_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    t = make_trainer(tmp_path)
    t.train(max_steps=3)
    good = tmp_path / "checkpoint_step_3.pt"
    before = good.read_bytes()

    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"partial garbage")  # some bytes reach the disk, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    t.step = 3  # same target name as the good file: the worst case
    with pytest.raises(ckpt.CheckpointError, match=f"could not write checkpoint {good}: disk full; the last good"):
        t.save_checkpoint()
    monkeypatch.setattr(torch, "save", real_save)
    assert good.read_bytes() == before
    assert not list(tmp_path.glob(".*tmp*"))
    assert ckpt.load_checkpoint(good)["step"] == 3


def test_truncated_corrupt_and_foreign_checkpoints_name_the_file(tmp_path):
    t = make_trainer(tmp_path / "run")
    t.train(max_steps=3)
    good = tmp_path / "run" / "checkpoint_step_3.pt"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    for bad in (truncated, garbage):
        with pytest.raises(ckpt.CheckpointError, match=bad.name):
            make_trainer(tmp_path / "x").load_checkpoint(bad)
    other = make_trainer(tmp_path / "y", model=TinyLM(dim=24))
    with pytest.raises(ckpt.CheckpointError, match="another model.*checkpoint_step_3.pt|checkpoint_step_3.pt.*another model"):
        other.load_checkpoint(good)


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "payload": Evil()}, path)
    with pytest.raises(ckpt.CheckpointError, match="evil.pt"):
        ckpt.load_checkpoint(path)


def test_nan_loss_stops_with_checkpoint_of_last_good_step(tmp_path):
    class Poison(TrainerCallback):
        def on_log(self, trainer, metrics):
            if trainer.step == 4:
                trainer.model.poison = True

    t = make_trainer(tmp_path / "nan", callbacks=[Poison()])
    res = t.train(max_steps=10)
    assert res.stop_reason == "nonfinite_loss"
    assert res.step == 4
    saved = ckpt.load_checkpoint(tmp_path / "nan" / "checkpoint_step_4.pt")
    clean = make_trainer(tmp_path / "clean", save_interval=4)
    clean.train(max_steps=4)
    good = ckpt.load_checkpoint(tmp_path / "clean" / "checkpoint_step_4.pt")
    # exactly the state after step 4: weights, data position and RNG, not the half-run step 5
    assert saved["data"] == good["data"] and saved["data"]["micro_batches"] == 4 * 2
    assert torch.equal(saved["rng"]["torch"], good["rng"]["torch"])
    for name, tensor in good["model"].items():
        assert torch.equal(saved["model"][name], tensor)
    tmp_path = tmp_path / "nan"
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["nonfinite_at_step"] == 5


def test_early_stopping_stops_when_val_loss_stalls(tmp_path):
    class Freeze(TrainerCallback):
        def on_train_begin(self, trainer):
            for g in trainer.optimizer.param_groups:
                g["lr"] = 0.0
            trainer.lr_scheduler = None

    t = make_trainer(tmp_path, callbacks=[Freeze()], early_stopping_patience=2, eval_interval=1)
    res = t.train(max_steps=50)
    assert res.stop_reason == "early_stopping"
    assert res.step == 3  # eval at 1 sets best, 2 and 3 do not improve


def test_metrics_jsonl_and_tensorboard_written(tmp_path):
    t = make_trainer(tmp_path, tensorboard=True, peak_flops=1e12)
    t.train(max_steps=4)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == [1, 2, 3, 4]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] for r in records if "loss" in r)
    assert [r["tokens"] for r in records if "loss" in r] == [64, 128, 192, 256]  # 2 x 4 windows x SEQ
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2, 4]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())


def test_unknown_trainer_argument_and_bad_arguments_are_named():
    with pytest.raises(TypeError, match="checkpoint_dirr"):
        Trainer(model=TinyLM(), train_loader=[0], checkpoint_dirr="x")
    with pytest.raises(ValueError, match="precision"):
        TrainingArguments(precision="fp7")
    with pytest.raises(ValueError, match="batch_size"):
        TrainingArguments(batch_size=0)


def test_seed_style_keyword_arguments(tmp_path):
    model = TinyLM()
    t = Trainer(model=model, optimizer=torch.optim.AdamW(model.parameters()), lr_scheduler=None,
                train_loader=DataLoader(Windows(), batch_size=4), val_loader=None, config={"name": "x"},
                gradient_accumulation_steps=2, checkpoint_dir=str(tmp_path / "ck"), log_interval=1,
                eval_interval=1000, save_interval=5000, output_dir=str(tmp_path), seq_len=SEQ,
                progress_bar=False, tensorboard=False)
    res = t.train(max_steps=2)
    assert res.step == 2 and (tmp_path / "ck" / "checkpoint_step_2.pt").exists()
    assert ckpt.load_checkpoint(tmp_path / "ck" / "checkpoint_step_2.pt")["config"] == {"name": "x"}


def test_fp16_scaler_skips_overflowing_steps(tmp_path):
    t = make_trainer(tmp_path, precision="fp16")
    assert isinstance(t.scaler, GradScaler) and not t.scaler.static
    before = params(t.model)
    # guaranteed overflow on the first step
    t.scaler = GradScaler(MixedPrecisionConfig(dtype="fp16", init_scale=2.0**100), device="cpu")
    lr_before = t.optimizer.param_groups[0]["lr"]
    m = t._train_step()
    assert m["skipped"] == 1.0
    assert t.optimizer.param_groups[0]["lr"] == lr_before  # a skipped step does not advance the schedule
    for a, b in zip(before, params(t.model)):
        assert torch.equal(a, b)
    assert t.scaler.skipped_steps == 1


def test_static_fp16_loss_scale_is_a_training_argument(tmp_path):
    t = make_trainer(tmp_path, precision="fp16", fp16_loss_scale=128.0)
    assert t.scaler.static and t.scaler.get_scale() == 128.0
    t.train(max_steps=3)
    assert t.scaler.get_scale() == 128.0 and t.scaler.skipped_steps == 0
    assert ckpt.load_checkpoint(tmp_path / "checkpoint_step_3.pt")["scaler"]["scale"] == 128.0
    with pytest.raises(ValueError, match="fp16_loss_scale"):
        TrainingArguments(precision="bf16", fp16_loss_scale=128.0)


def test_a_step_reads_the_host_once(tmp_path):
    """On a GPU each .item()/.tolist()/bool(tensor) stalls the stream: one read per step (the NaN stop),
    plus one per logging step and one per evaluation. Not counted: torch's optimizers, which keep their
    step counters on the CPU, and the data loaders, which work on CPU tensors."""
    t = make_trainer(tmp_path, log_interval=4, eval_interval=100, save_interval=100, gradient_accumulation_steps=3)
    t.train(max_steps=1)  # warm up the loaders and the baseline evaluation
    reads, paused = [], [False]
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")
    originals = {n: getattr(torch.Tensor, n) for n in names}

    def counted(name):
        def read(self, *a, **k):
            if not paused[0]:
                reads.append(name)
            return originals[name](self, *a, **k)
        return read

    def uncounted(fn):
        def call(*a, **k):
            paused[0] = True
            try:
                return fn(*a, **k)
            finally:
                paused[0] = False
        return call

    t.optimizer.step = uncounted(t.optimizer.step)
    t._next_batch = uncounted(t._next_batch)
    val_loader = t.val_loader

    class UncountedLoader:  # DataLoader.__iter__ draws its base seed with .item() on a CPU tensor
        def __iter__(self):
            return uncounted(iter)(val_loader)

    t.val_loader = UncountedLoader()
    try:
        for n in names:
            setattr(torch.Tensor, n, counted(n))
        for _ in range(8):
            t._train_step()
        per_step = len(reads) / 8
        reads.clear()
        t.evaluate()
        per_eval = len(reads)
    finally:
        for n in names:
            setattr(torch.Tensor, n, originals[n])
    assert per_step == 1 and per_eval == 1


def test_wandb_without_the_extra_names_it(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError, installed or not
    t = make_trainer(tmp_path, use_wandb=True)
    with pytest.raises(RuntimeError, match=r"nexus-train\[track\]"):
        t.train(max_steps=1)
