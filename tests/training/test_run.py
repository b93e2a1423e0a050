"""Every optimizer type and precision of the run config trains the MoE model through the Trainer."""
import pytest
import torch

from nexus.config import OPTIMIZER_TYPES, load_config
from nexus.training.run import build_trainer
from nexus_kernels import forced


def train_briefly(path, steps=2):
    trainer = build_trainer(load_config(path))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    result = trainer.train(max_steps=steps)
    changed = sum(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    return trainer, result, changed


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", OPTIMIZER_TYPES)
def test_each_optimizer_type_trains(small_run, optimizer):
    with forced("reference"):  # kernels are tested through the interpreter in tests/kernels
        trainer, result, changed = train_briefly(small_run(f"opt_{optimizer}", optimizer=optimizer))
    assert result.stop_reason == "max_steps"
    assert all(torch.isfinite(torch.tensor(v)) for v in result.metrics.values() if isinstance(v, float))
    assert changed >= len(list(trainer.model.parameters())) // 2
    assert (trainer.lr_scheduler is None) == (optimizer == "schedule_free")
    if optimizer == "prodigy":  # its lr multiplies the estimated step size: the schedule peaks at 1.0
        assert trainer.optimizer.param_groups[0]["initial_lr"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp8", "mxfp8", "fp4"])
def test_low_precision_runs_train(small_run, precision):
    with forced("reference"):
        trainer, result, changed = train_briefly(small_run(f"prec_{precision}", extra=f"precision: {precision}"))
    swapped = [type(m).__name__ for m in trainer.model.modules() if "Linear" in type(m).__name__]
    assert any(name != "Linear" for name in swapped), swapped
    assert result.stop_reason == "max_steps" and changed > 0


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "sgdr", "constant"])
def test_each_schedule_builds_and_steps(schedule):
    from nexus.training.run import build_scheduler
    from nexus.training.trainer import TrainingArguments

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.001}], lr=0.01)
    args = TrainingArguments(lr_schedule=schedule, warmup_steps=2, max_lr=0.01, min_lr=0.001, restart_steps=4)
    sched = build_scheduler(opt, args, max_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        assert opt.param_groups[1]["lr"] == pytest.approx(lrs[-1] / 10)  # groups keep their ratio every step
        opt.step()
        sched.step()
    assert max(lrs) == pytest.approx(0.01)
    assert lrs[0] < 0.01 and min(lrs[2:]) >= 0.001 - 1e-12
    if schedule == "sgdr":
        assert lrs[6] > lrs[5]  # a restart after the first 4-step cycle (following 2 warmup steps)


@pytest.mark.slow
def test_qat_section_trains_with_fake_quantized_linears(small_run):
    path = small_run("qat")
    path.write_text(path.read_text() + "qat: {observer_type: min_max, quantization_scheme: per_channel, skip: [lm_head]}\n")
    trainer, result, changed = train_briefly(path)
    kinds = {type(m).__name__ for m in trainer.model.modules()}
    assert "QATLinear" in kinds
    assert type(trainer.model.lm_head).__name__ == "Linear"
    assert result.stop_reason == "max_steps" and changed > 0


@pytest.mark.slow
@pytest.mark.parametrize("memory", ["{checkpointing: heavy_ops}", "{checkpointing: alternate}",
                                    "{checkpointing: all, offload: {threshold_mb: 0.01}}"])
def test_memory_section_leaves_training_unchanged(small_run, one_thread, memory):
    """Recomputation and offloading change where activations live, not the numbers: same parameters."""
    plain, saver = small_run("memory_plain"), small_run("memory_" + memory.split(",")[0][15:].strip("}"))
    saver.write_text(saver.read_text() + f"memory: {memory}\n")
    with forced("reference"):
        a, _, _ = train_briefly(plain)
        b, _, _ = train_briefly(saver)
    blocks = list(b.model.layers)
    assert any("forward" in vars(block) for block in blocks)  # the blocks really are checkpointed
    for (name, x), y in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(x, y), name
