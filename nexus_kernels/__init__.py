"""Triton kernels for training large transformers, each beside its pure-PyTorch reference.

Triton is optional: the kernels are imported on their first launch, and without Triton every call
runs the reference. Each public function calls a ``torch.ops.nexus`` custom op (see ``_backend``).
"""
from nexus_kernels._backend import BackendError, forced, select
from nexus_kernels.attention import (
    block_attention_backward,
    block_attention_backward_reference,
    block_attention_forward,
    block_attention_forward_reference,
    merge_attention,
    merge_attention_reference,
)
from nexus_kernels.cast import cast_to_fp, cast_to_fp_bits, decode_fp_bits
from nexus_kernels.comm_quant import COMM_FORMATS, packed_nbytes, quantize_pack, unpack_dequantize
from nexus_kernels.mx import from_mx, to_mx
from nexus_kernels.newton_schulz import POLAR_EXPRESS_COEFFS, orthogonalize, orthogonalize_reference, polar_express_coeffs
from nexus_kernels.soap import (
    project,
    project_back,
    project_back_reference,
    project_reference,
    update_preconditioners,
    update_preconditioners_reference,
)
