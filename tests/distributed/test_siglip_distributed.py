"""Chunked SigLIP round a ring of 2 and 4 Gloo ranks against one process on the global batch.

One spawn per world size (``run_distributed_checks``), every check in it. Each rank holds its
slice of a seeded global batch; the parent compares with :func:`siglip_torch_reference` (plain
autograd ops, no custom backward) on the concatenated batch and with the loop formula.

- ``reduction="global"``: every rank's loss equals the global loss; the gradients of its local
  image and text features and of the temperature and bias equal the one-process gradients.
- ``reduction="per_rank"``: the mean over ranks of the losses, and of the temperature and bias
  gradients, equal the global ones, and the feature gradients are world x the global ones: what
  DDP's averaging turns into exactly the global gradients.
- Unequal local batches, float32, a subgroup (``group=``), and a clear error on every rank when
  the ranks disagree on the feature dim.
- Memory: the peak bytes of live tensors allocated by forward + backward on a rank, and the largest
  single tensor, measured by a TorchDispatchMode, for rings of 2, 3 (a subgroup) and 4 ranks:
  the largest tensor is one b x b block of logits, and the peak is the same at 3 and 4 ranks (2
  ranks has no middle ring step, so one [b, d] buffer fewer); measured at b=64, d=16 float32:
  58416, 62512, 62512 bytes, while an all-gather implementation's peak grows with the world
  size (198152 at 2 ranks, 387592 at 4).

Tolerances: float64 results differ from one process only by summation order (the ranks' partial
sums are all-reduced), measured <= 4.5e-16, asserted 1e-12; float32 ranks against the float64
reference measured <= 3.2e-7 (loss ~4), asserted atol 1e-6 + rtol 1e-5.
"""
from __future__ import annotations

import math
import weakref

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from nexus.training.losses import SigmoidContrastiveLoss, sigmoid_contrastive_loss
from tests.distributed.harness import run_distributed_checks
from tests.training.test_losses import siglip_formula, siglip_torch_reference

D = 6
TEMPERATURE, BIAS = 0.25, -3.0  # moderate logits so every pair contributes to the gradients
F64 = dict(atol=1e-12, rtol=1e-12)
MEM_B, MEM_D = 64, 16  # logits block 64 x 64 float32 = 16 KiB dominates the [b, d] feature tensors
UNEQUAL = {2: [3, 5], 4: [2, 4, 1, 3]}


