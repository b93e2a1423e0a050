"""Running one kernel call on both paths, for the tests that hold the interpreted kernel to its reference."""
import torch

from nexus_kernels import forced


def both_paths(fn, *args, **kwargs):
    """(interpreted Triton kernel result, reference result) for the same call."""
    kernel = fn(*args, **kwargs)
    with forced("reference"):
        reference = fn(*args, **kwargs)
    return kernel, reference


def assert_same_nan_aware(a, b):
    """Same shape, dtype, NaN positions, and equal values elsewhere."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert torch.equal(a[~torch.isnan(a)], b[~torch.isnan(b)])
