import gzip
import itertools
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from nexus.data import (DataError, DataFileNotFoundError, DolmaMemoryMappedDataset, DolmaStreamingDataset,
                        expand_shards, iter_documents, read_token_header, stdlib_documents, token_dtype,
                        write_token_file)

SEQ, PRED = 96, 3
WINDOW = SEQ + PRED


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """40 small stdlib files (some shorter than a window) in shards of every supported kind."""
    docs = [t for _, t in stdlib_documents() if 20 < len(t) < 2500][:40]
    out = tmp_path_factory.mktemp("shards")
    (out / "a.txt").write_text(docs[0])
    with gzip.open(out / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[1:15])
    (out / "c.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n\n" for i, d in enumerate(docs[15:30])))
    (out / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[30:]))
    return sorted(out.iterdir())


def _stream(tok, files, **kw):
    kw.setdefault("vocab_size", tok.vocab_size)
    return DolmaStreamingDataset(tok, seq_len=SEQ, n_pred_tokens=PRED, files=files, **kw)


def _doc_tokens(tok, ds, epoch=0):
    """Plain token stream, one array per document (ids + eos), in the dataset's reading order."""
    docs = [t for f in ds.epoch_files(epoch) for t in iter_documents(f)]
    return [np.array(tok.encode(t) + [tok.eos_token_id]) for t in docs]


def _windows(ds):
    return [w.numpy() for w in ds]


def _interleave(seqs):
    """The order an in-order DataLoader (batch_size=None) returns its workers' items."""
    out = []
    for group in itertools.zip_longest(*seqs):
        out.extend(x for x in group if x is not None)
    return out


def test_single_consumer_packs_the_plain_stream(small_tokenizer, shards):
    ds = _stream(small_tokenizer, shards)
    stream = np.concatenate(_doc_tokens(small_tokenizer, ds))
    windows = _windows(ds)
    assert all(w.shape == (WINDOW,) and w.dtype == np.int64 for w in windows)
    assert len(windows) == len(stream) // WINDOW
    np.testing.assert_array_equal(np.concatenate(windows), stream[: len(windows) * WINDOW])


def test_two_ranks_two_workers_lose_and_duplicate_nothing(small_tokenizer, shards):
    tok = small_tokenizer
    docs = _doc_tokens(tok, _stream(tok, shards))
    consumers = 4  # consumer = rank * num_workers + worker
    expected = []
    for c in range(consumers):
        own = np.concatenate(docs[c::consumers])
        n = len(own) // WINDOW
        assert len(own) - n * WINDOW < WINDOW  # only a final partial window is dropped
        expected.append(list(own[: n * WINDOW].reshape(n, WINDOW)))
    got_all = []
    for rank in range(2):
        ds = _stream(tok, shards, rank=rank, world_size=2)
        got = [w.numpy() for w in DataLoader(ds, batch_size=None, num_workers=2)]
        want = _interleave([expected[rank * 2], expected[rank * 2 + 1]])
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        got_all.extend(got)
    # the union: every token of the plain stream, apart from <1 window per consumer, exactly once
    total = sum(len(d) for d in docs)
    assert total - consumers * WINDOW < len(got_all) * WINDOW <= total
    got_counts = np.bincount(np.concatenate(got_all), minlength=tok.vocab_size)
    all_counts = np.bincount(np.concatenate(docs), minlength=tok.vocab_size)
    assert (got_counts <= all_counts).all()


def test_rank_and_world_size_equal_worker_split(small_tokenizer, shards):
    # one process as consumer c of 4 sees exactly what the DataLoader worker would
    tok = small_tokenizer
    direct = _windows(_stream(tok, shards, rank=3, world_size=4))
    docs = _doc_tokens(tok, _stream(tok, shards))
    own = np.concatenate(docs[3::4])
    np.testing.assert_array_equal(np.concatenate(direct), own[: len(direct) * WINDOW])


def test_state_restore_resumes_exactly(small_tokenizer, shards):
    tok = small_tokenizer
    full = _windows(_stream(tok, shards))
    ds = _stream(tok, shards)
    it = iter(ds)
    head = [next(it).numpy() for _ in range(7)]
    state = json.loads(json.dumps(ds.state_dict()))  # must survive serialisation
    assert state["positions"][0]["windows"] == 7
    resumed = _stream(tok, shards)
    resumed.load_state_dict(state)
    rest = _windows(resumed)
    assert len(head) + len(rest) == len(full)
    for a, b in zip(head + rest, full):
        np.testing.assert_array_equal(a, b)


