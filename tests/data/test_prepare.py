import json
import re
import subprocess
import sys

import numpy as np
import pytest

from nexus.cli import main
from nexus.data import (DataError, DolmaMemoryMappedDataset, TokenizerWrapper, iter_documents, prepare_data,
                        read_token_header, stdlib_documents)

BYTES, VOCAB = 200_000, 600


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("prep")
    return data_dir, prepare_data(data_dir=data_dir, vocab_size=VOCAB, max_corpus_bytes=BYTES)


def _split_docs(tokens, eos):
    ends = np.flatnonzero(tokens == eos)
    return [tokens[a + 1 if i else 0: b] for i, (a, b) in enumerate(zip(np.r_[-1, ends[:-1]], ends))]


def test_token_files_decode_to_the_corpus(prepared):
    data_dir, p = prepared
    tok = TokenizerWrapper(p.tokenizer_path)
    assert p.tokenizer_path == data_dir / "tokenizer.json" and tok.vocab_size == VOCAB
    for path, n, split in ((p.train_tokens_path, p.n_train_tokens, "train"), (p.val_tokens_path, p.n_val_tokens, "val")):
        header = read_token_header(path)
        assert header["n_tokens"] == n > 0 and header["dtype"] == "uint16" and header["vocab_size"] == VOCAB
        tokens = np.fromfile(path, dtype=np.uint16).astype(np.int64)
        assert tokens[-1] == tok.eos_token_id  # every document ends with eos
        docs = [t for f in sorted((data_dir / "corpus").glob(f"{split}_*.jsonl")) for t in iter_documents(f)]
        decoded = [tok.decode(d) for d in _split_docs(tokens, tok.eos_token_id)]
        assert decoded == docs
    assert p.n_val_tokens < p.n_train_tokens


def test_rerun_skips_everything(prepared, capsys):
    data_dir, p = prepared
    files = [p.tokenizer_path, p.train_tokens_path, p.val_tokens_path]
    before = [f.stat().st_mtime_ns for f in files]
    again = prepare_data(data_dir=data_dir, vocab_size=VOCAB, max_corpus_bytes=BYTES)
    assert again == p
    assert [f.stat().st_mtime_ns for f in files] == before
    out = capsys.readouterr().out
    assert out.count("up to date") == 3 and "trained" not in out


def test_changed_vocab_retrains_and_retokenizes(tmp_path):
    p1 = prepare_data(data_dir=tmp_path, vocab_size=400, max_corpus_bytes=50_000)
    p2 = prepare_data(data_dir=tmp_path, vocab_size=500, max_corpus_bytes=50_000)
    assert TokenizerWrapper(p2.tokenizer_path).vocab_size == 500
    assert read_token_header(p2.train_tokens_path)["vocab_size"] == 500
    assert p2.n_train_tokens < p1.n_train_tokens  # more merges, fewer tokens
    manifest = json.loads((tmp_path / "prepare.json").read_text())
    assert manifest["tokenizer_request"]["vocab_size"] == 500


def test_damaged_token_file_is_rewritten(tmp_path):
    p = prepare_data(data_dir=tmp_path, vocab_size=400, max_corpus_bytes=50_000)
    good = p.val_tokens_path.read_bytes()
    p.val_tokens_path.write_bytes(good[:-2])
    prepare_data(data_dir=tmp_path, vocab_size=400, max_corpus_bytes=50_000)
    assert p.val_tokens_path.read_bytes() == good


def test_user_files_and_user_tokenizer(prepared, tmp_path):
    _, p = prepared
    docs = [t for _, t in stdlib_documents() if 20 < len(t) < 3000][:30]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:25]))
    (tmp_path / "val.txt").write_text(docs[25])
    out = prepare_data(data_dir=tmp_path / "out", vocab_size=1024, tokenizer_path=p.tokenizer_path,
                       train_files=[tmp_path / "train.jsonl"], val_files=[tmp_path / "val.txt"])
    tok = TokenizerWrapper(p.tokenizer_path)
    assert out.tokenizer_path == p.tokenizer_path and not (tmp_path / "out" / "corpus").exists()
    assert out.n_train_tokens == sum(len(tok.encode(d)) + 1 for d in docs[:25])
    val = DolmaMemoryMappedDataset(out.val_tokens_path, seq_len=out.n_val_tokens - 1)
    assert tok.decode(val[0][:-1]) == docs[25]


