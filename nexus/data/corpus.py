"""The default training corpus: the running Python's standard library, as Dolma-style JSONL shards.

Every machine that runs Nexus has this text, so `nexus prepare` and `make train` never download
anything. Documents are whole `.py` files; the train/validation split is decided per document
from a hash of its relative path, so it is deterministic and does not depend on file order.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from .errors import DataFileNotFoundError

__all__ = ["CorpusFiles", "build_default_corpus", "stdlib_documents"]

# Bump when the on-disk layout or the selection rule changes, so old corpora are rebuilt.
_FORMAT_VERSION = 1
_MANIFEST = "manifest.json"
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class CorpusFiles:
    """Paths of the JSONL shards of a corpus, in reading order.

    Example:
        files = build_default_corpus("data/tiny/corpus", max_bytes=1_000_000)
        print(files.train[0], files.val[0])
    """

    train: list[Path]
    val: list[Path]


def _doc_key(rel: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{rel}".encode()).hexdigest()


def _stdlib_files() -> list[tuple[str, Path, int]]:
    """(relative path, path, size) of every standard-library `.py` file outside site-packages, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataFileNotFoundError(f"standard library directory {root} does not exist")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Sort in place so os.walk descends in a deterministic order.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path, path.stat().st_size))
    return sorted(found)


def _read_text(path: Path) -> str | None:
    try:
        text = path.read_bytes().decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # a few test fixtures are deliberately not UTF-8
    return text if text.strip() else None


def stdlib_documents() -> list[tuple[str, str]]:
    """All `.py` files of the running Python's standard library as `(relative_path, text)`.

    site-packages and files that are not valid UTF-8 are skipped; order is sorted by path.

    Example:
        docs = stdlib_documents()
        print(len(docs), docs[0][0])
    """
    docs = [(rel, _read_text(path)) for rel, path, _ in _stdlib_files()]
    return [(rel, text) for rel, text in docs if text is not None]


def _select(max_bytes, seed):
    """Pick files in hash order until max_bytes (UTF-8, = file size) is reached: a spread-out sample."""
    files = _stdlib_files()
    if max_bytes is not None:
        files = sorted(files, key=lambda d: _doc_key(d[0], seed))
    chosen, total = [], 0
    for rel, path, size in files:
        if max_bytes is not None and total + size > max_bytes:
            continue
        text = _read_text(path)
        if text is not None:
            # Decoding then encoding valid UTF-8 gives the same bytes, so size is the text's UTF-8 length.
            chosen.append((rel, text, size))
            total += size
    if not chosen:
        raise ValueError(f"max_bytes={max_bytes} is smaller than every standard-library file; "
                         f"use at least {min(s for _, _, s in files if s > 0)}")
    return sorted(chosen, key=lambda d: d[0])


def _split(sized, val_fraction, seed):
    """Documents with the smallest hash go to validation until it holds val_fraction of the bytes.

    Documents much larger than the target are passed over, so a small corpus still gets a
    validation set near the requested size instead of one huge file; both sides stay non-empty.
    """
    total = sum(s for _, _, s in sized)
    target = val_fraction * total
    val_names: set[str] = set()
    val_bytes = 0
    for rel, _, size in sorted(sized, key=lambda d: _doc_key(d[0], seed)):
        if val_bytes >= target:
            break
        if val_bytes + size <= 2 * target:
            val_names.add(rel)
            val_bytes += size
    if not val_names:  # every document is bigger than twice the target: take the smallest
        val_names.add(min(sized, key=lambda d: (d[2], d[0]))[0])
    train = [d for d in sized if d[0] not in val_names]
    val = [d for d in sized if d[0] in val_names]
    if not train:
        raise ValueError(f"corpus of {len(sized)} documents is too small to split into train and "
                         f"validation; raise max_bytes")
    return train, val


def _shard_lines(docs, shard_bytes):
    shards, cur, cur_bytes = [], [], 0
    for rel, text, _ in docs:
        line = json.dumps({"id": rel, "source": "python-stdlib", "text": text},
                          ensure_ascii=False, sort_keys=True) + "\n"
        n = len(line.encode("utf-8"))
        if cur and cur_bytes + n > shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(line)
        cur_bytes += n
    if cur:
        shards.append(cur)
    return shards


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _existing(out_dir: Path, params: dict) -> CorpusFiles | None:
    """The corpus already in out_dir if its manifest matches params and every shard is intact."""
    try:
        manifest = json.loads((out_dir / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("params") != params:
        return None
    for entry in manifest["files"]:
        path = out_dir / entry["name"]
        if not path.is_file() or path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            return None
    return CorpusFiles(train=[out_dir / e["name"] for e in manifest["files"] if e["split"] == "train"],
                       val=[out_dir / e["name"] for e in manifest["files"] if e["split"] == "val"])


def build_default_corpus(out_dir, *, max_bytes: int | None = None, val_fraction: float = 0.02,
                         shard_bytes: int = 16 * 2**20, seed: int = 0) -> CorpusFiles:
    """Write the standard library's `.py` files as train/validation JSONL shards in `out_dir`.

    Each line is a Dolma document `{"id", "source", "text"}`. `max_bytes` caps the UTF-8 text
    taken (a hash-ordered sample of whole files); `val_fraction` of the bytes go to validation.
    Rebuilding with the same arguments gives identical bytes and is skipped when `manifest.json`
    and the shards already match.

    Example:
        files = build_default_corpus("data/tiny/corpus", max_bytes=8_000_000)
        tok = train_bpe_tokenizer(files.train, 4096, "data/tiny/tokenizer.json")
    """
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes <= 0):
        raise ValueError(f"max_bytes must be a positive int or None, got {max_bytes!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes must be positive, got {shard_bytes!r}")
    out_dir = Path(out_dir)
    params = {"format": _FORMAT_VERSION, "python": sys.version, "stdlib": sysconfig.get_paths()["stdlib"],
              "max_bytes": max_bytes, "val_fraction": val_fraction, "shard_bytes": shard_bytes, "seed": seed}
    found = _existing(out_dir, params)
    if found is not None:
        return found

    train, val = _split(_select(max_bytes, seed), val_fraction, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / _MANIFEST).unlink(missing_ok=True)  # an interrupted build must not look complete
    for old in list(out_dir.glob("train_*.jsonl")) + list(out_dir.glob("val_*.jsonl")):
        old.unlink()
    entries = []
    for split, docs in (("train", train), ("val", val)):
        for i, lines in enumerate(_shard_lines(docs, shard_bytes)):
            path = out_dir / f"{split}_{i:05d}.jsonl"
            data = "".join(lines).encode("utf-8")
            path.write_bytes(data)
            entries.append({"name": path.name, "split": split, "documents": len(lines),
                            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"params": params, "files": entries}
    tmp = out_dir / f"{_MANIFEST}.tmp-{os.getpid()}"  # unique per process: ranks may write at once
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    tmp.replace(out_dir / _MANIFEST)
    return CorpusFiles(train=[out_dir / e["name"] for e in entries if e["split"] == "train"],
                       val=[out_dir / e["name"] for e in entries if e["split"] == "val"])
