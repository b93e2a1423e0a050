"""Tensor parallel (Megatron-style) for :class:`nexus.models.moe.MoETransformer` on
``torch.distributed.tensor.parallel``.

What is split across the ``tp`` ranks (weights become DTensors on the tp mesh):

- attention: q/k/v column-parallel (``ColwiseParallel``: each rank holds ``n_heads / tp`` query and
  ``n_kv_heads / tp`` key/value heads, consecutive, so the GQA grouping stays local), output
  projection row-parallel (``RowwiseParallel``: partial sums all-reduced, or reduce-scattered
  along the sequence under sequence parallel);
- dense SwiGLU (non-MoE layers, MTP heads): gate/up column-parallel, down row-parallel;
- MoE: each routed expert's SwiGLU and the shared experts likewise (gate/up column, down row);
  the router stays replicated (plain parameters), so every tp rank takes the same routing decision
  on the same tokens. Cost: one all-reduce per expert call in forward and one in backward (as in
  Megatron without expert parallelism); expert parallel would be the scalable alternative.
- embeddings vocab-parallel (``RowwiseParallel`` on ``nn.Embedding``: rows of the vocabulary split),
  ``lm_head`` column-parallel over the vocabulary with its logits all-gathered, so the caller gets
  the full ``[B, T, V]`` logits and the loss code is unchanged. Tied embeddings stay tied.
- sequence parallel (``sequence_parallel=True``): the residual stream between blocks is split along
  the sequence (dim 1), the RMSNorms run on their sequence shard (``SequenceParallel``), attention
  and FFN inputs are all-gathered (``PrepareModuleInput``) and their row-parallel outputs
  reduce-scattered back; the sequence length must then be divisible by tp (checked in forward).

What stays replicated (computed whole, identically, on every tp rank), and why:

- routing Mamba (RoM) mixers: the in-projection's output interleaves the x and gate halves and feeds
  a depthwise conv and a scan over the whole sequence; splitting it cleanly would need a different
  layout of the model's weights. Under sequence parallel its input is all-gathered and its output
  sliced back to the local sequence shard.
- mixture of depths: its router picks top-k tokens over the whole sequence, so a MoD layer sees the
  full sequence (gathered under sequence parallel); the block inside is still tensor parallel
  (heads, FFN columns) but without sequence parallel, since it runs on the selected tokens only.
- routers (MoE, RoM, MoD): tiny, and every rank must route identically.

Replicated parameters are plain tensors (Replicate DTensors for the sequence-parallel norms), broadcast
from tp rank 0 when the function runs, like the sharded weights, which are scattered from tp rank 0
(so ranks that initialised differently still agree); their gradients come out identical on every tp rank
because everything they see is replicated. Dropout must draw the same masks on every tp rank
(same seed) for replicated activations; tests use ``dropout=0``.

The attention reads its local head count from the projection width (``view(b, t, -1, head_dim)``),
so ``GroupedQueryAttention.n_heads`` / ``n_kv_heads`` keep the global (config) values.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleInputOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)

from nexus.models.moe.attention import GroupedQueryAttention
from nexus.models.moe.mamba import RoutingMamba
from nexus.models.moe.mod import MixtureOfDepths
from nexus.models.moe.model import MoETransformer, TransformerBlock
from nexus.models.moe.moe import MoEFeedForward

__all__ = ["apply_tensor_parallel", "check_tensor_parallel_sizes", "tp_mesh_of"]


def tp_mesh_of(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D tensor-parallel mesh: ``mesh`` itself when 1-D, else its dimension named ``"tp"``.

    Raises:
        TypeError: ``mesh`` is not a DeviceMesh. ValueError: a multi-dimensional mesh without a
        ``"tp"`` dimension.
    """
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"tp_mesh must be a torch.distributed DeviceMesh, got {type(mesh).__name__}")
    if mesh.ndim == 1:
        return mesh
    names = mesh.mesh_dim_names or ()
    if "tp" not in names:
        raise ValueError(f"tp_mesh has {mesh.ndim} dimensions {names or '(unnamed)'} and none is named 'tp'; "
                         "pass the 1-D tensor-parallel mesh (e.g. mesh['tp'])")
    return mesh["tp"]


