"""Multi-process tests: the Gloo harness (harness.py) every distributed test runs through."""
