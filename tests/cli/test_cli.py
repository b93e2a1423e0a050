"""`nexus prepare` / `nexus train` end to end on a small MoE model and a small stdlib corpus."""
import subprocess
import sys

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


def test_max_steps_below_warmup_exits_with_message(small_run, capsys):
    assert main(["train", "--config", str(small_run("short")), "--max-steps", "1"]) == 2
    assert "warmup_steps (2) exceeds max_steps (1)" in capsys.readouterr().err


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
