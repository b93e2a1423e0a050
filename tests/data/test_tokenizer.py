import json

import pytest
import torch
from tokenizers import Tokenizer

from nexus.data import TokenizerWrapper, iter_documents, stdlib_documents, train_bpe_tokenizer

UNICODE = "def grüße(x):\n\treturn 'naïve café 日本語 🚀 \\u00e9'  # ça va?\r\n\n   \x00end"


def test_round_trip_on_stdlib_text_and_unicode(small_tokenizer, small_corpus):
    val_docs = list(iter_documents(small_corpus.val[0]))
    for text in val_docs + [UNICODE, "", " ", "\n\n"]:
        assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


def test_bpe_compresses_python(small_tokenizer, small_corpus):
    text = next(iter_documents(small_corpus.train[0]))
    # merges learned: far fewer tokens than bytes (byte-level alone would be 1 token per byte)
    assert len(small_tokenizer.encode(text)) < 0.6 * len(text.encode())


def test_vocab_and_special_ids(small_tokenizer):
    tok = small_tokenizer
    assert tok.vocab_size == len(tok) == 512
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    assert tok.decode([tok.eos_token_id]) == "<eos>"
    assert tok.decode([tok.eos_token_id, 100], skip_special_tokens=True) == tok.decode([100])
    assert max(tok.encode(UNICODE)) < tok.vocab_size


def test_reload_from_file_and_directory(small_tokenizer):
    by_file = TokenizerWrapper(small_tokenizer.path)
    by_dir = TokenizerWrapper(small_tokenizer.path.parent, max_length=8)
    assert by_file.encode(UNICODE) == by_dir.encode(UNICODE) == small_tokenizer.encode(UNICODE)
    assert by_dir.max_length == 8


def test_encode_pt_shape_and_decode_tensor(small_tokenizer):
    ids = small_tokenizer.encode("import os\nprint(os.sep)", return_tensors="pt")
    assert ids.dtype == torch.long and ids.dim() == 2 and ids.shape[0] == 1
    assert ids[0].tolist() == small_tokenizer.encode("import os\nprint(os.sep)")
    assert small_tokenizer.decode(ids) == "import os\nprint(os.sep)"
    assert small_tokenizer.decode(ids[0]) == "import os\nprint(os.sep)"


def test_encode_batch_padding_truncation(small_tokenizer):
    tok = small_tokenizer
    texts = ["x = 1", "for i in range(10):\n    print(i)", ""]
    plain = [tok.encode(t) for t in texts]
    out = tok.encode_batch(texts)
    assert out["input_ids"] == plain
    assert out["attention_mask"] == [[1] * len(p) for p in plain]
    pt = tok.encode_batch(texts, padding=True, return_tensors="pt")
    width = max(map(len, plain))
    assert pt["input_ids"].shape == (3, width)
    for row, mask, p in zip(pt["input_ids"], pt["attention_mask"], plain):
        assert row[: len(p)].tolist() == p
        assert (row[len(p):] == tok.pad_token_id).all()
        assert mask.sum().item() == len(p)
    fixed = tok.encode_batch(texts, padding="max_length", truncation=True, max_length=4, return_tensors="pt")
    assert fixed["input_ids"].shape == (3, 4)
    assert fixed["input_ids"][1].tolist() == plain[1][:4]


def test_encode_batch_errors(small_tokenizer):
    with pytest.raises(ValueError, match="padding=True"):
        small_tokenizer.encode_batch(["a", "a b c d e"], return_tensors="pt")
    with pytest.raises(ValueError, match="max_length"):
        small_tokenizer.encode_batch(["a"], truncation=True)
    with pytest.raises(ValueError, match="truncation=True"):
        small_tokenizer.encode_batch(["a b c d e f g"], padding="max_length", max_length=2)
    with pytest.raises(ValueError, match="return_tensors"):
        small_tokenizer.encode("a", return_tensors="np")
    with pytest.raises(TypeError, match="list of str"):
        small_tokenizer.encode_batch("abc")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        small_tokenizer.decode([small_tokenizer.vocab_size])


def test_hub_name_gives_local_training_hint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        TokenizerWrapper("gpt2")
    msg = str(err.value)
    assert "'gpt2'" in msg and "never downloads" in msg
    assert "nexus prepare" in msg and "train_bpe_tokenizer" in msg


def test_corrupt_tokenizer_file_names_file(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        TokenizerWrapper(bad)


def test_train_from_txt_and_jsonl_gz(tmp_path):
    import gzip
    docs = [text for _, text in stdlib_documents()[:40]]
    (tmp_path / "a.txt").write_text(docs[0])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        for d in docs[1:]:
            f.write(json.dumps({"text": d}) + "\n")
    tok = train_bpe_tokenizer(tmp_path, 400, tmp_path / "out",  # a directory stands for its shards
                              special_tokens=("<pad>", "<eos>"))
    assert tok.path == tmp_path / "out" / "tokenizer.json"
    assert tok.vocab_size == 400
    assert isinstance(Tokenizer.from_file(str(tok.path)), Tokenizer)
    assert tok.eos_token_id == 1 and tok.bos_token_id == 1  # no <bos>: falls back to eos
    assert tok.decode(tok.encode(UNICODE)) == UNICODE


def test_train_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer([tmp_path], 100, tmp_path / "t.json")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        train_bpe_tokenizer([tmp_path / "missing.jsonl"], 1000, tmp_path / "t.json")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no text field"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        train_bpe_tokenizer([bad], 1000, tmp_path / "t.json")
