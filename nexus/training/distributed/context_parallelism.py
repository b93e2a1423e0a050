"""Context parallelism: ring attention over a sequence split across ranks (Liu et al. 2023, Ring Attention).

Each rank of a context-parallel (cp) group holds a slice of every sequence. Attention needs every key
for every query, so the K/V blocks travel round the ring: at step s rank r computes its queries against
the block of rank r - s (``nexus_kernels.block_attention_forward``, masks in global positions) while
the next block is already in flight (``batch_isend_irecv``); the partial outputs merge exactly through
their log-sum-exp (``merge_attention``). Backward sends the K/V blocks round again, and with them the
dK/dV accumulated so far, which reach their owner after a full turn. Each block's partial output is
rounded once to the input dtype by the attention kernel; the running merge, the log-sum-exps and the
travelling dK/dV stay float32 (float64 for float64 inputs), so the error does not compound with the
ring size as it does in public rings that merge in bf16 (ring-flash-attention #42).

Layout. A sequence of S tokens is padded to a multiple of the chunk count and cut into chunks. With
causal attention there are 2P chunks and rank i holds chunks i and 2P-1-i (zigzag): an early chunk
sees few keys, a late one many, so every rank does the same work. Without causal masking rank i holds
the contiguous chunk i of P. Padding sits at the end of the sequence; padded keys are masked
(``seq_len``), padded queries are computed and dropped (labels ``ignore_index``).

Memory: each rank saves its own q, k, v, output and log-sum-exp, 1/P of one process's attention
activations; the ring holds two K/V blocks at a time.

Example::
    cp_group = init_context_parallel_group(cp_size=4)          # under torchrun --nproc-per-node 8: dp 2 x cp 4
    attention = ContextParallelAttention(hidden_size=2048, num_heads=16, cp_group=cp_group)
    x_local = shard_sequence(x, cp_group)                        # [B, S, 2048] -> [B, S/4, 2048], zigzag
    y = gather_sequence(attention(x_local), cp_group, seq_len=S)  # [B, S, 2048]
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nexus_kernels.attention import block_attention_backward, block_attention_forward, merge_attention

__all__ = [
    "ContextParallelAttention", "RingAttentionCore", "SequenceLayout", "SequenceSplit", "apply_context_parallel",
    "context_parallel_mesh", "gather_sequence", "init_context_parallel_group", "ring_attention", "shard_batch",
    "shard_sequence",
]

IGNORE_INDEX = -100  # cross_entropy's default: labels of padded positions

_GROUPS: dict[tuple[int, int], object] = {}  # (id of the world group, cp_size) -> this rank's cp group


# ---------------------------------------------------------------------------------------------------
# Groups
# ---------------------------------------------------------------------------------------------------
def init_context_parallel_group(cp_size: int = 1, *, ctx=None):
    """This rank's context-parallel group of ``cp_size`` ranks.

    With a ``ParallelContext`` (``ctx``, from ``init_parallel``) whose mesh has a ``cp`` dim, the group
    of that dim. Otherwise the world (``world_size = cp_size x dp``) is cut into groups of consecutive
    ranks (0..cp_size-1, cp_size..2 cp_size-1, ...), created once per size; every rank must call this
    (group creation is collective). Without a process group, ``cp_size=1`` gives None (one process).

    Example::
        cp_group = init_context_parallel_group(cp_size=4)   # 8 ranks: groups {0..3}, {4..7}
    """
    if isinstance(cp_size, bool) or not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"init_context_parallel_group: cp_size must be an int >= 1, got {cp_size!r}")
    if ctx is not None and ctx.mesh is not None and "cp" in (ctx.mesh.mesh_dim_names or ()):
        if ctx.sizes["cp"] != cp_size:
            raise ValueError(f"init_context_parallel_group: cp_size={cp_size}, but the mesh's cp dim has "
                             f"{ctx.sizes['cp']} ranks")
        return ctx.mesh["cp"].get_group()
    if not (dist.is_available() and dist.is_initialized()):
        if cp_size == 1:
            return None
        raise RuntimeError(f"init_context_parallel_group(cp_size={cp_size}) needs a process group: launch with "
                           "torchrun (or mpirun) and call init_parallel / init_process_group first")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % cp_size:
        raise ValueError(f"init_context_parallel_group: cp_size={cp_size} does not divide the world size {world}")
    key = (id(dist.group.WORLD), cp_size)
    if key not in _GROUPS:
        for start in range(0, world, cp_size):  # every rank creates every group, in the same order
            group = dist.new_group(list(range(start, start + cp_size)))
            if start <= rank < start + cp_size:
                _GROUPS[key] = group
    return _GROUPS[key]


def _size_rank(group) -> tuple[int, int]:
    """(ranks, this rank's index) of ``group``; None is the default group, or one process without one."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


# ---------------------------------------------------------------------------------------------------
# Sequence layout: which global positions a rank holds
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SequenceLayout:
    """Where rank ``rank`` of ``cp_size`` holds its tokens of a sequence of ``seq_len`` (unpadded) tokens.

    zigzag: 2 x cp_size chunks, rank i holds chunks i and 2P-1-i (causal load balance); otherwise
    cp_size contiguous chunks. ``chunk`` tokens per chunk; the sequence is padded to ``padded_len``.

    Example:
        >>> SequenceLayout(seq_len=7, cp_size=2, rank=0, zigzag=True).positions().tolist()
        [0, 1, 6, 7]
    """

    seq_len: int
    cp_size: int
    rank: int
    zigzag: bool = True

    def __post_init__(self):
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ValueError(f"SequenceLayout: seq_len must be an int >= 1, got {self.seq_len!r}")
        if not isinstance(self.cp_size, int) or self.cp_size < 1:
            raise ValueError(f"SequenceLayout: cp_size must be an int >= 1, got {self.cp_size!r}")
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.cp_size:
            raise ValueError(f"SequenceLayout: rank must be in [0, {self.cp_size}), got {self.rank!r}")

    @property
    def n_chunks(self) -> int:
        return 2 * self.cp_size if self.zigzag and self.cp_size > 1 else self.cp_size  # one rank: in order

    @property
    def chunk(self) -> int:
        return -(-self.seq_len // self.n_chunks)

    @property
    def padded_len(self) -> int:
        return self.chunk * self.n_chunks

    @property
    def local_len(self) -> int:
        return self.padded_len // self.cp_size

    def spans(self) -> list[tuple[int, int, int]]:
        """(global start, local start, length) of each chunk this rank holds, in local order."""
        return _chunk_spans(self.rank, self.cp_size, self.local_len, self.zigzag)

    def positions(self, device=None) -> torch.Tensor:
        """Global positions [local_len] int64 of this rank's tokens, in local order (padding: >= seq_len)."""
        return torch.cat([torch.arange(g, g + n, device=device) for g, _, n in self.spans()])

    def shard(self, x: torch.Tensor, dim: int = 1, pad_value=0) -> torch.Tensor:
        """This rank's slice of ``x`` (``seq_len`` long along ``dim``), padded with ``pad_value``."""
        dim = dim % x.dim()
        if x.shape[dim] != self.seq_len:
            raise ValueError(f"shard: dim {dim} of x has {x.shape[dim]} tokens, the layout {self.seq_len}")
        pad = self.padded_len - self.seq_len
        if pad:
            shape = list(x.shape)
            shape[dim] = pad
            x = torch.cat([x, x.new_full(shape, pad_value)], dim=dim)
        return torch.cat([x.narrow(dim, g, n) for g, _, n in self.spans()], dim=dim)


def _chunk_spans(rank: int, size: int, local_len: int, zigzag: bool) -> list[tuple[int, int, int]]:
    if not zigzag or size == 1:
        return [(rank * local_len, 0, local_len)]
    if local_len % 2:
        raise ValueError(f"ring attention: a zigzag slice holds two equal chunks, got an odd local length {local_len}")
    c = local_len // 2
    return [(rank * c, 0, c), ((2 * size - 1 - rank) * c, c, c)]


def _layout(group, seq_len: int, zigzag: bool) -> SequenceLayout:
    size, rank = _size_rank(group)
    return SequenceLayout(seq_len=seq_len, cp_size=size, rank=rank, zigzag=zigzag)


def shard_sequence(x: torch.Tensor, group=None, *, dim: int = 1, zigzag: bool = True, pad_value=0) -> torch.Tensor:
    """This rank's slice of ``x`` along ``dim`` (the sequence), padded at the end with ``pad_value`` to a
    multiple of the chunk count. ``zigzag`` for causal attention (the layout the model and
    ``ContextParallelAttention(causal=True)`` expect), contiguous otherwise.

    Shapes: x [..., S, ...] -> [..., padded_S / P, ...], same dtype.

    Example::
        ids_local = shard_sequence(input_ids, cp_group)          # [B, S] -> [B, S / P]
    """
    return _layout(group, x.shape[dim % x.dim()], zigzag).shard(x, dim, pad_value)


def gather_sequence(x: torch.Tensor, group=None, seq_len: int | None = None, *, dim: int = 1,
                    zigzag: bool = True) -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: every rank's slice gathered (``all_gather``, not differentiable)
    back into global order, padding cut to ``seq_len`` (default: keep it all).

    Shapes: x [..., S / P, ...] -> [..., seq_len, ...].
    """
    dim = dim % x.dim()
    size, _ = _size_rank(group)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    if size > 1:
        dist.all_gather(parts, x, group=group)
    else:
        parts = [x]
    local = x.shape[dim]
    pieces = []
    for rank, part in enumerate(parts):
        for g, start, n in _chunk_spans(rank, size, local, zigzag):
            pieces.append((g, part.narrow(dim, start, n)))
    full = torch.cat([p for _, p in sorted(pieces, key=lambda item: item[0])], dim=dim)
    return full if seq_len is None else full.narrow(dim, 0, seq_len)


def shard_batch(input_ids: torch.Tensor, group=None, labels: torch.Tensor | None = None, *, zigzag: bool = True,
                ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """This rank's share of a batch: tokens, their global positions (for RoPE) and labels.

    Shapes: input_ids [B, S] int64, labels [B, S] (already aligned with input_ids, e.g. shifted) ->
    ``{"input_ids": [B, S_local], "positions": [S_local] int64, "labels": [B, S_local]}``; padded
    positions get token 0 and label ``ignore_index``.

    Example::
        local = shard_batch(ids[:, :-1], cp_group, labels=ids[:, 1:])
        out = model(local["input_ids"], positions=local["positions"])
    """
    if input_ids.dim() != 2:
        raise ValueError(f"shard_batch: input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"shard_batch: labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
    layout = _layout(group, input_ids.shape[1], zigzag)
    out = {"input_ids": shard_sequence(input_ids, group, zigzag=zigzag, pad_value=0),
           "positions": layout.positions(input_ids.device)}
    if labels is not None:
        out["labels"] = shard_sequence(labels, group, zigzag=zigzag, pad_value=ignore_index)
    return out


# ---------------------------------------------------------------------------------------------------
# Ring attention
# ---------------------------------------------------------------------------------------------------
class _Ring:
    """Send to the next rank of the group, receive from the previous one."""

    def __init__(self, group):
        self.group = group
        self.size, self.rank = _size_rank(group)
        if self.size > 1:
            ranks = dist.get_process_group_ranks(group) if group is not None else list(range(self.size))
            self.next, self.prev = ranks[(self.rank + 1) % self.size], ranks[(self.rank - 1) % self.size]

    def exchange(self, tensor: torch.Tensor, tag: int):
        """Start sending ``tensor`` on and receiving its peer's; returns (receive buffer, requests)."""
        received = torch.empty_like(tensor)
        ops = [dist.P2POp(dist.isend, tensor, self.next, self.group, tag),
               dist.P2POp(dist.irecv, received, self.prev, self.group, tag)]
        return received, dist.batch_isend_irecv(ops)


def _wait(requests) -> None:
    for request in requests:
        request.wait()


def _pair_mask(q_span, k_span, causal: bool, seq_len: int):
    """How query chunk ``q_span`` sees key chunk ``k_span`` (global starts): None when it sees nothing,
    else (causal mask needed, seq_len mask or None)."""
    qg, _, qn = q_span
    kg, _, kn = k_span
    if kg >= seq_len or (causal and kg > qg + qn - 1):
        return None
    return causal and kg + kn - 1 > qg, seq_len if kg + kn > seq_len else None


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, softmax_scale, seq_len, zigzag):
        ring = _Ring(group)
        q_spans = _chunk_spans(ring.rank, ring.size, q.shape[2], zigzag)
        outs, lses = [None] * len(q_spans), [None] * len(q_spans)
        work = torch.float64 if q.dtype == torch.float64 else torch.float32  # partials and lse travel and merge in it
        kv = torch.stack((k, v))  # one message per step
        for step in range(ring.size):
            if step < ring.size - 1:  # the next block travels while this one is computed
                received, requests = ring.exchange(kv, tag=0)
            k_spans = _chunk_spans((ring.rank - step) % ring.size, ring.size, k.shape[2], zigzag)
            for i, (qg, qs, qn) in enumerate(q_spans):
                for kg, ks, kn in k_spans:
                    mask = _pair_mask((qg, qs, qn), (kg, ks, kn), causal, seq_len)
                    if mask is None:
                        continue
                    out, lse = block_attention_forward(
                        q[:, :, qs:qs + qn], kv[0, :, :, ks:ks + kn], kv[1, :, :, ks:ks + kn], causal=mask[0],
                        q_offset=qg, k_offset=kg, softmax_scale=softmax_scale, seq_len=mask[1])
                    if outs[i] is None:
                        outs[i], lses[i] = out.to(work), lse.to(work)
                    else:
                        outs[i], lses[i] = merge_attention(outs[i], lses[i], out, lse)
            if step < ring.size - 1:
                _wait(requests)
                kv = received
        for i, (_, _, qn) in enumerate(q_spans):
            if outs[i] is None:  # a chunk of padding that sees no key at all
                outs[i] = q.new_zeros(q.shape[:2] + (qn, q.shape[3]), dtype=work)
                lses[i] = q.new_full(q.shape[:2] + (qn,), float("-inf"), dtype=work)
        out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.setup = (group, causal, softmax_scale, seq_len, zigzag)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, causal, softmax_scale, seq_len, zigzag = ctx.setup
        ring = _Ring(group)
        dout = dout.contiguous()
        q_spans = _chunk_spans(ring.rank, ring.size, q.shape[2], zigzag)
        work = out.dtype
        dq = torch.zeros(q.shape, dtype=work, device=q.device)
        kv = torch.stack((k, v))
        dkv_requests = None
        for step in range(ring.size):
            if step < ring.size - 1:
                received, requests = ring.exchange(kv, tag=0)
            k_spans = _chunk_spans((ring.rank - step) % ring.size, ring.size, k.shape[2], zigzag)
            dkv = torch.zeros(kv.shape, dtype=work, device=q.device)  # this block's dK, dV from my queries
            for qg, qs, qn in q_spans:
                for kg, ks, kn in k_spans:
                    mask = _pair_mask((qg, qs, qn), (kg, ks, kn), causal, seq_len)
                    if mask is None:
                        continue
                    dq_part, dk_part, dv_part = block_attention_backward(
                        dout[:, :, qs:qs + qn], q[:, :, qs:qs + qn], kv[0, :, :, ks:ks + kn],
                        kv[1, :, :, ks:ks + kn], out[:, :, qs:qs + qn], lse[:, :, qs:qs + qn], causal=mask[0],
                        q_offset=qg, k_offset=kg, softmax_scale=softmax_scale, seq_len=mask[1])
                    dq[:, :, qs:qs + qn] += dq_part
                    dkv[0, :, :, ks:ks + kn] += dk_part
                    dkv[1, :, :, ks:ks + kn] += dv_part
            if dkv_requests is not None:  # what the previous ranks added to this block so far
                _wait(dkv_requests)
                dkv += dkv_received
            if ring.size > 1:  # on round the ring; after the last step it reaches the block's owner
                dkv_received, dkv_requests = ring.exchange(dkv, tag=1)
            if step < ring.size - 1:
                _wait(requests)
                kv = received
        if dkv_requests is not None:
            _wait(dkv_requests)
            dkv = dkv_received
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, causal: bool = False, *,
                   softmax_scale: float | None = None, seq_len: int | None = None,
                   zigzag: bool | None = None) -> torch.Tensor:
    """Attention over a sequence split across the ranks of ``group`` (None: the default group, or one
    process); differentiable (backward runs the ring again).

    Args:
        q: [B, Hq, S_local, D]; k, v: [B, Hkv, S_local, D] with Hq % Hkv == 0 (GQA); this rank's slice in
            the layout of :func:`shard_sequence` (same ``zigzag``); float16, bfloat16, float32 or float64.
        causal: causal mask over global positions.
        softmax_scale: default 1 / sqrt(D).
        seq_len: the real global length; keys at positions >= seq_len (end padding) are masked.
            Default: P x S_local (no padding).
        zigzag: the layout; default ``causal`` (what the sharding helpers produce).

    Returns:
        [B, Hq, S_local, D] in q's dtype: this rank's rows of attention over the whole sequence.

    Example::
        q, k, v = (shard_sequence(t, group, dim=2) for t in (q_full, k_full, v_full))
        out = ring_attention(q, k, v, group, causal=True)     # == shard_sequence(attention(q_full, ...), dim=2)
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"ring_attention: {name} must be a 4-D tensor [B, H, S_local, D], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"ring_attention: q and k hold the same tokens (self-attention), got S_local "
                         f"{q.shape[2]} and {k.shape[2]}")
    zigzag = causal if zigzag is None else zigzag
    size, _ = _size_rank(group)
    total = size * q.shape[2]
    if seq_len is None:
        seq_len = total
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= total:
        raise ValueError(f"ring_attention: seq_len must be an int in [1, {total}] (P x S_local), got {seq_len!r}")
    if zigzag and size > 1 and q.shape[2] % 2:
        raise ValueError(f"ring_attention: the zigzag layout holds two equal chunks per rank; S_local={q.shape[2]} "
                         f"is odd (shard with shard_sequence, which pads)")
    return _RingAttention.apply(q, k, v, group, causal, softmax_scale, seq_len, zigzag)


class RingAttentionCore:
    """The attention core of ``GroupedQueryAttention`` (``sdpa_core``'s signature) under context
    parallelism: causal ring attention over ``group``, the zigzag layout; no attention dropout.

    Shapes: q [B, H, T_local, D]; k, v [B, Hkv, T_local, D] -> [B, H, T_local, D].
    """

    def __init__(self, group) -> None:
        self.group = group

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
        if dropout_p:
            raise ValueError(f"context parallelism: attention dropout is not supported (dropout={dropout_p}); "
                             "set the model's dropout to 0")
        return ring_attention(q, k, v, self.group, causal=True)

    def __repr__(self) -> str:
        return f"RingAttentionCore(cp={_size_rank(self.group)[0]})"


# ---------------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------------
class ContextParallelAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention over a sequence split across ``cp_group``.

    ``forward(hidden_states)`` takes this rank's slice [batch, local_seq, hidden_size] in the layout of
    :func:`shard_sequence` (zigzag when ``causal``) and returns the same shape and dtype. Rotary
    embeddings (``rope_theta``; None turns them off) use the tokens' global positions. With a group
    of one rank (or no process group) it is plain attention over the whole sequence.

    cp_group: the ranks sharing each sequence (:func:`init_context_parallel_group`); None is torch's
    default group (every rank) under a process group. num_kv_heads: grouped-query attention (default
    num_heads). causal: mask and layout (zigzag) for decoders.

    Example::
        cp_group = init_context_parallel_group(cp_size=4)
        attention = ContextParallelAttention(hidden_size=2048, num_heads=16, cp_group=cp_group)
        y_local = attention(shard_sequence(x, cp_group))      # [B, S / 4, 2048]
    """

    def __init__(self, hidden_size: int, num_heads: int, cp_group=None, num_kv_heads: int | None = None,
                 causal: bool = True, *, rope_theta: float | None = 10000.0, softmax_scale: float | None = None,
                 bias: bool = False) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ContextParallelAttention: {name} must be an int >= 1, got {value!r}")
        if hidden_size % num_heads:
            raise ValueError(f"ContextParallelAttention: num_heads={num_heads} must divide hidden_size={hidden_size}")
        if num_heads % num_kv_heads:
            raise ValueError(f"ContextParallelAttention: num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
        self.head_dim = hidden_size // num_heads
        if rope_theta is not None and self.head_dim % 2:
            raise ValueError(f"ContextParallelAttention: rotary embeddings need an even head dim, got {self.head_dim}")
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.cp_group, self.causal = cp_group, causal
        self.rope_theta, self.softmax_scale = rope_theta, softmax_scale
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=bias)

    def forward(self, hidden_states: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
        """hidden_states [B, S_local, hidden_size] -> [B, S_local, hidden_size]; ``seq_len``: the real
        global length when the sequence was padded (default: no padding)."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"ContextParallelAttention: hidden_states must be [batch, local_seq, {self.hidden_size}], "
                             f"got {tuple(hidden_states.shape)}")
        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.rope_theta is not None:
            from nexus.models.moe.rotary import apply_rotary, rotary_cos_sin

            size, rank = _size_rank(self.cp_group)
            layout = SequenceLayout(seq_len=size * t, cp_size=size, rank=rank, zigzag=self.causal)
            cos, sin = rotary_cos_sin(layout.positions(q.device), self.head_dim, self.rope_theta, dtype=q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = ring_attention(q.contiguous(), k.contiguous(), v.contiguous(), self.cp_group, self.causal,
                             softmax_scale=self.softmax_scale, seq_len=seq_len)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


# ---------------------------------------------------------------------------------------------------
# The MoE model and the Trainer under `distributed: {cp: N}`
# ---------------------------------------------------------------------------------------------------
def apply_context_parallel(model: nn.Module, cp_group) -> nn.Module:
    """Make every ``GroupedQueryAttention`` of ``model`` (trunk and MTP heads) run causal ring attention
    over ``cp_group`` (a ProcessGroup or a 1-D DeviceMesh); returns ``model``. The model is then fed
    this rank's zigzag slice of each sequence with its global positions (:class:`SequenceSplit`).

    Routing Mamba (a scan along the whole sequence) and mixture of depths (top-k over the whole
    sequence) cannot run on a slice: a model with them is refused.
    """
    from nexus.models.moe.attention import GroupedQueryAttention
    from nexus.models.moe.mamba import RoutingMamba
    from nexus.models.moe.mod import MixtureOfDepths

    group = cp_group.get_group() if hasattr(cp_group, "get_group") else cp_group
    found = 0
    for name, module in model.named_modules():
        if isinstance(module, RoutingMamba):
            raise ValueError(f"context parallelism (distributed.cp > 1): {name} is a routing Mamba mixer, whose scan "
                             "runs along the whole sequence; set model.use_mamba: false")
        if isinstance(module, MixtureOfDepths):
            raise ValueError(f"context parallelism (distributed.cp > 1): {name} is mixture of depths, which picks "
                             "tokens over the whole sequence; set model.use_mod: false")
        if isinstance(module, GroupedQueryAttention):
            module.core = RingAttentionCore(group)
            found += 1
    if not found:
        raise ValueError(f"context parallelism: {type(model).__name__} has no GroupedQueryAttention to run as ring "
                         "attention")
    return model


def context_parallel_mesh(ctx):
    """The mesh the data-parallel wrapper spans when cp > 1: the data-parallel dims and ``cp`` together
    (torchtitan's ``dp_shard_cp``), since cp ranks hold the same parameters and their gradients are
    summands of one global mean. 1-D (flattened) for FSDP2 full / shard_grad_op and for DDP."""
    sizes, cfg = ctx.sizes, ctx.config
    if cfg.strategy not in ("fsdp2", "ddp"):
        raise ValueError(f"distributed: context parallelism (cp > 1) runs with strategy fsdp2 or ddp, got "
                         f"{cfg.strategy!r}")
    if cfg.strategy == "fsdp2" and (sizes["dp_replicate"] > 1 or cfg.sharding_strategy in ("hybrid", "no_shard")):
        raise ValueError(f"distributed: context parallelism (cp > 1) with fsdp2 shards over dp_shard x cp; "
                         f"sharding_strategy {cfg.sharding_strategy!r} with dp_replicate={sizes['dp_replicate']} "
                         "is not supported yet: use sharding_strategy full or shard_grad_op, or strategy ddp")
    dims = tuple(d for d in ("dp_replicate", "dp_shard", "cp") if sizes[d] > 1)
    if len(dims) == 1:
        return ctx.mesh[dims[0]]
    return ctx.mesh[dims]._flatten("_".join(dims))


class SequenceSplit:
    """How the Trainer feeds a context-parallel model: each window's sequence split over ``group`` in the
    zigzag layout (padded at the end when ``seq_len`` does not divide), and the losses averaged so that
    the mean over the cp ranks is the global mean over tokens.

    Example::
        split = SequenceSplit(cp_group, seq_len=T)
        ids, positions = split.inputs(window)                 # window [B, T + n_pred] -> [B, T_local], [T_local]
        out = model(ids, positions=positions)
        total, lm, extra = split.loss(out.logits, out.mtp_logits, window)
    """

    def __init__(self, group, seq_len: int) -> None:
        self.group = group
        self.layout = _layout(group, seq_len, zigzag=True)

    def inputs(self, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """window [B, >= seq_len] int64 -> (this rank's tokens [B, T_local], global positions [T_local])."""
        return self.layout.shard(window[:, : self.layout.seq_len]), self.layout.positions(window.device)

    def loss(self, logits: torch.Tensor, mtp_logits, window: torch.Tensor, *, mtp_weight: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """``multi_token_prediction_loss`` on this rank's slice: logits [B, T_local, V] predict the sharded
        ``window[:, t + 1]`` (head k: ``t + 1 + k``); each cross-entropy is this rank's sum over its real
        tokens divided by the global count / P, so the mean over the cp ranks is the global mean.
        Returns (total, next_token_loss, extra_head_losses), float32."""
        t, size = self.layout.seq_len, self.layout.cp_size
        need = t + 1 + len(mtp_logits)
        if window.dim() != 2 or window.shape[1] < need:
            raise ValueError(f"SequenceSplit.loss: window must be [B, >= {need}] for {len(mtp_logits) + 1} heads "
                             f"over seq_len {t}, got {tuple(window.shape)}")
        share = window.shape[0] * t / size

        def ce(lg: torch.Tensor, offset: int) -> torch.Tensor:
            target = self.layout.shard(window[:, offset: offset + t], pad_value=IGNORE_INDEX)
            return F.cross_entropy(lg.float().reshape(-1, lg.shape[-1]), target.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum") / share

        lm = ce(logits, 1)
        extra = [ce(lg, 1 + k) for k, lg in enumerate(mtp_logits, start=1)]
        total = lm + mtp_weight * torch.stack(extra).mean() if extra else lm
        return total, lm, extra