def check_tensor_parallel_sizes(config, tp: int) -> None:
    """Raise ValueError naming every model size that ``tp`` does not divide.

    Heads must split whole (n_heads, n_kv_heads); the column-split hidden sizes (d_ff for experts,
    dense hidden d_ff_dense) and the vocabulary (vocab-parallel embedding and lm_head) must split
    evenly so every rank holds the same shape.

    Example:
        >>> check_tensor_parallel_sizes(MoEConfig(n_heads=4, n_kv_heads=2, ...), tp=4)
        ValueError: tensor parallel size tp=4 must divide ...: n_kv_heads=2
    """
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor parallel size must be an int >= 1, got tp={tp!r}")
    sizes = {"n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads, "d_ff": config.d_ff,
             "d_ff_dense": config.dense_hidden, "vocab_size": config.vocab_size}
    bad = [f"{name}={value}" for name, value in sizes.items() if value % tp]
    if bad:
        raise ValueError(f"tensor parallel size tp={tp} must divide the model's head counts, hidden sizes and "
                         f"vocabulary; not divisible: {', '.join(bad)}")


def _swiglu_plan(prefix: str, *, seq_out: bool) -> dict:
    """gate/up column-parallel, down row-parallel; its output sequence-sharded when ``seq_out``."""
    return {
        f"{prefix}gate_proj": ColwiseParallel(),
        f"{prefix}up_proj": ColwiseParallel(),
        f"{prefix}down_proj": RowwiseParallel(output_layouts=Shard(1) if seq_out else Replicate()),
    }


def _gather_in_slice_out(n_inputs: int, n_outputs: int) -> PrepareModuleInputOutput:
    """For a replicated module under sequence parallel: all-gather the first input along the
    sequence and hand it over as a plain tensor; slice the first output back to the local shard."""
    return PrepareModuleInputOutput(
        input_layouts=(Shard(1),) + (None,) * (n_inputs - 1),
        desired_input_layouts=(Replicate(),) + (None,) * (n_inputs - 1),
        use_local_input=True,
        output_layouts=(Replicate(),) + (None,) * (n_outputs - 1),
        desired_output_layouts=(Shard(1),) + (None,) * (n_outputs - 1),
        use_local_output=True,
    )


