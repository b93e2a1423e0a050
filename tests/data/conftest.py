"""Small shared fixtures for the data tests: a ~300 kB standard-library corpus and a tokenizer on it."""

import pytest

from nexus.data import build_default_corpus, train_bpe_tokenizer

SMALL_BYTES = 300_000
SMALL_VOCAB = 512


@pytest.fixture(scope="session")
def small_corpus_bytes():
    return SMALL_BYTES


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    return build_default_corpus(tmp_path_factory.mktemp("corpus"), max_bytes=SMALL_BYTES, shard_bytes=60_000)


@pytest.fixture(scope="session")
def small_tokenizer(small_corpus, tmp_path_factory):
    return train_bpe_tokenizer(small_corpus.train, SMALL_VOCAB, tmp_path_factory.mktemp("tok") / "tokenizer.json")
