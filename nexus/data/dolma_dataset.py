"""Training windows from text: streamed from Dolma-style shards, or read from a pre-tokenized file.

Both datasets give windows of `seq_len + n_pred_tokens` token ids (int64), so a model predicting
`n_pred_tokens` tokens ahead has targets for every one of its `seq_len` positions.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from collections import deque
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .errors import DataError, DataFileNotFoundError
from .tokenizer import TokenizerWrapper, _parse_line, expand_shards

__all__ = ["DolmaStreamingDataset", "DolmaMemoryMappedDataset", "write_token_file", "read_token_header",
           "token_dtype", "expand_shards"]

_TOKEN_FORMAT = "nexus-tokens"
_TOKEN_VERSION = 1
# Columns of the shared progress table, one row per dataloader worker of this rank.
_VALID, _NUM_WORKERS, _EPOCH, _DOC, _OFFSET, _WINDOWS = range(6)


def _raw_documents(path: Path) -> Iterator[tuple[str, int]]:
    """(raw, lineno) per document, unparsed: lineno 0 means raw is the text of a whole .txt file."""
    name = path.name.lower()
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if name.endswith((".txt", ".txt.gz")):
                yield f.read(), 0
                return
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield line, lineno
    except FileNotFoundError:
        raise DataFileNotFoundError(f"shard {path} does not exist (it was there when the dataset was built)") from None
    # A truncated gzip ends in EOFError, a non-gzip file in BadGzipFile (an OSError).
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read it as UTF-8 text: {e}") from e


def _resolve_rank(rank, world_size):
    dist = torch.distributed
    initialized = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


class DolmaStreamingDataset(IterableDataset):
    """Tokenize JSONL / JSONL.gz / .txt shards on the fly and pack them into fixed windows.

    Yields LongTensors of shape (seq_len + n_pred_tokens,). Documents are joined with the eos
    token into one stream, cut into non-overlapping windows; nothing is padded.

    Sharding: documents are numbered in reading order (files in order, reshuffled each epoch when
    `shuffle_files`); with W dataloader workers per rank, document j goes to consumer
    j % (world_size * W), consumer = rank * W + worker. So every document is read by exactly one
    worker of one rank, and each consumer's windows are exactly its documents' tokens in order.
    The only tokens dropped are each consumer's final partial window (< seq_len + n_pred_tokens
    tokens) at the end of an epoch.

    State: each consumer's position is (epoch, index of its next document, tokens of that
    document already yielded). It is written to a small shared-memory table right before a window
    is yielded, so `state_dict()` in the main process sees the workers' progress too, and
    `load_state_dict()` followed by iteration yields exactly the windows not yielded yet (same
    files, seed, world_size and num_workers required). With num_workers > 0, "yielded" means
    produced by a worker: batches the DataLoader prefetched but the trainer did not consume (at
    most prefetch_factor * num_workers) are not repeated after a resume. With num_workers=0 the
    state is exactly what was consumed. A new pass over the dataset continues from the recorded
    position; after a finished epoch it starts the next epoch (files reshuffled). With
    `infinite=True` epochs follow each other in one pass.

    `rank`/`world_size` default to torch.distributed's when it is initialized, else 0/1.

    Example:
        ds = DolmaStreamingDataset(tokenizer=tok, seq_len=2048, n_pred_tokens=4, vocab_size=50257, files=["shard.jsonl"])
        loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)  # batches (8, 2052)
    """

    def __init__(self, tokenizer, seq_len: int = 2048, n_pred_tokens: int = 4, vocab_size: int = 50257,
                 files=None, rank: int | None = None, world_size: int | None = None, seed: int = 0,
                 shuffle_files: bool = True, *, infinite: bool = False, text_field: str = "text",
                 batch_docs: int = 64, max_workers: int = 64):
        if not isinstance(tokenizer, TokenizerWrapper):
            if isinstance(tokenizer, (str, os.PathLike)):
                tokenizer = TokenizerWrapper(tokenizer)
            else:
                raise TypeError(f"tokenizer must be a TokenizerWrapper or a path to tokenizer.json, "
                                f"got {type(tokenizer).__name__}")
        if seq_len < 1 or n_pred_tokens < 0:
            raise ValueError(f"need seq_len >= 1 and n_pred_tokens >= 0, got {seq_len}, {n_pred_tokens}")
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{tokenizer!r} has no eos token (<eos>, </s> or <|endoftext|>) to separate documents")
        if tokenizer.vocab_size > vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but vocab_size={vocab_size}: token ids "
                             f"would be out of range of the model's embedding; raise vocab_size")
        self.files = expand_shards(files)
        if not self.files:
            raise ValueError("DolmaStreamingDataset needs files=[...]: JSONL / JSONL.gz / .txt shards or a "
                             "directory of them (Dolma documents, one {'text': ...} per line). Nexus never "
                             "downloads; `nexus prepare` writes the default corpus to <data_dir>/corpus/")
        self.tokenizer = tokenizer
        self.seq_len, self.n_pred_tokens, self.vocab_size = seq_len, n_pred_tokens, vocab_size
        self.window = seq_len + n_pred_tokens
        self.rank, self.world_size = _resolve_rank(rank, world_size)
        self.seed, self.shuffle_files, self.infinite = seed, shuffle_files, infinite
        self.text_field, self.batch_docs = text_field, batch_docs
        # Shared memory so that worker processes' progress is visible to the main process.
        self._progress = torch.zeros(max_workers, 6, dtype=torch.int64).share_memory_()

    def epoch_files(self, epoch: int) -> list[Path]:
        """The shard order of an epoch (same on every rank and worker)."""
        files = list(self.files)
        if self.shuffle_files:
            random.Random(f"{self.seed}:{epoch}").shuffle(files)
        return files

    def _own_documents(self, epoch, consumer, n_consumers, skip) -> Iterator[tuple[int, str]]:
        """(local index, text) of this consumer's documents of an epoch, from local index `skip` on."""
        j = k = 0
        for path in self.epoch_files(epoch):
            for raw, lineno in _raw_documents(path):
                if j % n_consumers == consumer:
                    if k >= skip:  # skipped documents are counted, never parsed or tokenized
                        yield k, (raw if lineno == 0 else _parse_line(raw, path, lineno, self.text_field))
                    k += 1
                j += 1

    def _windows(self, epoch, consumer, n_consumers, doc, offset, row) -> Iterator[torch.Tensor]:
        eos, enc = self.tokenizer.eos_token_id, self.tokenizer.backend
        segs: deque = deque()  # [local doc index, offset of first remaining token, remaining tokens]
        buffered, next_doc = 0, doc
        docs = self._own_documents(epoch, consumer, n_consumers, doc)
        while True:
            batch = [d for _, d in zip(range(self.batch_docs), docs)]
            if not batch:
                return  # the final partial window (< self.window tokens) is dropped
            for (k, text), e in zip(batch, enc.encode_batch([t for _, t in batch], add_special_tokens=False)):
                ids = np.asarray(e.ids + [eos], dtype=np.int64)
                start = offset if k == doc else 0
                if start > len(ids):
                    raise ValueError(f"resume state points at token {start} of a {len(ids)}-token document: "
                                     f"the shards changed since the state was saved")
                segs.append([k, start, ids[start:]])
                buffered += len(ids) - start
                next_doc = k + 1
            while buffered >= self.window:
                parts, need = [], self.window
                while need:
                    k, s, arr = segs[0]
                    take = min(need, len(arr))
                    parts.append(arr[:take])
                    if take == len(arr):
                        segs.popleft()
                    else:
                        segs[0] = [k, s + take, arr[take:]]
                    need -= take
                buffered -= self.window
                window = np.concatenate(parts)
                if int(window.max()) >= self.vocab_size:
                    raise ValueError(f"token id {int(window.max())} >= vocab_size={self.vocab_size}")
                pos_doc, pos_off = (segs[0][0], segs[0][1]) if segs else (next_doc, 0)
                row[_EPOCH], row[_DOC], row[_OFFSET] = epoch, pos_doc, pos_off
                row[_WINDOWS] += 1
                yield torch.from_numpy(window)

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if n_workers > self._progress.shape[0]:
            raise ValueError(f"num_workers={n_workers} exceeds max_workers={self._progress.shape[0]}")
        row = self._progress[worker]
        if int(row[_VALID]) and int(row[_NUM_WORKERS]) != n_workers:
            raise ValueError(f"the dataset's state was recorded with num_workers={int(row[_NUM_WORKERS])} but it "
                             f"is now iterated with {n_workers}; resume with the same num_workers")
        if not int(row[_VALID]):
            row[_VALID], row[_NUM_WORKERS], row[_EPOCH], row[_DOC], row[_OFFSET], row[_WINDOWS] = 1, n_workers, 0, 0, 0, 0
        consumer, n_consumers = self.rank * n_workers + worker, self.world_size * n_workers
        while True:
            epoch = int(row[_EPOCH])
            yield from self._windows(epoch, consumer, n_consumers, int(row[_DOC]), int(row[_OFFSET]), row)
            row[_EPOCH], row[_DOC], row[_OFFSET] = epoch + 1, 0, 0
            if not self.infinite:
                return

    def state_dict(self) -> dict:
        """Position of every consumer of this rank; plain ints, safe for torch.save / JSON.

        Example:
            state = ds.state_dict(); ds2.load_state_dict(state)  # ds2 resumes where ds stopped
        """
        rows = [r.tolist() for r in self._progress if int(r[_VALID])]
        return {"version": 1, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "files": [str(f) for f in self.files], "num_workers": rows[0][_NUM_WORKERS] if rows else None,
                "positions": [{"epoch": r[_EPOCH], "doc": r[_DOC], "offset": r[_OFFSET], "windows": r[_WINDOWS]}
                              for r in rows]}

    def load_state_dict(self, state: dict) -> None:
        """Set the position the next iteration starts from (see the class docstring)."""
        for key, mine in (("seed", self.seed), ("rank", self.rank), ("world_size", self.world_size),
                          ("files", [str(f) for f in self.files])):
            if state.get(key) != mine:
                raise ValueError(f"state was saved with {key}={state.get(key)!r} but this dataset has {mine!r}")
        positions = state["positions"]
        if len(positions) > self._progress.shape[0]:
            raise ValueError(f"state has {len(positions)} workers, more than max_workers={self._progress.shape[0]}")
        self._progress.zero_()
        for i, p in enumerate(positions):
            self._progress[i] = torch.tensor([1, state["num_workers"], p["epoch"], p["doc"], p["offset"], p["windows"]])


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size > 2**32:
        raise ValueError(f"vocab_size={vocab_size} does not fit uint32")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _header_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def write_token_file(path, tokens, vocab_size: int) -> int:
    """Write token ids as a flat uint16/uint32 file plus a JSON sidecar `<path>.json`; returns the count.

    `tokens` is an int array/tensor/list, or an iterable of such chunks (streamed to disk).

    Example:
        n = write_token_file("data/tiny/train.bin", [ids_doc1, ids_doc2], vocab_size=4096)
        ds = DolmaMemoryMappedDataset("data/tiny/train.bin", seq_len=256)
    """
    path = Path(path)
    dtype = token_dtype(vocab_size)
    if isinstance(tokens, (np.ndarray, torch.Tensor)) or (isinstance(tokens, (list, tuple)) and tokens
                                                         and isinstance(tokens[0], (int, np.integer))):
        tokens = [tokens]
    path.parent.mkdir(parents=True, exist_ok=True)
    _header_path(path).unlink(missing_ok=True)  # an interrupted write must not look complete
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")  # unique per process: ranks may write at once
    n = 0
    with open(tmp, "wb") as f:
        for chunk in tokens:
            arr = chunk.cpu().numpy() if isinstance(chunk, torch.Tensor) else np.asarray(chunk)
            if arr.size == 0:
                continue
            if arr.dtype.kind not in "iu":
                raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= vocab_size:
                raise ValueError(f"token id {lo if lo < 0 else hi} is outside [0, {vocab_size}) writing {path}")
            f.write(arr.astype(dtype, copy=False).reshape(-1).tobytes())
            n += arr.size
    os.replace(tmp, path)
    header = {"format": _TOKEN_FORMAT, "version": _TOKEN_VERSION, "dtype": dtype.name,
              "vocab_size": int(vocab_size), "n_tokens": n}
    _header_path(path).write_text(json.dumps(header, sort_keys=True) + "\n")
    return n