def _global_batch(sizes: list[int], dtype=torch.float64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    return torch.randn(n, D, generator=g, dtype=dtype), torch.randn(n, D, generator=g, dtype=dtype)


def _local(sizes: list[int], rank: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _global_batch(sizes, dtype)
    lo = sum(sizes[:rank])
    return (x[lo:lo + sizes[rank]].clone().requires_grad_(),
            y[lo:lo + sizes[rank]].clone().requires_grad_())


def _run_module(loss_fn: SigmoidContrastiveLoss, x: torch.Tensor, y: torch.Tensor) -> dict:
    loss = loss_fn(x, y)
    loss.backward()
    return dict(loss=loss.item(), dx=x.grad, dy=y.grad, dscale=loss_fn.logit_scale.grad.item(),
                dbias=loss_fn.logit_bias.grad.item())


def _equal_sizes(world: int) -> list[int]:
    return [3] * world


# ---- checks, run in every rank ---------------------------------------------------------------


def check_global_float64(rank, world):
    x, y = _local(_equal_sizes(world), rank)
    return _run_module(SigmoidContrastiveLoss(TEMPERATURE, BIAS, dtype=torch.float64), x, y)


def check_per_rank_float64(rank, world):
    x, y = _local(_equal_sizes(world), rank)
    return _run_module(SigmoidContrastiveLoss(TEMPERATURE, BIAS, reduction="per_rank", dtype=torch.float64), x, y)


def check_unequal_local_batches(rank, world):
    x, y = _local(UNEQUAL[world], rank)
    return _run_module(SigmoidContrastiveLoss(TEMPERATURE, BIAS, dtype=torch.float64), x, y)


def check_float32(rank, world):
    x, y = _local(_equal_sizes(world), rank, dtype=torch.float32)
    return _run_module(SigmoidContrastiveLoss(TEMPERATURE, BIAS), x, y)


def check_seed_example(rank, world):
    # seed 000's example as written, under an initialised process group (default group)
    image_features, text_features = _local(_equal_sizes(world), rank, dtype=torch.float32)
    loss_fn = SigmoidContrastiveLoss(temperature=0.1)
    loss = loss_fn(image_features, text_features)
    return loss.item()


def check_subgroups(rank, world):
    """Two groups of world/2 ranks, each a ring of its own over its own global batch."""
    half = world // 2
    groups = [dist.new_group(list(range(0, half))), dist.new_group(list(range(half, world)))]
    mine = groups[rank // half]
    sizes = [3] * half
    x, y = _local(sizes, rank % half)
    if rank >= half:
        x, y = (x * 2 + 1).detach().requires_grad_(), (y - 1).detach().requires_grad_()  # the other group differs
    return _run_module(SigmoidContrastiveLoss(TEMPERATURE, BIAS, dtype=torch.float64, group=mine), x, y)


def check_feature_dim_mismatch_raises(rank, world):
    x = torch.randn(3, D + (rank == world - 1))
    try:
        sigmoid_contrastive_loss(x, x.clone(), 0.0, 0.0)
    except ValueError as exc:
        return str(exc)
    return None


class _LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of live storages created by ops inside the mode, and the largest one."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = self.largest = 0

    def _freed(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self.live:
                    self.live[key] = nbytes
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
                    self.largest = max(self.largest, nbytes)
                    weakref.finalize(storage, self._freed, key)  # runs when the storage is freed
        return out


def _all_gather_siglip(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The usual implementation (open_clip): gather every rank's texts, one [b, world * b] logits."""
    ys = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(ys, y.detach())
    ys[dist.get_rank()] = y
    x = torch.nn.functional.normalize(x, dim=-1)
    texts = torch.nn.functional.normalize(torch.cat(ys), dim=-1)
    logits = scale.exp() * x @ texts.T + bias
    labels = -torch.ones_like(logits)
    labels[:, dist.get_rank() * len(x):(dist.get_rank() + 1) * len(x)].fill_diagonal_(1)
    return -torch.nn.functional.logsigmoid(labels * logits).sum() / len(x)


def _measure(loss_of, rank: int) -> dict:
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(MEM_B, MEM_D, generator=g).requires_grad_()
    y = torch.randn(MEM_B, MEM_D, generator=g).requires_grad_()
    loss_fn = SigmoidContrastiveLoss()
    with _LiveTensorBytes() as mem:
        loss = loss_of(loss_fn, x, y)
        loss.backward()
        del loss
    return dict(peak=mem.peak, largest=mem.largest)


def check_memory(rank, world):
    """Per-rank peak bytes: the ring over 2, 3 (a subgroup) and ``world`` ranks, and all-gather."""
    ring_sizes = [2, 3, 4] if world == 4 else [2]
    groups = {n: dist.new_group(list(range(n))) if n < world else None for n in ring_sizes}  # every rank calls
    out = {"ring": {}}
    for n, group in groups.items():
        if rank < n:
            out["ring"][n] = _measure(lambda f, x, y: sigmoid_contrastive_loss(
                x, y, f.logit_scale, f.logit_bias, group=group), rank)
    out["all_gather"] = _measure(lambda f, x, y: _all_gather_siglip(x, y, f.logit_scale, f.logit_bias), rank)
    return out


CHECKS = [check_global_float64, check_per_rank_float64, check_unequal_local_batches, check_float32,
          check_seed_example, check_subgroups, check_feature_dim_mismatch_raises, check_memory]


@pytest.fixture(scope="module")
def runs():
    return {world: run_distributed_checks(CHECKS, world_size=world, timeout=240) for world in (2, 4)}


# ---- the one-process reference -----------------------------------------------------------------


def _reference(x: torch.Tensor, y: torch.Tensor, dtype=torch.float64) -> dict:
    x, y = x.clone().to(dtype).requires_grad_(), y.clone().to(dtype).requires_grad_()
    scale = torch.tensor(math.log(1 / TEMPERATURE), dtype=dtype, requires_grad=True)
    bias = torch.tensor(BIAS, dtype=dtype, requires_grad=True)
    loss = siglip_torch_reference(x, y, scale, bias)
    loss.backward()
    return dict(loss=loss.item(), dx=x.grad, dy=y.grad, dscale=scale.grad.item(), dbias=bias.grad.item())


def _assert_equals_one_process(results: list[dict], sizes: list[int], x: torch.Tensor, y: torch.Tensor,
                               tol=F64) -> None:
    ref = _reference(x, y)
    formula = siglip_formula(x.double().numpy(), y.double().numpy(), 1 / TEMPERATURE, BIAS)
    assert ref["loss"] == pytest.approx(formula, rel=1e-12)
    for r in results:
        assert r["loss"] == pytest.approx(ref["loss"], rel=tol["rtol"], abs=tol["atol"])
        assert r["dscale"] == pytest.approx(ref["dscale"], rel=tol["rtol"], abs=tol["atol"])
        assert r["dbias"] == pytest.approx(ref["dbias"], rel=tol["rtol"], abs=tol["atol"])
    assert [len(r["dx"]) for r in results] == sizes
    torch.testing.assert_close(torch.cat([r["dx"] for r in results]).double(), ref["dx"], **tol)
    torch.testing.assert_close(torch.cat([r["dy"] for r in results]).double(), ref["dy"], **tol)


WORLDS = [pytest.param(2, id="2ranks"), pytest.param(4, id="4ranks")]


@pytest.mark.parametrize("world", WORLDS)
def test_global_loss_and_gradients_equal_one_process(runs, world):
    sizes = _equal_sizes(world)
    _assert_equals_one_process(runs[world]["check_global_float64"], sizes, *_global_batch(sizes))


@pytest.mark.parametrize("world", WORLDS)
def test_unequal_local_batches_equal_one_process(runs, world):
    sizes = UNEQUAL[world]
    _assert_equals_one_process(runs[world]["check_unequal_local_batches"], sizes, *_global_batch(sizes))


@pytest.mark.parametrize("world", WORLDS)
def test_float32_equals_one_process(runs, world):
    sizes = _equal_sizes(world)
    _assert_equals_one_process(runs[world]["check_float32"], sizes, *_global_batch(sizes, torch.float32),
                               tol=dict(atol=1e-6, rtol=1e-5))


@pytest.mark.parametrize("world", WORLDS)
def test_per_rank_reduction_averages_to_the_global_loss_and_gradients(runs, world):
    sizes = _equal_sizes(world)
    results = runs[world]["check_per_rank_float64"]
    ref = _reference(*_global_batch(sizes))
    losses = [r["loss"] for r in results]
    assert len(set(losses)) == world  # each rank reports its own rows' loss, 1/b * sum over its rows
    assert sum(losses) / world == pytest.approx(ref["loss"], rel=1e-12)
    # DDP averages gradients over ranks: the averages must be the global gradients
    assert sum(r["dscale"] for r in results) / world == pytest.approx(ref["dscale"], rel=1e-12)
    assert sum(r["dbias"] for r in results) / world == pytest.approx(ref["dbias"], rel=1e-12)
    torch.testing.assert_close(torch.cat([r["dx"] for r in results]) / world, ref["dx"], **F64)
    torch.testing.assert_close(torch.cat([r["dy"] for r in results]) / world, ref["dy"], **F64)


@pytest.mark.parametrize("world", WORLDS)
def test_seed_example_returns_the_global_loss(runs, world):
    x, y = _global_batch(_equal_sizes(world), torch.float32)
    expected = siglip_formula(x.double().numpy(), y.double().numpy(), 10.0, -10.0)
    assert runs[world]["check_seed_example"] == pytest.approx([expected] * world, rel=1e-5)


@pytest.mark.parametrize("world", WORLDS)
def test_subgroups_each_equal_their_own_one_process_loss(runs, world):
    half = world // 2
    results = runs[world]["check_subgroups"]
    x, y = _global_batch([3] * half)
    _assert_equals_one_process(results[:half], [3] * half, x, y)
    _assert_equals_one_process(results[half:], [3] * half, x * 2 + 1, y - 1)


@pytest.mark.parametrize("world", WORLDS)
def test_feature_dim_mismatch_is_a_clear_error_on_every_rank(runs, world):
    messages = runs[world]["check_feature_dim_mismatch_raises"]
    assert all(m is not None and "disagree on feature dim" in m for m in messages), messages


def test_per_rank_memory_is_flat_in_world_size(runs):
    """Peak live bytes of forward + backward, per rank: the ring's do not grow with the world size."""
    logits_block = MEM_B * MEM_B * 4
    ring: dict[int, int] = {}
    for world in (2, 4):
        for rank_mem in runs[world]["check_memory"]:
            for n, m in rank_mem["ring"].items():
                assert m["largest"] == logits_block  # one b x b block of logits at a time
                ring[n] = max(ring.get(n, 0), m["peak"])
            assert rank_mem["all_gather"]["largest"] == world * logits_block
    gathered = {world: max(m["all_gather"]["peak"] for m in runs[world]["check_memory"]) for world in (2, 4)}
    print(f"\nper-rank peak bytes, b={MEM_B} d={MEM_D} float32: ring {ring}, all-gather {gathered}")
    assert ring[4] == ring[3], ring
    assert ring[2] <= ring[3], ring
    # two b x b temporaries and a handful of [b, d] chunks (own features, dx, ring buffers in flight)
    feature_chunk = MEM_B * MEM_D * 4
    assert ring[4] <= 2 * logits_block + 8 * feature_chunk, ring
    # the measurement sees growth where there is some: the all-gather version's peak scales with world
    assert gathered[4] > 1.7 * gathered[2], gathered
