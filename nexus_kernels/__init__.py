"""Triton kernels for training large transformers, each beside its pure-PyTorch reference."""
from nexus_kernels._backend import BackendError, forced, select

# Kernel families add their public functions below (one import line each).
