"""Data pipeline: the default corpus, a local BPE tokenizer, streaming and memory-mapped datasets."""

from .corpus import CorpusFiles, build_default_corpus, stdlib_documents
from .dolma_dataset import (DolmaMemoryMappedDataset, DolmaStreamingDataset, expand_shards, read_token_header,
                            token_dtype, write_token_file)
from .errors import DataError, DataFileNotFoundError
from .prepare import PreparedData, prepare_data
from .tokenizer import TokenizerWrapper, iter_documents, train_bpe_tokenizer

__all__ = [
    "DataError", "DataFileNotFoundError",
    "CorpusFiles", "build_default_corpus", "stdlib_documents",
    "TokenizerWrapper", "train_bpe_tokenizer", "iter_documents",
    "DolmaStreamingDataset", "DolmaMemoryMappedDataset", "write_token_file", "read_token_header",
    "token_dtype", "expand_shards",
    "PreparedData", "prepare_data",
]
