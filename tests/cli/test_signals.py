"""`nexus train` in a subprocess, stopped by real signals: at a step, during a checkpoint write, twice.

SIGTERM and a first Ctrl-C finish the step, save it, print one resume line and exit 128 + signal;
a second Ctrl-C exits at once; a signal during a save waits for the atomic write. Never a torn file.
"""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nexus.training import checkpoint as ckpt

# Runs the real CLI; SLOW_SAVE_S makes every checkpoint write pause after its bytes are written (before
# the rename), SLOW_STEP_S every optimizer step, so a test can signal a process in the middle of either.
LAUNCHER = """
import os, sys, time
import torch
from nexus.training.trainer import Trainer
save_pause, step_pause = float(os.environ["SLOW_SAVE_S"]), float(os.environ["SLOW_STEP_S"])
if save_pause:
    real_save = torch.save
    def slow_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        print("SAVING", flush=True)
        time.sleep(save_pause)
    torch.save = slow_save
if step_pause:
    real_step = Trainer._train_step
    def slow_step(self):
        print(f"IN STEP {self.step + 1}", flush=True)
        time.sleep(step_pause)
        return real_step(self)
    Trainer._train_step = slow_step
from nexus.cli import main
sys.exit(main(sys.argv[1:]))
"""


class Run:
    """``nexus train --config path`` in a subprocess whose output lines can be awaited."""

    def __init__(self, tmp_path, config, *extra, slow_save=0.0, slow_step=0.0):
        launcher = tmp_path / "launch.py"
        launcher.write_text(LAUNCHER)
        env = {**os.environ, "SLOW_SAVE_S": str(slow_save), "SLOW_STEP_S": str(slow_step), "NEXUS_BACKEND": "reference",
               "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("TRITON_INTERPRET", None)
        self.proc = subprocess.Popen([sys.executable, str(launcher), "train", "--config", str(config), *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text, timeout=180):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.proc.kill()
        raise AssertionError(f"never printed {text!r}; output:\n" + "\n".join(self.lines) + self.proc.stderr.read())

    def finish(self, timeout=180):
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self._reader.join(10)
        return code, "\n".join(self.lines), self.proc.stderr.read()


@pytest.fixture
def long_run(small_run):
    """A run file of 500 steps that saves every 4 steps: a signal always lands mid-run."""
    def write(name):
        path = small_run(name)
        path.write_text(path.read_text().replace("max_steps: 6", "max_steps: 500")
                        .replace("save_interval: 3", "save_interval: 4").replace("eval_interval: 3", "eval_interval: 1000"))
        return path
    return write


def assert_clean_checkpoints(directory: Path):
    """Every checkpoint loads (nothing torn) and no temporary file is left."""
    assert not [p.name for p in directory.iterdir() if ".tmp-" in p.name]
    for _, path in ckpt.step_checkpoints(directory):
        ckpt.load_checkpoint(path)


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_at_a_step_saves_that_step_and_says_how_to_resume(tmp_path, long_run, sig, code):
    config = long_run(f"stop_{sig.name}")
    run = Run(tmp_path, config)
    run.wait_for("step 5/500")
    run.proc.send_signal(sig)
    rc, out, err = run.finish()
    assert rc == code, (out, err)
    assert "Traceback" not in err, err
    (line,) = [line for line in out.splitlines() if line.startswith("stopped by")]
    step = int(line.split(" at step ")[1].split(";")[0])
    path = config.parent / f"stop_{sig.name}" / f"checkpoint_step_{step}.pt"
    assert line == f"stopped by {sig.name} at step {step}; resume with: nexus train --config {config} --resume {path}"
    assert step >= 5 and ckpt.load_checkpoint(path)["step"] == step
    assert_clean_checkpoints(path.parent)
    # and the printed command resumes it
    resumed = Run(tmp_path, config, "--resume", str(path), "--max-steps", str(step + 2))
    rc, out, err = resumed.finish()
    assert rc == 0, (out, err)
    assert f"resumed from step {step} (tokens {step * 4 * 32:,})" in out


@pytest.mark.slow
@pytest.mark.parametrize("twice", [False, True], ids=["SIGTERM", "SIGINT-twice"])
def test_signal_during_a_save_waits_for_the_atomic_write(tmp_path, long_run, twice):
    config = long_run(f"during_save_{twice}")
    run = Run(tmp_path, config, slow_save=2.0)
    run.wait_for("SAVING")  # the first checkpoint's bytes are written, its rename not yet done
    if twice:
        run.proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        run.proc.send_signal(signal.SIGINT)
    else:
        run.proc.send_signal(signal.SIGTERM)
    rc, out, err = run.finish()
    assert "Traceback" not in err, err
    directory = config.parent / f"during_save_{twice}"
    assert_clean_checkpoints(directory)
    assert ckpt.load_checkpoint(directory / "checkpoint_step_4.pt")["step"] == 4  # the save in flight completed
    if twice:
        assert rc == 130 and "interrupted: stopped at once" in err
    else:
        assert rc == 143 and f"stopped by SIGTERM at step 4; resume with: nexus train --config {config} --resume " \
            f"{directory / 'checkpoint_step_4.pt'}" in out


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once(tmp_path, long_run):
    config = long_run("twice")
    run = Run(tmp_path, config, slow_step=3.0)
    run.wait_for("IN STEP 2")  # a step that takes 3 s: both presses land inside it
    run.proc.send_signal(signal.SIGINT)
    time.sleep(0.3)  # two presses, not one: signals that arrive together reach Python as one
    run.proc.send_signal(signal.SIGINT)
    rc, out, err = run.finish(timeout=60)
    assert rc == 130, (out, err)
    assert "interrupted: stopped at once" in err and "Traceback" not in err
    assert not [line for line in out.splitlines() if line.startswith("stopped by")]
    assert not (config.parent / "twice" / "checkpoint_step_2.pt").exists()  # it did not wait for the step
    assert_clean_checkpoints(config.parent / "twice")
