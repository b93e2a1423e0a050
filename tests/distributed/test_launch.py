"""`nexus train` launched for real: torchrun and mpirun, 2 ranks on 127.0.0.1, against one process.

A run file's `distributed:` section builds the mesh; `training.batch_size` is the global batch, split
across the data-parallel ranks, so the 2-rank run sees the same windows per step as one process and
must reach the same validation loss. The only differences are the order of floating-point sums and
the MoE load-balance loss, which each rank estimates on its half of the batch (a product of two
batch means, so the mean over ranks differs from the full-batch value at O(1/batch)); weighted by
0.01 it moves the validation loss by well under 1e-2 after a few steps, the bound used here.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from nexus.training import checkpoint as ckpt
from tests.distributed.harness import loopback_interface, loopback_store

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
STEPS = 6


def _env():
    env = {**os.environ, "GLOO_SOCKET_IFNAME": loopback_interface(), "OMP_NUM_THREADS": "1",
           "NEXUS_BACKEND": "reference", "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    return env


def _run_file(small_run, name, distributed):
    path = small_run(name)
    text = path.read_text().replace("max_steps: 6", f"max_steps: {STEPS}").replace("eval_interval: 3", "eval_interval: 3")
    path.write_text(text + (f"distributed: {distributed}\n" if distributed else ""))
    return path


def _val_losses(path, name):
    lines = (path.parent / name / "metrics.jsonl").read_text().splitlines()
    return [r["val_loss"] for r in map(json.loads, lines) if "val_loss" in r]


@pytest.fixture(scope="module")
def single(small_run):
    path = _run_file(small_run, "launch_single", None)
    out = subprocess.run([sys.executable, "-m", "nexus", "train", "--config", str(path)], env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return _val_losses(path, "launch_single")


LAYOUTS = {  # the `distributed:` section of each 2-rank run
    "fsdp2": "{strategy: fsdp2}",
    "fsdp2_checkpointed": "{strategy: fsdp2, activation_checkpointing: true}",
    "ddp": "{strategy: ddp}",
    "tp": "{tp: 2}",
    "pp_gpipe": "{pp: 2, pp_schedule: gpipe}",
    "zero1": "{strategy: zero, zero_stage: 1}",
    "zeropp": "{strategy: zero++}",  # int8 weights, int4 gradients with error feedback
}
# ZeRO++'s quantized collectives move the trajectory by more than rounding: int4 gradient blocks carry
# ~1/14 of their block's amax in error (error feedback returns it next step), int8 weights ~1/254
TOLERANCE = {"zeropp": 5e-2}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_torchrun_two_ranks_reach_the_single_process_validation_loss(small_run, single, layout):
    name = f"launch_torchrun_{layout}"
    path = _run_file(small_run, name, LAYOUTS[layout])
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "nexus", "train", "--config", str(path)]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert out.stdout.count("model: ") == 1  # rank 0 alone prints
    losses = _val_losses(path, name)
    bound = TOLERANCE.get(layout, 1e-2)
    assert len(losses) == len(single) and max(abs(a - b) for a, b in zip(losses, single)) < bound, (losses, single)
    last = ckpt.latest_checkpoint(path.parent / name)
    whole = layout in ("ddp", "zero1", "zeropp")  # rank 0 writes one file; sharded runs: every rank
    assert last.name == f"checkpoint_step_{STEPS}." + ("pt" if whole else "dcp")
    assert ckpt.saved_step(last) == STEPS


def test_torchrun_context_parallel_splits_each_sequence_and_reaches_the_single_process_validation_loss(small_run):
    """`distributed: {cp: 2}`: every window's sequence split over the two ranks (ring attention, FSDP2 over
    cp), against one process on whole windows. The model leaves out routing Mamba and mixture of depths
    (they need whole sequences) and the load-balance loss (it depends on how tokens are split), so only
    the order of floating-point sums differs: a far tighter bound than the data-parallel runs'."""
    def run_file(name, distributed):
        path = _run_file(small_run, name, distributed)
        path.write_text(path.read_text().replace(
            "n_pred_tokens: 2}", "n_pred_tokens: 2, use_mamba: false, use_mod: false, balance_loss_weight: 0.0}"))
        return path

    single = run_file("launch_cp_single", None)
    out = subprocess.run([sys.executable, "-m", "nexus", "train", "--config", str(single)], env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    split = run_file("launch_cp", "{cp: 2}")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "nexus", "train", "--config", str(split)]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    losses, want = _val_losses(split, "launch_cp"), _val_losses(single, "launch_cp_single")
    assert len(losses) == len(want) and max(abs(a - b) for a, b in zip(losses, want)) < 1e-4, (losses, want)
    assert ckpt.saved_step(ckpt.latest_checkpoint(split.parent / "launch_cp")) == STEPS


def test_mpirun_two_ranks_reach_the_single_process_validation_loss(small_run, single):
    name = "launch_mpirun"
    path = _run_file(small_run, name, "{strategy: fsdp2}")
    store, port = loopback_store(timeout=600)  # race-free rendezvous on 127.0.0.1, hosted here
    env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    exports = [a for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE", "GLOO_SOCKET_IFNAME",
                           "OMP_NUM_THREADS", "NEXUS_BACKEND", "PYTHONUNBUFFERED", "PATH") for a in ("-x", k)]
    assert shutil.which("mpirun"), "OpenMPI's mpirun is missing: .ci/run installs it (apt-get install openmpi-bin)"
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--mca", "btl", "self,vader", "--mca",
           "oob_tcp_if_include", "lo", "-np", "2", *exports, sys.executable, "-m", "nexus", "train", "--config", str(path)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    del store
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    losses = _val_losses(path, name)
    assert len(losses) == len(single) and max(abs(a - b) for a, b in zip(losses, single)) < 1e-2, (losses, single)
