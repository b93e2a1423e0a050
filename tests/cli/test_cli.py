"""`nexus prepare` / `nexus train` end to end on a small MoE model and a small stdlib corpus."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nexus.cli import main
from nexus.config import load_config
from nexus.training.run import build_trainer
from nexus.training.checkpoint import load_checkpoint

CONFIG = """
model: {{vocab_size: 512, d_model: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, d_ff: 64, n_experts: 4,
        moe_top_k: 2, mod_layer_interval: 2, mamba_layer_interval: 2, mamba_head_dim: 32, mamba_d_state: 8,
        mamba_chunk_size: 16, max_seq_len: 64, n_pred_tokens: 2}}
data: {{data_dir: {data}, vocab_size: 512, max_corpus_bytes: 400000}}
training: {{output_dir: {out}, seq_len: 32, batch_size: 4, max_steps: 6, warmup_steps: 2, log_interval: 1,
           eval_interval: 3, eval_steps: 2, save_interval: 3, keep_last: 5, progress_bar: false, device: cpu}}
optimizer: {{type: adamw}}
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    path = root / "run.yaml"
    path.write_text(CONFIG.format(data=root / "data", out=root / "unused"))
    assert main(["prepare", "--config", str(path)]) == 0
    return root / "data"


def config(tmp_path, data_dir, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(CONFIG.format(data=data_dir, out=tmp_path / name))
    return path


@pytest.mark.slow
def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, data_dir):
    full = config(tmp_path, data_dir, "full")
    assert main(["train", "--config", str(full)]) == 0
    split = config(tmp_path, data_dir, "split")
    # "interrupted": the same run (same schedule horizon) stops after step 3
    build_trainer(load_config(split)).train(max_steps=3)
    assert main(["train", "--config", str(split), "--resume", str(tmp_path / "split" / "checkpoint_step_3.pt")]) == 0

    a = load_checkpoint(tmp_path / "full" / "checkpoint_step_6.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint_step_6.pt")
    assert a["tokens_seen"] == b["tokens_seen"] == 6 * 4 * 32
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert (tmp_path / "full" / "metrics.jsonl").exists()
    assert any((tmp_path / "full" / "tensorboard").iterdir())


def test_resume_from_corrupt_checkpoint_exits_with_message(tmp_path, data_dir, capsys):
    bad = tmp_path / "checkpoint_step_1.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    assert main(["train", "--config", str(config(tmp_path, data_dir, "x")), "--resume", str(bad)]) == 2
    assert "checkpoint_step_1.pt" in capsys.readouterr().err


def test_bad_config_exits_with_message(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {d_modle: 64}\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "d_modle" in err and "bad.yaml" in err


def test_python_dash_m_nexus_runs():
    out = subprocess.run([sys.executable, "-m", "nexus", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "prepare" in out.stdout
