"""`nexus train`'s Trainer under FSDP2: a sharded checkpoint written at 2 ranks resumes at 2 ranks
bit-identically, and at 4 ranks (and back from 4 to 2) to float tolerance, through the run file.

The run file's batch_size is the global batch, so a resumed run at another world size continues the
same data stream; with the batch-split-dependent load-balance loss off, only the order of
floating-point reductions changes (gradients averaged over 4 shards instead of 2), which after three
AdamW steps leaves parameters within 1e-5 of the 2-rank run; a wrong data position or a lost
optimizer state moves them by > 1e-3 (the balance loss left on moved them by 1.7e-3).
"""
from pathlib import Path

import pytest
import torch

from nexus.config import load_config
from nexus.training.run import build_trainer
from tests.distributed.harness import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _full_parameters(trainer) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in trainer.unwrapped_model.named_parameters()}


def _train(path: Path, max_steps: int | None = None, resume: Path | None = None):
    trainer = build_trainer(load_config(path))
    result = trainer.train(max_steps=max_steps, resume_from=resume)
    return result, _full_parameters(trainer)


def _two_ranks_full_split_and_resume(rank, world_size, full: Path, split: Path):
    _, whole = _train(full)  # 6 steps uninterrupted
    _train(split, max_steps=3)  # "interrupted" at step 3 (a sharded checkpoint)
    result, resumed = _train(split, resume=split.parent / "split" / "checkpoint_step_3.dcp")
    return result.step, whole, resumed


def _resume_elsewhere(rank, world_size, path: Path, checkpoint: Path, stop_at: int | None):
    result, params = _train(path, max_steps=stop_at, resume=checkpoint)
    return result.step, params


def _run_file(small_run, name):
    path = small_run(name)
    # The MoE load-balance loss multiplies two batch means, so a rank's share of it depends on how the batch
    # is split: off here, every loss is a mean over windows and only the order of sums depends on the world size.
    text = (path.read_text().replace("eval_interval: 3", "eval_interval: 100")
            .replace("n_pred_tokens: 2}", "n_pred_tokens: 2, balance_loss_weight: 0.0}"))
    path.write_text(text + "distributed: {strategy: fsdp2}\n")
    return path


def test_sharded_checkpoint_resumes_at_the_same_and_at_other_world_sizes(small_run):
    full, split, wide, back = (_run_file(small_run, n) for n in ("full", "split", "wide", "back"))
    (step, whole, resumed), _ = run_distributed(_two_ranks_full_split_and_resume, 2, args=(full, split), timeout=600)
    assert step == 6
    for name, tensor in whole.items():  # same world size: bit-identical continuation
        assert torch.equal(tensor, resumed[name]), name

    at_step_3 = split.parent / "split" / "checkpoint_step_3.dcp"
    outcomes = run_distributed(_resume_elsewhere, 4, args=(wide, at_step_3, None), timeout=600)
    step, params = outcomes[0]
    assert step == 6
    assert max((params[n] - whole[n]).abs().max().item() for n in whole) < 1e-5  # 2 -> 4 ranks

    # and back: 4 ranks write step 4, 2 ranks finish the run
    run_distributed(_resume_elsewhere, 4, args=(back, at_step_3, 4), timeout=600)
    (step, params), _ = run_distributed(_resume_elsewhere, 2,
                                        args=(back, back.parent / "back" / "checkpoint_step_4.dcp", None), timeout=600)
    assert step == 6
    assert max((params[n] - whole[n]).abs().max().item() for n in whole) < 1e-5  # 4 -> 2 ranks