def test_state_restore_across_epochs_when_infinite(small_tokenizer, shards):
    tok = small_tokenizer
    n_epoch = len(_windows(_stream(tok, shards)))
    ref = [w.numpy() for w in itertools.islice(_stream(tok, shards, infinite=True), n_epoch + 12)]
    ds = _stream(tok, shards, infinite=True)
    it = iter(ds)
    for _ in range(n_epoch + 5):
        next(it)
    state = ds.state_dict()
    assert state["positions"][0]["epoch"] == 1
    resumed = _stream(tok, shards, infinite=True)
    resumed.load_state_dict(state)
    for a, b in zip(itertools.islice(resumed, 7), ref[n_epoch + 5:]):
        np.testing.assert_array_equal(a.numpy(), b)
    # epoch 1 reads the files in another order
    assert _stream(tok, shards).epoch_files(1) != _stream(tok, shards).epoch_files(0)


def test_state_with_workers_skips_nothing_and_repeats_nothing(small_tokenizer, shards):
    tok = small_tokenizer
    per_worker = [_windows(_stream(tok, shards, rank=w, world_size=2)) for w in range(2)]
    ds = _stream(tok, shards)
    it = iter(DataLoader(ds, batch_size=None, num_workers=2))
    consumed = [next(it).numpy() for _ in range(5)]
    del it  # shuts the workers down, so the state below is final
    state = ds.state_dict()
    assert state["num_workers"] == 2
    produced = [p["windows"] for p in state["positions"]]
    assert sum(produced) >= 5  # workers may have prefetched more than was consumed
    for g, w in zip(consumed, _interleave(per_worker)):
        np.testing.assert_array_equal(g, w)
    resumed = _stream(tok, shards)
    resumed.load_state_dict(state)
    rest = [w.numpy() for w in DataLoader(resumed, batch_size=None, num_workers=2)]
    want = _interleave([per_worker[w][produced[w]:] for w in range(2)])
    assert len(rest) == len(want)
    for g, w in zip(rest, want):
        np.testing.assert_array_equal(g, w)
    with pytest.raises(ValueError, match="num_workers=2"):
        next(iter(resumed))  # resuming a 2-worker state in one process would repeat or skip


def test_second_pass_continues_with_next_epoch(small_tokenizer, shards):
    ds = _stream(small_tokenizer, shards)
    first, second = _windows(ds), _windows(ds)
    assert len(first) > 0 and len(second) > 0
    assert ds.state_dict()["positions"][0]["epoch"] == 2
    assert not all(np.array_equal(a, b) for a, b in zip(first, second))


def test_streaming_errors(small_tokenizer, shards, tmp_path):
    with pytest.raises(ValueError, match="needs files="):
        DolmaStreamingDataset(tokenizer=small_tokenizer, seq_len=2048, n_pred_tokens=4, vocab_size=50257)
    with pytest.raises(ValueError, match="vocab_size=100"):
        DolmaStreamingDataset(small_tokenizer, 16, 1, vocab_size=100, files=shards)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        _stream(small_tokenizer, [tmp_path / "nope.jsonl"])
    with pytest.raises(ValueError, match="rank"):
        _stream(small_tokenizer, shards, rank=2, world_size=2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        _windows(_stream(small_tokenizer, [bad]))
    other = _stream(small_tokenizer, shards, seed=1)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(_stream(small_tokenizer, shards).state_dict())


def test_seed_example_signature_with_files(small_tokenizer, shards):
    ds = DolmaStreamingDataset(tokenizer=small_tokenizer, seq_len=2048, n_pred_tokens=4, vocab_size=50257,
                               files=shards[0].parent)
    first = next(iter(ds))
    assert first.shape == (2052,) and first.dtype == torch.long


# ---- memory-mapped token files ------------------------------------------------------------------

@pytest.mark.parametrize("vocab, dtype", [(1000, np.uint16), (65536, np.uint16), (65537, np.uint32), (200_000, np.uint32)])
def test_dtype_choice_and_file_size(tmp_path, vocab, dtype):
    assert token_dtype(vocab) == dtype
    tokens = np.random.default_rng(0).integers(0, vocab, size=1001)
    path = tmp_path / "t.bin"
    assert write_token_file(path, tokens, vocab) == 1001
    assert path.stat().st_size == 1001 * np.dtype(dtype).itemsize
    assert read_token_header(path) == {"format": "nexus-tokens", "version": 1, "dtype": np.dtype(dtype).name,
                                       "vocab_size": vocab, "n_tokens": 1001}
    np.testing.assert_array_equal(DolmaMemoryMappedDataset(path, 1000, 1)[0].numpy(), tokens)


@pytest.mark.parametrize("seq_len, pred, stride", [(16, 1, None), (16, 4, None), (10, 0, 3), (7, 2, 20)])
def test_memmap_windows_are_slices(tmp_path, seq_len, pred, stride):
    src = np.random.default_rng(1).integers(0, 4096, size=503)
    path = tmp_path / "t.bin"
    write_token_file(path, [src[:100], src[100:]], 4096)  # chunked writes concatenate
    ds = DolmaMemoryMappedDataset(path, seq_len, pred, stride=stride)
    step, win = stride or seq_len, seq_len + pred
    assert len(ds) == (503 - win) // step + 1
    for i in range(len(ds)):
        x = ds[i]
        assert x.dtype == torch.long and x.shape == (win,)
        np.testing.assert_array_equal(x.numpy(), src[i * step: i * step + win])
    assert (len(ds) - 1) * step + win <= 503 < len(ds) * step + win  # last window is the last that fits
    np.testing.assert_array_equal(ds[-1].numpy(), ds[len(ds) - 1].numpy())
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_memmap_in_dataloader_workers(tmp_path):
    src = np.arange(400) % 300
    write_token_file(tmp_path / "t.bin", torch.tensor(src), 300)
    ds = DolmaMemoryMappedDataset(tmp_path / "t.bin", seq_len=9, n_pred_tokens=1)
    batches = list(DataLoader(ds, batch_size=4, num_workers=2))
    np.testing.assert_array_equal(torch.cat(batches).numpy(), np.stack([src[i * 9: i * 9 + 10] for i in range(len(ds))]))


def test_memmap_shorter_than_one_window_names_file_and_sizes(tmp_path):
    write_token_file(tmp_path / "t.bin", np.arange(10), 100)
    assert len(DolmaMemoryMappedDataset(tmp_path / "t.bin", seq_len=9, n_pred_tokens=1)) == 1  # exactly one window
    with pytest.raises(DataError, match=r"t\.bin holds 10 tokens, .* seq_len \+ n_pred_tokens = 10 \+ 1 = 11"):
        DolmaMemoryMappedDataset(tmp_path / "t.bin", seq_len=10, n_pred_tokens=1)
    write_token_file(tmp_path / "e.bin", [], 100)
    with pytest.raises(ValueError, match=r"e\.bin holds 0 tokens"):  # a ValueError: the CLI prints one line
        DolmaMemoryMappedDataset(tmp_path / "e.bin", seq_len=4)


def test_shard_paths_that_are_missing_or_empty_name_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [(tmp_path / "empty", "shard directory .*empty holds no shards"),
             (tmp_path / "gone", "shard directory .*gone does not exist"),
             (tmp_path / "gone.jsonl.gz", "shard .*gone.jsonl.gz does not exist")]
    for path, pattern in cases:
        with pytest.raises(DataFileNotFoundError, match=pattern) as err:
            expand_shards([path])
        # both kinds: callers catching a missing file, and the CLI's one-line ValueError, see it
        assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)


