"""`prepare_data`: corpus -> tokenizer -> train.bin / val.bin, each step skipped when already done."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .corpus import build_default_corpus
from .dolma_dataset import expand_shards, read_token_header, write_token_file
from .errors import DataError
from .tokenizer import TokenizerWrapper, iter_documents, train_bpe_tokenizer

__all__ = ["PreparedData", "prepare_data"]

_MANIFEST = "prepare.json"
_TOKENIZE_BATCH_DOCS = 256  # enough documents per Rust call to use both cores
_TOKENIZER_TRAIN_CHARS = 64 * 2**20  # BPE merges settle long before this; keeps big corpora fast


@dataclass(frozen=True)
class PreparedData:
    """What `prepare_data` produced; token files are read with `DolmaMemoryMappedDataset`.

    Example:
        p = prepare_data(data_dir="data/tiny", vocab_size=4096, max_corpus_bytes=8_000_000)
        ds = DolmaMemoryMappedDataset(p.train_tokens_path, seq_len=256)
    """

    tokenizer_path: Path
    train_tokens_path: Path
    val_tokens_path: Path
    n_train_tokens: int
    n_val_tokens: int


def _log(msg: str) -> None:
    print(f"[nexus prepare] {msg}", flush=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _fingerprint(files: list[Path]) -> list:
    """Cheap identity of input files: resolved path, size and mtime (what make would use)."""
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _load_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save_manifest(path: Path, manifest: dict) -> None:
    # one temporary name per process: ranks started by a launcher may save at the same time
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _token_chunks(files, tok: TokenizerWrapper):
    """Token ids of every document of `files`, each followed by eos, in batches of documents."""
    eos = tok.eos_token_id
    if eos is None:
        raise ValueError(f"{tok!r} has no eos token to separate documents")
    batch: list[str] = []
    for f in files:
        for text in iter_documents(f):
            batch.append(text)
            if len(batch) == _TOKENIZE_BATCH_DOCS:
                yield _encode(batch, tok, eos)
                batch = []
    if batch:
        yield _encode(batch, tok, eos)


def _encode(texts, tok, eos) -> np.ndarray:
    encs = tok.backend.encode_batch(texts, add_special_tokens=False)
    return np.concatenate([np.asarray(e.ids + [eos], dtype=np.int64) for e in encs])


def _split_shards(files, split: str) -> list[Path]:
    """The shards of one split, checked to exist and to hold at least one document."""
    try:
        shards = expand_shards(files)
    except DataError as e:
        raise type(e)(f"{split}_files: {e}") from None
    if not shards:
        raise DataError(f"{split}_files names no shards; give at least one JSONL/.txt shard or a directory of them")
    # Checked before the tokenizer is trained: an empty split would give a 260-id tokenizer, then no windows.
    if not any(True for f in shards for _ in iter_documents(f)):
        names = ", ".join(str(f) for f in shards[:3]) + (f" and {len(shards) - 3} more" if len(shards) > 3 else "")
        raise DataError(f"the {split} split is empty: no documents in {names} (JSONL: one {{'text': ...}} "
                        f"object per non-blank line)")
    return shards


def _token_file_ok(path: Path, vocab_size: int) -> int | None:
    try:
        header = read_token_header(path)
    except (OSError, ValueError):
        return None
    return header["n_tokens"] if header["vocab_size"] == vocab_size else None


def prepare_data(*, data_dir, vocab_size: int, max_corpus_bytes: int | None = None, tokenizer_path=None,
                 train_files=None, val_files=None, seed: int = 0) -> PreparedData:
    """Build (or reuse) the corpus, the BPE tokenizer and the train/val token files in `data_dir`.

    Without `train_files`/`val_files`, the corpus is the Python standard library
    (`build_default_corpus`, capped at `max_corpus_bytes`) in `data_dir/corpus/`. The tokenizer
    is `tokenizer_path` if that file exists (its vocabulary must fit `vocab_size`), else it is
    trained into `tokenizer_path or data_dir/tokenizer.json`. Writes `data_dir/train.bin` and
    `data_dir/val.bin` (uint16/uint32 ids, eos after each document) and `data_dir/prepare.json`,
    which makes a rerun with the same inputs skip every step. A missing shard or shard directory,
    or a split with no documents, raises `DataError` naming the path before any work is done.

    Example:
        p = prepare_data(data_dir="data/tiny", vocab_size=4096, max_corpus_bytes=8_000_000)
        print(p.n_train_tokens, p.tokenizer_path)
    """
    t_start = time.perf_counter()
    if not isinstance(vocab_size, int) or vocab_size < 300:
        raise ValueError(f"vocab_size must be an int >= 300 (256 bytes, special tokens, some merges), got {vocab_size!r}")
    if (train_files is None) != (val_files is None):
        raise ValueError("pass both train_files and val_files (a held-out set is needed for evaluation), "
                         "or neither to use the default standard-library corpus")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    with _one_at_a_time(data_dir):
        return _prepare(data_dir, vocab_size, max_corpus_bytes, tokenizer_path, train_files, val_files, seed,
                        t_start)


@contextlib.contextmanager
def _one_at_a_time(data_dir: Path):
    """One preparation per data directory at a time (ranks under a launcher, two shells): the second
    waits on an OS file lock, then finds every file up to date. No lock where fcntl is missing (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(data_dir / ".prepare.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _prepare(data_dir: Path, vocab_size, max_corpus_bytes, tokenizer_path, train_files, val_files, seed,
             t_start: float) -> PreparedData:
    manifest_path = data_dir / _MANIFEST
    old = _load_manifest(manifest_path)

    if train_files is None:
        corpus = build_default_corpus(data_dir / "corpus", max_bytes=max_corpus_bytes, seed=seed)
        train_files, val_files = corpus.train, corpus.val
        _log(f"corpus: Python standard library, {len(train_files)} train + {len(val_files)} val shards "
             f"in {data_dir / 'corpus'}")
    else:
        train_files, val_files = _split_shards(train_files, "train"), _split_shards(val_files, "val")
        _log(f"corpus: {len(train_files)} train + {len(val_files)} val shards given")
    inputs = {"train": _fingerprint(train_files), "val": _fingerprint(val_files)}

    # Tokenizer: a user-supplied file is used as is; ours is retrained when its inputs changed.
    user_tok = tokenizer_path is not None and Path(tokenizer_path).exists()
    tok_path = Path(tokenizer_path) if tokenizer_path is not None else data_dir / "tokenizer.json"
    if tok_path.is_dir() or (tok_path.suffix != ".json" and not tok_path.exists()):
        tok_path = tok_path / "tokenizer.json"
    tok_request = {"vocab_size": vocab_size, "train": inputs["train"]}
    if user_tok:
        tok = TokenizerWrapper(tok_path)
        if tok.vocab_size > vocab_size:
            raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} ids, more than vocab_size={vocab_size}")
        _log(f"tokenizer: using {tok.path} ({tok.vocab_size} ids)")
    elif (tok_path.is_file() and old.get("tokenizer_request") == tok_request
          and old.get("tokenizer_sha256") == _sha256(tok_path)):
        tok = TokenizerWrapper(tok_path)
        _log(f"tokenizer: {tok_path} is up to date ({tok.vocab_size} ids)")
    else:
        t0 = time.perf_counter()
        tok = train_bpe_tokenizer(train_files, vocab_size, tok_path, max_bytes=_TOKENIZER_TRAIN_CHARS)
        _log(f"tokenizer: trained byte-level BPE, {tok.vocab_size} ids, in {time.perf_counter() - t0:.1f}s "
             f"-> {tok_path}")
        old = {}  # token files made with another tokenizer are stale
    tok_sha = _sha256(tok.path)

    counts = {}
    for split, files in (("train", train_files), ("val", val_files)):
        out = data_dir / f"{split}.bin"
        request = {"tokenizer_sha256": tok_sha, "vocab_size": vocab_size, "files": inputs[split]}
        n = _token_file_ok(out, vocab_size)
        if n is not None and old.get(f"{split}_request") == request:
            _log(f"{split}: {out} is up to date ({n:,} tokens)")
        else:
            t0 = time.perf_counter()
            n = write_token_file(out, _token_chunks(files, tok), vocab_size)
            _log(f"{split}: tokenized {n:,} tokens in {time.perf_counter() - t0:.1f}s -> {out}")
        counts[split] = n
        old[f"{split}_request"] = request
        old["tokenizer_request"], old["tokenizer_sha256"] = tok_request, tok_sha
        _save_manifest(manifest_path, old)  # after each step, so an interrupted run keeps finished work

    _log(f"done in {time.perf_counter() - t_start:.1f}s")
    return PreparedData(tokenizer_path=Path(tok.path), train_tokens_path=data_dir / "train.bin",
                        val_tokens_path=data_dir / "val.bin", n_train_tokens=counts["train"],
                        n_val_tokens=counts["val"])