def read_token_header(path) -> dict:
    """The validated sidecar header of a token file: {"dtype", "vocab_size", "n_tokens", ...}.

    Example:
        read_token_header("data/tiny/train.bin")["n_tokens"]
    """
    path = Path(path)
    hpath = _header_path(path)
    if not path.is_file():
        raise DataFileNotFoundError(f"token file {path} does not exist (run `nexus prepare` to create it)")
    try:
        header = json.loads(hpath.read_text())
    except FileNotFoundError:
        raise DataFileNotFoundError(f"token file {path} has no header {hpath} "
                                    f"(incomplete write? rerun prepare)") from None
    except ValueError as e:
        raise DataError(f"header {hpath} of token file {path} is not valid JSON: {e}") from None
    try:
        ok = (header["format"] == _TOKEN_FORMAT and header["version"] == _TOKEN_VERSION
              and isinstance(header["n_tokens"], int) and header["n_tokens"] >= 0
              and isinstance(header["vocab_size"], int) and header["vocab_size"] > 0
              and header["dtype"] == token_dtype(header["vocab_size"]).name)
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise DataError(f"header {hpath} of token file {path} is corrupt or not a {_TOKEN_FORMAT} v{_TOKEN_VERSION} "
                         f"header: {header!r}")
    expected = header["n_tokens"] * np.dtype(header["dtype"]).itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise DataError(f"token file {path} has {actual} bytes but its header says {header['n_tokens']} "
                         f"{header['dtype']} tokens ({expected} bytes): truncated or mismatched")
    return header


