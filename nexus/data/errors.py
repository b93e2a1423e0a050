"""Errors for bad input data: each message names the file or directory at fault, on one line."""

from __future__ import annotations

__all__ = ["DataError", "DataFileNotFoundError"]


class DataError(ValueError):
    """Input data is missing, empty, too short or malformed; the message names the path.

    A ValueError, so `nexus` prints it as one `error: ...` line and exits with status 2.
    """


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A shard, shard directory, token file or tokenizer named by the run does not exist.

    Also a FileNotFoundError, so callers that catch a missing file keep working.
    """
