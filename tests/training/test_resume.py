"""Interrupted at step 2 and resumed equals uninterrupted at step 4: every optimizer type, every
precision, every QAT setting, on the small MoE model through the run file (as `nexus train` builds it)."""
import os
import signal

import pytest
import torch

from nexus.config import OPTIMIZER_TYPES, load_config
from nexus.training import checkpoint as ckpt
from nexus.training.run import build_trainer
from nexus.training.trainer import TrainerCallback
from nexus_kernels import forced

QAT = {
    "qat_min_max_per_channel": "{observer_type: min_max, quantization_scheme: per_channel}",
    "qat_moving_average_per_tensor": "{observer_type: moving_average_min_max, quantization_scheme: per_tensor, "
                                     "weight_bits: 4, activation_symmetric: true}",
    "qat_observe_only": "{fake_quantize: false}",
}
CASES = ([(f"opt_{o}", o, "", None) for o in OPTIMIZER_TYPES]
         + [(f"precision_{p}", "adamw", f"precision: {p}", None) for p in ("bf16", "fp16", "fp8", "mxfp8", "fp4")]
         + [("fp16_static_scale", "adamw", "precision: fp16, fp16_loss_scale: 128.0", None)]
         + [(name, "adamw", "", qat) for name, qat in QAT.items()])


def run_file(small_run, name, optimizer, extra, qat):
    path = small_run(name, optimizer=optimizer, extra=extra)
    text = path.read_text().replace("max_steps: 6", "max_steps: 4").replace("save_interval: 3", "save_interval: 2")
    path.write_text(text + (f"qat: {qat}\n" if qat else ""))
    return path


class PreemptAt(TrainerCallback):
    """Sends this process SIGTERM after step ``step``, as a cluster scheduler would."""

    def __init__(self, step):
        self.at = step

    def on_log(self, trainer, metrics):
        if trainer.step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def assert_same_tree(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), where  # NaN placeholders equal NaN


@pytest.mark.slow
@pytest.mark.parametrize("name,optimizer,extra,qat", CASES, ids=[c[0] for c in CASES])
def test_interrupted_and_resumed_equals_uninterrupted(small_run, one_thread, name, optimizer, extra, qat):
    full, split = run_file(small_run, f"{name}_full", optimizer, extra, qat), \
        run_file(small_run, f"{name}_split", optimizer, extra, qat)
    with forced("reference"):  # kernels are checked against the interpreter in tests/kernels
        build_trainer(load_config(full)).train()
        interrupted = build_trainer(load_config(split))
        interrupted.callbacks.append(PreemptAt(2))
        stopped = interrupted.train()
        resumed = build_trainer(load_config(split))
        result = resumed.train(resume_from=split.parent / f"{name}_split" / "checkpoint_step_2.pt")
    assert (stopped.stop_reason, stopped.signal, stopped.step) == ("signal", signal.SIGTERM, 2)
    assert result.stop_reason == "max_steps" and result.step == 4
    a = ckpt.load_checkpoint(full.parent / f"{name}_full" / "checkpoint_step_4.pt")
    b = ckpt.load_checkpoint(split.parent / f"{name}_split" / "checkpoint_step_4.pt")
    for key in ("step", "tokens_seen", "model", "optimizer", "scheduler", "scaler", "data", "best_metric"):
        assert_same_tree(a[key], b[key], key)
    if qat:  # the saved config is plain data (enums as their values) and loads back
        assert isinstance(a["config"]["qat"]["observer_type"], str)


def test_a_state_that_could_not_be_loaded_is_refused_at_save_time_naming_the_key(tmp_path):
    from nexus.training.qat import ObserverType

    target = tmp_path / "checkpoint_step_1.pt"
    target.write_bytes(b"the previous checkpoint")
    with pytest.raises(ckpt.CheckpointError, match=r"state\.config\.qat\.observer_type holds a .*ObserverType"):
        ckpt.save_checkpoint({"config": {"qat": {"observer_type": ObserverType.MIN_MAX}}}, target)
    assert target.read_bytes() == b"the previous checkpoint"
    assert ckpt.plain_data({"qat": ObserverType.MIN_MAX, "skip": ("lm_head",)}) == {"qat": "min_max", "skip": ["lm_head"]}
