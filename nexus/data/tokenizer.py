"""A thin wrapper over a local Hugging Face `tokenizers.Tokenizer`, and a local byte-level BPE trainer.

Nothing here downloads: a tokenizer is a `tokenizer.json` on disk, either trained with
`train_bpe_tokenizer` (what `nexus prepare` does) or copied there by the user.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .errors import DataError, DataFileNotFoundError

__all__ = ["TokenizerWrapper", "train_bpe_tokenizer", "iter_documents", "expand_shards"]

_SHARD_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".txt", ".txt.gz")

DEFAULT_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
# Names used by common tokenizers for each role, tried in order when a tokenizer.json is loaded.
_ROLE_NAMES = {
    "eos": ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "[SEP]"),
    "bos": ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]"),
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>"),
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
}


def _resolve_tokenizer_file(name_or_path) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        return path
    raise DataFileNotFoundError(
        f"no tokenizer at {str(name_or_path)!r}: Nexus loads only a local tokenizer.json (a file, or a "
        f"directory holding one) and never downloads (so hub names like 'gpt2' are not fetched). "
        f"Train one locally with `nexus prepare --config configs/tiny.yaml` or "
        f"`nexus.data.train_bpe_tokenizer(files, vocab_size, 'data/tokenizer.json')`, or copy an "
        f"existing tokenizer.json there and pass its path.")


class TokenizerWrapper:
    """Encode/decode text with a local `tokenizer.json`; knows its pad/eos/bos ids.

    `name_or_path` is a `tokenizer.json` file, a directory holding one, or a `tokenizers.Tokenizer`.
    `max_length` is the default length for truncation and `padding="max_length"`.
    `encode` gives a list of int ids, or a LongTensor of shape (1, n) with `return_tensors="pt"`.

    Example:
        tok = TokenizerWrapper("data/tiny/tokenizer.json")
        ids = tok.encode("def f(x): return x", return_tensors="pt"); text = tok.decode(ids[0])
    """

    def __init__(self, name_or_path, *, max_length: int | None = None):
        if isinstance(name_or_path, Tokenizer):
            self._tok, self.path = name_or_path, None
        else:
            self.path = _resolve_tokenizer_file(name_or_path)
            try:
                self._tok = Tokenizer.from_file(str(self.path))
            except Exception as e:  # the Rust error says what is wrong inside the file
                raise DataError(f"{self.path} is not a valid tokenizer.json: {e}") from e
        if max_length is not None and max_length <= 0:
            raise ValueError(f"max_length must be positive or None, got {max_length!r}")
        self.max_length = max_length
        ids = {role: self._find(names) for role, names in _ROLE_NAMES.items()}
        self.eos_token_id: int | None = ids["eos"]
        self.bos_token_id: int | None = ids["bos"] if ids["bos"] is not None else ids["eos"]
        # GPT-2 style tokenizers have no pad token: pad with eos, masked out by attention_mask.
        self.pad_token_id: int | None = ids["pad"] if ids["pad"] is not None else ids["eos"]
        self.unk_token_id: int | None = ids["unk"]

    def _find(self, names) -> int | None:
        for name in names:
            i = self._tok.token_to_id(name)
            if i is not None:
                return i
        return None

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (every id is < vocab_size)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def backend(self) -> Tokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok

    def __repr__(self) -> str:
        return f"TokenizerWrapper({str(self.path) if self.path else '<in memory>'!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str, return_tensors: str | None = None, *, add_special_tokens: bool = False,
               truncation: bool = False, max_length: int | None = None):
        """Token ids of `text`: list[int], or LongTensor (1, n) with `return_tensors="pt"`.

        Example:
            ids = tok.encode("hello")            # [..]
            t = tok.encode("hello", return_tensors="pt")  # shape (1, n)
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}; use encode_batch for lists")
        _check_return_tensors(return_tensors)
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if truncation:
            ids = ids[: self._length(max_length, "truncation=True")]
        if return_tensors == "pt":
            return torch.tensor([ids], dtype=torch.long)
        return ids

    def _length(self, max_length, why) -> int:
        n = max_length if max_length is not None else self.max_length
        if n is None:
            raise ValueError(f"{why} needs max_length (pass it, or TokenizerWrapper(..., max_length=N))")
        if n <= 0:
            raise ValueError(f"max_length must be positive, got {n}")
        return n

    def encode_batch(self, texts: Sequence[str], padding=False, truncation: bool = False,
                     max_length: int | None = None, return_tensors: str | None = None, *,
                     add_special_tokens: bool = False) -> dict:
        """Encode many texts at once (parallel in Rust).

        `padding`: False, True/"longest" (to the longest in the batch) or "max_length".
        Returns {"input_ids", "attention_mask"}: lists of lists, or LongTensors of shape (B, L)
        with `return_tensors="pt"` (which needs equal lengths, i.e. padding).

        Example:
            b = tok.encode_batch(["a = 1", "b"], padding=True, return_tensors="pt")
            b["input_ids"].shape  # (2, L)
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a list of str, got a single str; use encode")
        _check_return_tensors(return_tensors)
        if padding not in (False, True, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
        encs = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        ids = [e.ids for e in encs]
        if truncation:
            n = self._length(max_length, "truncation=True")
            ids = [x[:n] for x in ids]
        mask = [[1] * len(x) for x in ids]
        if padding in (True, "longest", "max_length"):
            if padding == "max_length":
                width = self._length(max_length, "padding='max_length'")
                if any(len(x) > width for x in ids):
                    raise ValueError(f"a text has more than max_length={width} tokens; pass truncation=True")
            else:
                width = max((len(x) for x in ids), default=0)
            if self.pad_token_id is None:
                raise ValueError("padding needs a pad token, and this tokenizer has neither <pad> nor an eos token")
            mask = [m + [0] * (width - len(x)) for x, m in zip(ids, mask)]
            ids = [x + [self.pad_token_id] * (width - len(x)) for x in ids]
        if return_tensors == "pt":
            if len({len(x) for x in ids}) > 1:
                raise ValueError("return_tensors='pt' needs equal lengths: pass padding=True")
            width = len(ids[0]) if ids else 0
            return {"input_ids": torch.tensor(ids, dtype=torch.long).reshape(len(ids), width),
                    "attention_mask": torch.tensor(mask, dtype=torch.long).reshape(len(ids), width)}
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of a 1-D id sequence (list, tuple, or tensor of shape (n,) or (1, n)).

        Example:
            tok.decode(tok.encode("x = 1"))  # "x = 1"
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() == 2 and ids.shape[0] == 1:
                ids = ids[0]
            if ids.dim() != 1:
                raise ValueError(f"decode expects one sequence, got a tensor of shape {tuple(ids.shape)}; "
                                 f"use decode_batch")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch, skip_special_tokens: bool = False) -> list[str]:
        """Texts of a batch of id sequences (list of lists, or a (B, n) tensor)."""
        return [self.decode(x, skip_special_tokens=skip_special_tokens) for x in batch]

    def save(self, path) -> Path:
        """Write tokenizer.json to `path` (a file, or a directory to hold tokenizer.json)."""
        path = _out_file(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")  # unique per process
        self._tok.save(str(tmp))
        os.replace(tmp, path)
        return path


def _check_return_tensors(rt):
    if rt not in (None, "pt"):
        raise ValueError(f"return_tensors must be None or 'pt', got {rt!r}")


def _out_file(path) -> Path:
    path = Path(path)
    return path / "tokenizer.json" if path.suffix != ".json" else path


def expand_shards(files) -> list[Path]:
    """Shard paths from a path or list of paths; a directory stands for its shards, sorted.

    A missing path, or a directory without shards, raises `DataFileNotFoundError` naming it.

    Example:
        expand_shards("data/tiny/corpus")  # [.../train_00000.jsonl, .../val_00000.jsonl]
    """
    if files is None:
        return []
    items = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.name.lower().endswith(_SHARD_SUFFIXES))
            if not found:
                raise DataFileNotFoundError(f"shard directory {p} holds no shards "
                                            f"({', '.join(_SHARD_SUFFIXES)})")
            out.extend(found)
        elif p.is_file():
            if not p.name.lower().endswith(_SHARD_SUFFIXES):
                raise DataError(f"{p}: unsupported shard type; expected one of {', '.join(_SHARD_SUFFIXES)}")
            out.append(p)
        elif p.name.lower().endswith(_SHARD_SUFFIXES):
            raise DataFileNotFoundError(f"shard {p} does not exist")
        else:
            raise DataFileNotFoundError(f"shard directory {p} does not exist")
    return out


def iter_documents(path, text_field: str = "text") -> Iterator[str]:
    """Texts of one shard: JSONL (`.jsonl`, `.json`, optionally `.gz`), one document per line; `.txt`: the file.

    A file that is not UTF-8, or a damaged gzip stream, raises `DataError` naming the file.

    Example:
        for text in iter_documents("data/tiny/corpus/train_00000.jsonl"):
            print(len(text))
    """
    path = Path(path)
    name = path.name.lower()
    if not name.endswith((".txt", ".txt.gz", ".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        raise DataError(f"{path}: unsupported shard type; expected .jsonl, .jsonl.gz, .json.gz or .txt")
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if name.endswith((".txt", ".txt.gz")):
                yield f.read()
                return
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield _parse_line(line, path, lineno, text_field)
    except FileNotFoundError:
        raise DataFileNotFoundError(f"shard {path} does not exist") from None
    # A truncated gzip ends in EOFError, a non-gzip file in BadGzipFile (an OSError).
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read it as {'gzip-compressed ' if opener is gzip.open else ''}"
                        f"UTF-8 text: {e}") from e


def _parse_line(line: str, path, lineno: int, text_field: str) -> str:
    try:
        doc = json.loads(line)
    except ValueError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get(text_field), str):
        raise DataError(f"{path}:{lineno}: expected a JSON object with a string {text_field!r} field")
    return doc[text_field]


def train_bpe_tokenizer(files: Iterable, vocab_size: int, out_path, *,
                        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
                        min_frequency: int = 2, max_bytes: int | None = None) -> TokenizerWrapper:
    """Train a byte-level BPE tokenizer on local JSONL/text shards and save it as tokenizer.json.

    Byte-level means every string round-trips: `decode(encode(s)) == s`. `vocab_size` counts the
    256 byte tokens and the special tokens (ids 0..len(special_tokens)-1, in the order given);
    a small corpus may give fewer merges, hence a smaller vocabulary. `max_bytes` caps the text
    read for training (counted in characters; whole documents, in order).

    Example:
        tok = train_bpe_tokenizer(["data/tiny/corpus/train_00000.jsonl"], 4096, "data/tiny/tokenizer.json")
        tok.decode(tok.encode("print('hé')"))  # "print('hé')"
    """
    special_tokens = list(special_tokens)
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special_tokens has duplicates: {special_tokens}")
    floor = 256 + len(special_tokens)
    if not isinstance(vocab_size, int) or vocab_size <= floor:
        raise ValueError(f"vocab_size must be an int > {floor} (256 bytes + {len(special_tokens)} special tokens), "
                         f"got {vocab_size!r}")
    files = expand_shards(files)
    if not files:
        raise ValueError("train_bpe_tokenizer needs at least one file")

    def texts():
        budget = max_bytes
        for f in files:
            for text in iter_documents(f):
                yield text
                if budget is not None:
                    budget -= len(text)
                    if budget <= 0:
                        return

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(), trainer=trainer)
    wrapper = TokenizerWrapper(tok)
    wrapper.path = wrapper.save(out_path)
    return wrapper
