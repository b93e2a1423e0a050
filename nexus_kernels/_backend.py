"""Per-call choice between the Triton kernel, Triton's CPU interpreter and the torch reference.

- ``triton``: CUDA tensors and Triton importable: the fused kernel.
- ``interpret``: CPU tensors while ``TRITON_INTERPRET=1`` (read by Triton when a kernel is
  decorated, i.e. when its private kernel module is imported on the first launch, so it must be
  set before then): the same kernel source, run by Triton's interpreter.
- ``reference``: otherwise: plain PyTorch.

``NEXUS_BACKEND=reference|triton|interpret`` forces a path for every call; ``forced(name)`` does the
same for a block of code. Forcing a kernel path where it cannot run raises ``BackendError``.

Triton is optional: nothing here or in the public modules imports it. Each family's
``@triton.jit`` kernels live in a private module (``_cast_kernels``, ``_mx_kernels``, ...) that its
launcher imports on the first kernel launch; without Triton every call takes the reference path,
and forcing ``triton`` or ``interpret`` is a ``BackendError`` that says Triton is not installed.

Every launcher is a ``torch.library`` custom op in the ``nexus`` namespace (``register_op``) with a
fake implementation, so ``torch.compile`` traces through it; the op itself picks the path per call.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch

BACKENDS = ("triton", "interpret", "reference")
_override = threading.local()


class BackendError(RuntimeError):
    """A forced backend cannot run the call it was asked for."""


OP_NAMESPACE = "nexus"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``import triton`` works (checked once per process)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def register_op(name: str, impl, fake, mutates_args: tuple[str, ...] = ()):
    """Register ``impl`` (type-annotated) as the custom op ``nexus::<name>`` with fake implementation
    ``fake`` (same arguments; returns empty tensors of the output shapes, dtypes and strides)."""
    op = torch.library.custom_op(f"{OP_NAMESPACE}::{name}", mutates_args=mutates_args)(impl)
    op.register_fake(fake)
    return op


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _forced_name() -> str | None:
    name = getattr(_override, "name", None) or os.environ.get("NEXUS_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise BackendError(f"NEXUS_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def forced(name: str):
    """Force ``name`` (one of BACKENDS) for every kernel call inside the block, in this thread."""
    if name not in BACKENDS:
        raise BackendError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    previous = getattr(_override, "name", None)
    _override.name = name
    try:
        yield
    finally:
        _override.name = previous


def _kernel_path(device: torch.device) -> str | None:
    """The kernel path that can run on ``device``, or None."""
    if not triton_available():
        return None
    if device.type == "cuda" and not interpreting():
        return "triton"
    if device.type == "cpu" and interpreting():
        return "interpret"
    return None


def select(*tensors: torch.Tensor) -> str:
    """Return the backend for a call on ``tensors`` (all on one device)."""
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        raise BackendError(f"tensors are on different devices: {sorted(map(str, devices))}")
    device = devices.pop() if devices else torch.device("cpu")
    name = _forced_name()
    if name == "reference":
        return "reference"
    path = _kernel_path(device)
    if name is None:
        return path or "reference"
    if path is None:
        why = (
            "Triton is not installed (`pip install triton`; wheels exist for Linux x86_64 and aarch64)"
            if not triton_available()
            else f"tensors are on {device.type} and TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')}"
        )
        by = "forced()" if getattr(_override, "name", None) else f"NEXUS_BACKEND={name}"
        raise BackendError(f"backend {name!r} was forced ({by}) but cannot run here: {why}")
    # 'triton' and 'interpret' name the same kernel; the device decides how it runs.
    return path
