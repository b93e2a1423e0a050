import os

# Triton reads this when a kernel is decorated: set before anything imports nexus_kernels,
# so that kernel tests run the Triton source through the interpreter on CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("NEXUS_BACKEND", None)

import pytest  # noqa: E402

SMALL_RUN = """
model: {{vocab_size: 512, d_model: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, d_ff: 64, n_experts: 4,
        moe_top_k: 2, mod_layer_interval: 2, mamba_layer_interval: 2, mamba_head_dim: 32, mamba_d_state: 8,
        mamba_chunk_size: 16, max_seq_len: 64, n_pred_tokens: 2}}
data: {{data_dir: {data}, vocab_size: 512, max_corpus_bytes: 400000}}
training: {{output_dir: {out}, seq_len: 32, batch_size: 4, max_steps: 6, warmup_steps: 2, log_interval: 1,
           eval_interval: 3, eval_batches: 2, save_interval: 3, keep_last: 5, progress_bar: false, device: cpu{extra}}}
optimizer: {{type: {optimizer}}}
"""


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """``small_run(name, optimizer="adamw", extra="")`` writes a run file for a small MoE model on a
    400 kB stdlib corpus prepared once per session, and returns its path."""
    from nexus.cli import main

    root = tmp_path_factory.mktemp("small_run")
    data = root / "data"

    def write(name: str, optimizer: str = "adamw", extra: str = "") -> "Path":
        path = root / f"{name}.yaml"
        path.write_text(SMALL_RUN.format(data=data, out=root / name, optimizer=optimizer,
                                         extra=f", {extra}" if extra else ""))
        return path

    assert main(["prepare", "--config", str(write("prepare"))]) == 0
    return write
