import json
import sysconfig
from pathlib import Path

import pytest

from nexus.data import build_default_corpus, iter_documents, stdlib_documents


def _read_all(files):
    return [Path(f).read_bytes() for f in files]


def _ids(files):
    return [json.loads(line)["id"] for f in files for line in Path(f).read_text().splitlines()]


def test_two_builds_are_byte_identical(small_corpus, small_corpus_bytes, tmp_path):
    again = build_default_corpus(tmp_path, max_bytes=small_corpus_bytes, shard_bytes=60_000)
    assert [f.name for f in again.train] == [f.name for f in small_corpus.train]
    assert _read_all(again.train) == _read_all(small_corpus.train)
    assert _read_all(again.val) == _read_all(small_corpus.val)
    assert (tmp_path / "manifest.json").read_bytes() == (small_corpus.train[0].parent / "manifest.json").read_bytes()


def test_split_is_disjoint_nonempty_and_within_budget(small_corpus, small_corpus_bytes):
    train_ids, val_ids = _ids(small_corpus.train), _ids(small_corpus.val)
    assert train_ids and val_ids
    assert not set(train_ids) & set(val_ids)
    assert len(set(train_ids)) == len(train_ids)
    assert not any("site-packages" in i for i in train_ids + val_ids)
    assert all(i.endswith(".py") for i in train_ids + val_ids)
    text_bytes = lambda fs: sum(len(t.encode()) for f in fs for t in iter_documents(f))  # noqa: E731
    train_b, val_b = text_bytes(small_corpus.train), text_bytes(small_corpus.val)
    assert train_b + val_b <= small_corpus_bytes
    # val gets its share (2%) of the bytes, and not more than twice that, even on a small corpus
    assert 0.02 * (train_b + val_b) <= val_b <= 0.04 * (train_b + val_b)


def test_documents_are_the_stdlib_files(small_corpus):
    root = Path(sysconfig.get_paths()["stdlib"])
    line = json.loads(small_corpus.train[0].read_text().splitlines()[0])
    assert line["text"] == (root / line["id"]).read_text(encoding="utf-8")
    assert len(small_corpus.train) > 1  # shard_bytes=60 kB splits a 300 kB corpus


def test_rebuild_is_skipped_when_manifest_matches(tmp_path):
    files = build_default_corpus(tmp_path, max_bytes=50_000)
    mtimes = [f.stat().st_mtime_ns for f in files.train + files.val]
    again = build_default_corpus(tmp_path, max_bytes=50_000)
    assert again == files
    assert [f.stat().st_mtime_ns for f in again.train + again.val] == mtimes


def test_damaged_shard_is_rebuilt(tmp_path):
    files = build_default_corpus(tmp_path, max_bytes=50_000)
    good = files.train[0].read_bytes()
    files.train[0].write_bytes(good[:-10])
    again = build_default_corpus(tmp_path, max_bytes=50_000)
    assert again.train[0].read_bytes() == good


def test_different_seed_gives_different_sample(tmp_path):
    a = build_default_corpus(tmp_path / "a", max_bytes=50_000, seed=0)
    b = build_default_corpus(tmp_path / "b", max_bytes=50_000, seed=1)
    assert set(_ids(a.train + a.val)) != set(_ids(b.train + b.val))


def test_stdlib_documents_sorted_and_complete():
    docs = stdlib_documents()
    names = [d[0] for d in docs]
    assert names == sorted(names)
    assert "os.py" in names and "json/__init__.py" in names


@pytest.mark.parametrize("kwargs, match", [
    ({"max_bytes": 0}, "max_bytes"),
    ({"max_bytes": 10}, "smaller than every"),
    ({"val_fraction": 1.5}, "val_fraction"),
    ({"shard_bytes": 0}, "shard_bytes"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_default_corpus(tmp_path, **kwargs)