def test_unreadable_shards_name_the_file(small_tokenizer, tmp_path):
    good = gzip.compress(b'{"text": "abc"}\n' * 2000)
    (tmp_path / "cut.jsonl.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "plain.jsonl.gz").write_text('{"text": "not compressed"}\n')
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    for name in ("cut.jsonl.gz", "plain.jsonl.gz", "latin1.jsonl"):
        with pytest.raises(DataError, match=name):
            list(iter_documents(tmp_path / name))
        with pytest.raises(DataError, match=name):
            _windows(_stream(small_tokenizer, [tmp_path / name]))


def test_corrupt_header_names_file(tmp_path):
    path = tmp_path / "t.bin"
    write_token_file(path, np.arange(50), 100)
    header = path.with_name("t.bin.json")
    header.write_text("{not json")
    with pytest.raises(ValueError, match="t.bin.json"):
        DolmaMemoryMappedDataset(path, 8)
    header.write_text(json.dumps({"format": "nexus-tokens", "version": 1, "dtype": "uint32", "vocab_size": 100,
                                  "n_tokens": 50}))
    with pytest.raises(ValueError, match="corrupt"):  # dtype does not match the vocabulary
        DolmaMemoryMappedDataset(path, 8)
    header.unlink()
    with pytest.raises(FileNotFoundError, match="t.bin"):
        DolmaMemoryMappedDataset(path, 8)


def test_truncated_token_file_names_file(tmp_path):
    path = tmp_path / "t.bin"
    write_token_file(path, np.arange(50), 100)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"t\.bin has 97 bytes"):
        DolmaMemoryMappedDataset(path, 8)
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        DolmaMemoryMappedDataset(tmp_path / "missing.bin", 8)


def test_out_of_range_tokens(tmp_path):
    with pytest.raises(ValueError, match="outside"):
        write_token_file(tmp_path / "t.bin", np.array([1, 2, 100]), 100)
    with pytest.raises(ValueError, match="outside"):
        write_token_file(tmp_path / "t.bin", np.array([-1, 2]), 100)
    with pytest.raises(TypeError, match="integers"):
        write_token_file(tmp_path / "t.bin", np.array([1.0, 2.0]), 100)
    # a file whose ids exceed its declared vocabulary is caught when read
    write_token_file(tmp_path / "t.bin", np.array([1, 2, 99, 3]), 100)
    tmp = tmp_path / "t.bin.json"
    tmp.write_text(tmp.read_text().replace('"vocab_size": 100', '"vocab_size": 50'))
    with pytest.raises(ValueError, match="corrupt file"):
        DolmaMemoryMappedDataset(tmp_path / "t.bin", 3)[0]