class DolmaMemoryMappedDataset(Dataset):
    """Windows of a pre-tokenized token file (see `write_token_file`), read through numpy.memmap.

    Item i is a LongTensor of shape (seq_len + n_pred_tokens,) holding tokens
    [i * stride, i * stride + seq_len + n_pred_tokens); stride defaults to seq_len, so windows
    overlap by n_pred_tokens and every token is a target once. A file shorter than one window
    raises `DataError` naming it and both sizes. Files are opened lazily per process, so the
    dataset pickles cheaply into dataloader workers.

    Example:
        ds = DolmaMemoryMappedDataset("data/tiny/train.bin", seq_len=256, n_pred_tokens=4)
        x = ds[0]  # shape (260,), int64
    """

    def __init__(self, path, seq_len: int, n_pred_tokens: int = 1, *, stride: int | None = None):
        if seq_len < 1 or n_pred_tokens < 0:
            raise ValueError(f"need seq_len >= 1 and n_pred_tokens >= 0, got {seq_len}, {n_pred_tokens}")
        stride = seq_len if stride is None else stride
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.path = Path(path)
        header = read_token_header(self.path)
        self.dtype = np.dtype(header["dtype"])
        self.vocab_size, self.n_tokens = header["vocab_size"], header["n_tokens"]
        self.seq_len, self.n_pred_tokens, self.stride = seq_len, n_pred_tokens, stride
        self.window = seq_len + n_pred_tokens
        if self.n_tokens < self.window:  # a dataset with no window would fail later with no file named
            raise DataError(f"token file {self.path} holds {self.n_tokens} tokens, fewer than one window of "
                            f"seq_len + n_pred_tokens = {seq_len} + {n_pred_tokens} = {self.window}: "
                            f"give it more text or use a shorter seq_len")
        self._len = (self.n_tokens - self.window) // stride + 1
        self._mm = None

    @property
    def tokens(self) -> np.ndarray:
        """The whole token file as a read-only numpy memmap of shape (n_tokens,)."""
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
        return self._mm

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_mm"] = None  # each process maps the file itself
        return state

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i) -> torch.Tensor:
        i = int(i)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"index out of range for {self._len} windows of {self.path}")
        start = i * self.stride
        window = np.array(self.tokens[start:start + self.window], dtype=np.int64)
        if int(window.max()) >= self.vocab_size:
            raise DataError(f"{self.path}: token id {int(window.max())} >= vocab_size={self.vocab_size} "
                             f"in window {i} (corrupt file)")
        return torch.from_numpy(window)

    def __repr__(self) -> str:
        return (f"DolmaMemoryMappedDataset({str(self.path)!r}, seq_len={self.seq_len}, "
                f"n_pred_tokens={self.n_pred_tokens}, stride={self.stride}, windows={self._len})")
