"""Nexus: a training library for large transformers on fused Triton kernels."""

__version__ = "0.1.0"