def _block_plan(block: TransformerBlock, *, sequence_parallel: bool) -> dict:
    """Plan for one TransformerBlock; with sequence_parallel its input and output are [B, T/tp, D]
    local shards of the residual stream, else full [B, T, D] tensors."""
    sp = sequence_parallel
    plan: dict = {}
    if sp:
        plan["mixer_norm"] = SequenceParallel()
        plan["ffn_norm"] = SequenceParallel()
    if isinstance(block.mixer, GroupedQueryAttention):
        if sp:  # one all-gather of the normed input shared by q, k and v (a DTensor, not a local copy each)
            plan["mixer"] = PrepareModuleInput(input_layouts=(Shard(1), None),
                                               desired_input_layouts=(Replicate(), None))
        plan.update({"mixer.q_proj": ColwiseParallel(), "mixer.k_proj": ColwiseParallel(),
                     "mixer.v_proj": ColwiseParallel(),
                     "mixer.o_proj": RowwiseParallel(output_layouts=Shard(1) if sp else Replicate())})
    elif isinstance(block.mixer, RoutingMamba):
        if sp:
            plan["mixer"] = _gather_in_slice_out(n_inputs=1, n_outputs=2)  # (out, RouterLosses)
    else:
        raise TypeError(f"apply_tensor_parallel: unknown mixer {type(block.mixer).__name__}")
    if isinstance(block.ffn, MoEFeedForward):
        if sp:  # the router and dispatch index whole tokens: they work on the plain, gathered tensor
            plan["ffn"] = _gather_in_slice_out(n_inputs=1, n_outputs=2)
        # each expert gets a plain [n_e, D] block; one Replicate DTensor feeds both gate and up, so the
        # backward all-reduces the input gradient once per expert, not twice
        expert_input = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),))
        plan["ffn.experts.*"] = expert_input
        plan.update(_swiglu_plan("ffn.experts.*.", seq_out=False))
        if block.ffn.shared is not None:
            plan["ffn.shared"] = expert_input
            plan.update(_swiglu_plan("ffn.shared.", seq_out=False))
    else:
        if sp:
            plan["ffn"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        plan.update(_swiglu_plan("ffn.", seq_out=sp))
    return plan


def _check_sequence_divisible(tp: int):
    def hook(module: nn.Module, args: tuple) -> None:
        input_ids = args[0] if args else None
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[1] % tp:
            raise ValueError(f"sequence parallel: sequence length T={input_ids.shape[1]} of input_ids "
                             f"{tuple(input_ids.shape)} must be divisible by the tensor parallel size tp={tp}")
    return hook


@torch.no_grad()
def _broadcast_replicated(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Make the replicated parameters and buffers equal to tp rank 0's: plain tensors, and the
    Replicate DTensors of SequenceParallel (it wraps each rank's own values without communicating;
    the sharded weights were already scattered from tp rank 0 by parallelize_module)."""
    group = tp_mesh.get_group()
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_meta:
            continue
        if isinstance(tensor, DTensor):
            if all(placement.is_replicate() for placement in tensor.placements):
                dist.broadcast(tensor.to_local(), group=group, group_src=0)
            continue
        dist.broadcast(tensor.data, group=group, group_src=0)


def apply_tensor_parallel(model: MoETransformer, tp_mesh: DeviceMesh, *,
                          sequence_parallel: bool = True) -> MoETransformer:
    """Split ``model``'s attention heads, FFN and expert columns and vocabulary over ``tp_mesh`` (in place).

    Args:
        model: a :class:`MoETransformer`, not yet wrapped by DDP/FSDP (tensor parallel comes first,
            as in torchtitan's order) and not already tensor-parallel. Parameters may be on the
            meta device: then ``to_empty`` and ``init_weights`` after, with the same seed on every
            rank (meta tensors hold nothing to broadcast, so replicated weights agree by the seed).
        tp_mesh: a 1-D DeviceMesh of the tp ranks, or a mesh with a dimension named ``"tp"``.
        sequence_parallel: split the residual stream and the norms along the sequence (less
            activation memory; forward then needs ``T % tp == 0``).

    Returns:
        ``model`` itself. Forward keeps its contract: input_ids [B, T] int64 (the same on every tp
        rank) -> MoEOutput with full logits [B, T, V] (fp32 by default) on every tp rank. Sharded
        weights are DTensors (``p.full_tensor()`` gathers one); the rest are plain tensors. A tp
        mesh of size 1 leaves the model unchanged.

    Raises:
        TypeError: not a MoETransformer / not a DeviceMesh. ValueError: tp does not divide n_heads,
        n_kv_heads, d_ff, d_ff_dense or vocab_size (each named), or the model is already tensor parallel.

    Example:
        >>> tp_mesh = init_device_mesh("cuda", (4,), mesh_dim_names=("tp",))
        >>> model = apply_tensor_parallel(MoETransformer(cfg), tp_mesh)  # then FSDP/DDP on the dp mesh
    """
    if not isinstance(model, MoETransformer):
        raise TypeError(f"apply_tensor_parallel expects a MoETransformer, got {type(model).__name__}")
    tp_mesh = tp_mesh_of(tp_mesh)
    tp = tp_mesh.size()
    check_tensor_parallel_sizes(model.config, tp)
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("apply_tensor_parallel: the model already has DTensor parameters (tensor parallel or "
                         "FSDP applied before); apply tensor parallel once, before data parallel")
    if tp == 1:
        return model
    sp = bool(sequence_parallel)
    tied = model.lm_head.weight is model.embed_tokens.weight

    parallelize_module(model, tp_mesh, {
        # vocab-parallel embedding: the partial lookups are summed (reduce-scattered along T under SP)
        "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1) if sp else Replicate()),
        # column-parallel over the vocabulary, logits all-gathered: callers and losses see [B, T, V]
        "lm_head": ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(), output_layouts=Replicate()),
        **({"norm": SequenceParallel()} if sp else {}),
    })
    if tied:  # both are Shard(0) over the vocabulary: one parameter again
        model.lm_head.weight = model.embed_tokens.weight
    for layer in model.layers:
        if isinstance(layer, MixtureOfDepths):
            if sp:  # top-k over the sequence: the MoD layer works on the gathered sequence
                parallelize_module(layer, tp_mesh, _gather_in_slice_out(n_inputs=2, n_outputs=3))
            parallelize_module(layer.block, tp_mesh, _block_plan(layer.block, sequence_parallel=False))
        else:
            parallelize_module(layer, tp_mesh, _block_plan(layer, sequence_parallel=sp))
    for head in model.mtp_heads:
        parallelize_module(head.block, tp_mesh, _block_plan(head.block, sequence_parallel=sp))
        if sp:
            parallelize_module(head.norm, tp_mesh, SequenceParallel())
    if sp:
        model.register_forward_pre_hook(_check_sequence_divisible(tp))
    _broadcast_replicated(model, tp_mesh)
    return model
