"""YAML run files: every shipped config loads; bad keys, types and values name the key and the file."""
import re
from pathlib import Path

import pytest
import torch

from nexus.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["tiny.yaml", "test.yaml", "small.yaml", "training_dolma.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.data.vocab_size == cfg.model.vocab_size
    assert cfg.training.resolve_max_steps() > 0


def test_dolma_config_is_5b_total_and_1p5_to_2b_active_on_meta():
    from nexus.models.moe import MoETransformer

    cfg = load_config(CONFIGS / "training_dolma.yaml")
    with torch.device("meta"):
        model = MoETransformer(cfg.model)
    total, active = model.num_parameters(), model.num_parameters(active=True)
    assert 4.5e9 <= total <= 5.5e9, total
    assert 1.5e9 <= active <= 2.0e9, active
    assert cfg.training.tokens_per_step == 16384
    assert cfg.training.resolve_max_steps() == 100_000_000_000 // 16384


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


BASE = """
model: {vocab_size: 512, d_model: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, d_ff: 64, n_experts: 4, moe_top_k: 2,
        mod_layer_interval: 2, mamba_layer_interval: 2, mamba_head_dim: 32, max_seq_len: 64}
data: {vocab_size: 512}
training: {seq_len: 32, max_steps: 10}
"""


def test_minimal_config_loads(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.model.d_model == 64 and cfg.optimizer.type == "adamw"


@pytest.mark.parametrize(
    "patch, pattern",
    [
        ("training: {seq_len: 32, max_steps: 10, learnig_rate: 0.1}", r"training.*'learnig_rate' \(did you mean 'learning_rate'"),
        ("training: {seq_len: 32, max_stepz: 10}", r"did you mean 'max_steps'"),
        ("training: {seq_len: 0, max_steps: 10}", r"training.*seq_len"),
        ("training: {seq_len: 32, max_steps: ten}", r"training.max_steps: expected an integer"),
        ("training: {seq_len: 32, max_steps: 10, precision: fp7}", r"precision"),
        ("optimizer: {type: adamx}", r"optimizer.*type"),
        ("optimizer: {betas: [0.9]}", r"optimizer.betas: expected 2 items"),
        ("extra: {a: 1}", r"unknown section 'extra'"),
        ("qat: {observer: min_max}", r"qat.*'observer'"),
        ("qat: {observer_type: median}", r"qat.*observer_type"),
    ],
)
def test_bad_config_names_key_and_file(tmp_path, patch, pattern):
    text = BASE.replace("training: {seq_len: 32, max_steps: 10}\n", "") + patch + "\n"
    if not patch.startswith("training"):
        text += "training: {seq_len: 32, max_steps: 10}\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_model_validation_errors_name_the_key(tmp_path):
    path = write(tmp_path, BASE.replace("moe_top_k: 2", "moe_top_k: 5"))
    with pytest.raises(ConfigError, match=r"model.*moe_top_k"):
        load_config(path)


def test_vocab_mismatch_and_seq_len_over_max(tmp_path):
    with pytest.raises(ConfigError, match="vocab_size"):
        load_config(write(tmp_path, BASE.replace("data: {vocab_size: 512}", "data: {vocab_size: 1024}")))
    with pytest.raises(ConfigError, match="max_seq_len"):
        load_config(write(tmp_path, BASE.replace("seq_len: 32", "seq_len: 128")))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed"))


def test_qat_section_is_optional_and_exclusive_with_fp8(tmp_path):
    assert load_config(write(tmp_path, BASE)).qat is None
    cfg = load_config(write(tmp_path, BASE + "qat: {weight_bits: 4}\n"))
    assert cfg.qat.weight_bits == 4
    text = BASE.replace("max_steps: 10", "max_steps: 10, precision: fp8") + "qat: {}\n"
    with pytest.raises(ConfigError, match="qat"):
        load_config(write(tmp_path, text))


def test_yaml_exponent_numbers_are_numbers(tmp_path):
    text = BASE.replace("training: {seq_len: 32, max_steps: 10}",
                        "training: {seq_len: 32, total_tokens: 1e5, max_lr: 3e-4, min_lr: 3e-5}")
    cfg = load_config(write(tmp_path, text))
    assert cfg.training.max_lr == 3e-4 and cfg.training.total_tokens == 100000
    with pytest.raises(ConfigError, match="total_tokens: expected an integer"):
        load_config(write(tmp_path, text.replace("1e5", "1.5")))


def test_directory_as_config_says_it_is_a_directory(tmp_path):
    expected = rf"^{re.escape(str(tmp_path))} is a directory, not a config file: pass a YAML run file$"
    with pytest.raises(ConfigError, match=expected):
        load_config(tmp_path)
    write(tmp_path, BASE)
    with pytest.raises(ConfigError, match=r"is a directory, not a config file: .*; it holds run\.yaml$"):
        load_config(str(tmp_path))
