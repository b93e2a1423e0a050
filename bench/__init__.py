"""Benchmark scripts (``nexus bench <name>``); a package so that ``bench._common`` always resolves here,
even when a test directory named ``bench`` is also on ``sys.path``."""