def test_bad_arguments(prepared, tmp_path):
    _, p = prepared
    with pytest.raises(ValueError, match="val_files"):
        prepare_data(data_dir=tmp_path, vocab_size=VOCAB, train_files=[p.train_tokens_path])
    with pytest.raises(ValueError, match="vocab_size"):
        prepare_data(data_dir=tmp_path, vocab_size=100)
    with pytest.raises(ValueError, match="more than vocab_size=400"):
        prepare_data(data_dir=tmp_path, vocab_size=400, max_corpus_bytes=50_000, tokenizer_path=p.tokenizer_path)


# ---- bad inputs fail before any work, naming the path -------------------------------------------

def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.mark.parametrize("case, pattern", [
    ("train_empty_dir", r"train_files: shard directory \S*empty holds no shards"),
    ("train_missing_dir", r"train_files: shard directory \S*gone does not exist"),
    ("val_missing_shard", r"val_files: shard \S*val-00000\.jsonl\.gz does not exist"),
    ("train_empty_file", r"the train split is empty: no documents in \S*nothing\.jsonl"),
    ("train_blank_lines", r"the train split is empty: no documents in \S*blank\.jsonl"),
    ("val_empty_file", r"the val split is empty: no documents in \S*nothing\.jsonl"),
    ("train_no_files", r"train_files names no shards"),
])
def test_bad_split_fails_before_training_a_tokenizer(tmp_path, case, pattern):
    (tmp_path / "empty").mkdir()
    (tmp_path / "nothing.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    good = _jsonl(tmp_path / "good.jsonl", ["def f(x):\n    return x\n", "print('hello')\n"])
    train, val = {
        "train_empty_dir": ([tmp_path / "empty"], [good]),
        "train_missing_dir": ([tmp_path / "gone"], [good]),
        "val_missing_shard": ([good], [tmp_path / "val-00000.jsonl.gz"]),
        "train_empty_file": ([tmp_path / "nothing.jsonl"], [good]),
        "train_blank_lines": ([tmp_path / "blank.jsonl"], [good]),
        "val_empty_file": ([good], [tmp_path / "nothing.jsonl"]),
        "train_no_files": ([], [good]),
    }[case]
    out = tmp_path / "out"
    with pytest.raises(DataError, match=pattern) as err:
        prepare_data(data_dir=out, vocab_size=VOCAB, train_files=train, val_files=val)
    assert "\n" not in str(err.value)
    # nothing was trained or tokenized (today an empty train split gave a 260-id tokenizer and n=0 later)
    assert not (out / "tokenizer.json").exists() and not (out / "train.bin").exists()


RUN = """
model: {{vocab_size: 512, d_model: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, d_ff: 64, n_experts: 4, moe_top_k: 2,
        mod_layer_interval: 2, mamba_layer_interval: 2, mamba_head_dim: 32, max_seq_len: 64, n_pred_tokens: 2}}
data: {{data_dir: {data}, vocab_size: 512, train_files: [{train}], val_files: [{val}]}}
training: {{output_dir: {data}/run, seq_len: 32, batch_size: 2, max_steps: 2, warmup_steps: 0, device: cpu}}
"""


def test_nexus_prepare_on_empty_shard_directory_is_one_line_exit_2(tmp_path):
    data = tmp_path / "data"
    (data / "shards").mkdir(parents=True)
    config = tmp_path / "run.yaml"
    config.write_text(RUN.format(data=data, train=data / "shards", val=data / "shards"))
    proc = subprocess.run([sys.executable, "-m", "nexus", "prepare", "--config", str(config)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"error: train_files: shard directory {data / 'shards'} holds no shards " \
                          f"(.jsonl, .jsonl.gz, .json.gz, .txt, .txt.gz)\n"
    assert not (data / "tokenizer.json").exists()


def test_nexus_train_with_too_short_val_split_names_the_file(tmp_path, capsys):
    docs = [t for _, t in stdlib_documents() if 200 < len(t) < 3000][:20]
    train, val = _jsonl(tmp_path / "train.jsonl", docs), _jsonl(tmp_path / "val.jsonl", ["x = 1"])
    data = tmp_path / "data"
    config = tmp_path / "run.yaml"
    config.write_text(RUN.format(data=data, train=train, val=val))
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.search(rf"{re.escape(str(data / 'val.bin'))} holds \d+ tokens, fewer than one window of "
                     r"seq_len \+ n_pred_tokens = 32 \+ 2 = 34", err), err
