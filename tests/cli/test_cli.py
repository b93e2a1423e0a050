"""`nexus prepare` / `nexus train` end to end on a small MoE model and a small stdlib corpus."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nexus.cli import main
from nexus.config import load_config
from nexus.training.checkpoint import load_checkpoint
from nexus.training.run import build_trainer


@pytest.mark.slow
def test_interrupted_and_resumed_run_matches_uninterrupted(small_run):
    full, split = small_run("full"), small_run("split")
    assert main(["train", "--config", str(full)]) == 0
    # "interrupted": the same run (same schedule horizon) stops after step 3
    build_trainer(load_config(split)).train(max_steps=3)
    out = split.parent / "split"
    assert main(["train", "--config", str(split), "--resume", str(out / "checkpoint_step_3.pt")]) == 0

    a = load_checkpoint(full.parent / "full" / "checkpoint_step_6.pt")
    b = load_checkpoint(out / "checkpoint_step_6.pt")
    assert a["tokens_seen"] == b["tokens_seen"] == 6 * 4 * 32
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert (full.parent / "full" / "metrics.jsonl").exists()
    assert any((full.parent / "full" / "tensorboard").iterdir())


def test_resume_from_corrupt_checkpoint_exits_with_message(small_run, tmp_path, capsys):
    bad = tmp_path / "checkpoint_step_1.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    assert main(["train", "--config", str(small_run("corrupt")), "--resume", str(bad)]) == 2
    assert "checkpoint_step_1.pt" in capsys.readouterr().err


def test_bad_config_exits_with_message(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {d_modle: 64}\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "d_modle" in err and "bad.yaml" in err


def test_max_steps_below_warmup_shortens_the_warmup_and_says_so(small_run, capsys):
    path = small_run("short")
    path.write_text(path.read_text().replace("max_steps: 6", "max_steps: 30").replace("warmup_steps: 2", "warmup_steps: 10"))
    assert main(["train", "--config", str(path), "--max-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert f"max_steps 3 is shorter than training.warmup_steps 10 in {path}: warmup shortened to 1 steps" in out
    assert load_checkpoint(path.parent / "short" / "checkpoint_step_3.pt")["args"]["warmup_steps"] == 1


def test_warmup_longer_than_the_run_file_itself_is_named(small_run, capsys):
    path = small_run("long_warmup", extra="warmup_steps: 9")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "warmup_steps (9) exceeds max_steps (6)" in err and "long_warmup.yaml" in err


@pytest.mark.parametrize("device", [None, "cpu"])
def test_5b_config_on_this_machine_fails_in_one_line_before_building_anything(device, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("nexus.training.run.device_memory", lambda device: 24 * 2**30)  # this machine, wherever run
    config = Path(__file__).resolve().parents[2] / "configs" / "training_dolma.yaml"
    argv = ["train", "--config", str(config)] + (["--device", device] if device else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    if device is None:  # the file asks for cuda
        assert err == "error: device 'cuda' was asked for but CUDA is not available"
    else:  # counted on the meta device: 5.03B parameters cannot train in 24 GiB
        assert err == ("error: the model has 5.03B parameters and needs about 75 GiB for weights, gradients and "
                       "optimizer state; cpu has 24 GiB")


def test_python_dash_m_nexus_runs():
    out = subprocess.run([sys.executable, "-m", "nexus", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "prepare" in out.stdout


def test_bench_runs_named_scripts_with_their_own_arguments(tmp_path, capsys):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "_common.py").write_text("")
    (bench / "probe.py").write_text(
        "import argparse\nns = argparse.ArgumentParser().parse_args()\nprint('probe ran', ns)\n")
    assert main(["bench", "probe", "--bench-dir", str(bench)]) == 0
    assert "probe ran Namespace()" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no benchmark named"):
        main(["bench", "missing", "--bench-dir", str(bench)])


@pytest.mark.slow
def test_piped_output_keeps_each_metric_line_whole(small_run):
    """CI logs and `| tee` are 80-column non-terminals: a metric line must not wrap mid-field."""
    path = small_run("piped")
    path.write_text(path.read_text().replace("progress_bar: false", "progress_bar: true"))
    env = {**__import__("os").environ, "COLUMNS": "80", "NEXUS_BACKEND": "reference"}
    out = subprocess.run([sys.executable, "-m", "nexus", "train", "--config", str(path), "--max-steps", "2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    train_lines = [line for line in out.stdout.splitlines() if line.startswith("step ") and "lm_loss" in line]
    assert len(train_lines) == 2
    assert all(line.split(" | ")[1].startswith("lm_loss") and
               "tokens_per_s" in line and len(line) > 80 for line in train_lines)
    assert not [line for line in out.stdout.splitlines() if line.startswith(("lr ", "tokens_per_s", "| "))]
