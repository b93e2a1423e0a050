"""Context parallelism: ring attention and the MoE model trained with `distributed: {cp: N}`.

One 4-rank Gloo spawn runs every multi-process check: rings over the whole world (P = 4) and over
two groups of 2 (a dp 2 x cp 2 split), and the Trainer on a dp 2 x cp 2 mesh. The oracle is
``torch.nn.functional.scaled_dot_product_attention`` on the whole sequence in float64 (ring
outputs and q/k/v gradients), one process for the modules and the Trainer. The one-rank cases run
in this process, without a process group.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from nexus.training.distributed.context_parallelism import (
    ContextParallelAttention, SequenceLayout, SequenceSplit, gather_sequence, init_context_parallel_group,
    ring_attention, shard_batch, shard_sequence)
from nexus_kernels import forced
from tests.distributed.harness import run_distributed
from tests.distributed.models import spawns

# (causal, real length, query heads, kv heads): zigzag and contiguous, lengths that divide 2P and
# odd ones that are padded, multi-head and grouped-query
RING_CASES = [(True, 32, 4, 2), (False, 32, 4, 4), (True, 13, 4, 1), (False, 13, 2, 2), (True, 7, 2, 1)]
INTERPRET_CASES = [(True, 32, 4, 2), (False, 13, 2, 2)]  # float32 through the Triton source (interpreter)
TRAIN_STEPS = 3
TRAIN_LAYOUTS = {  # the `distributed:` sections trained at 4 ranks
    "dp2_cp2": "{cp: 2}",  # gradients averaged by FSDP2 over the flattened dp_shard x cp mesh
    "tp2_cp2_checkpointed": "{tp: 2, cp: 2, activation_checkpointing: true}",  # ring over tp's head shards, recomputed
}


def _oracle(q, k, v, causal):
    """Full attention of the whole sequence, K/V repeated for grouped heads (float64 SDPA)."""
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                          is_causal=causal)


def _inputs(seed, s, hq, hkv, d=16, b=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g, dtype=torch.float64).to(dtype) for h in (hq, hkv, hkv, hq)]


def _ring_errors(group, causal, s, hq, hkv, seed=0, dtype=torch.float64):
    """Max |ring - oracle| of the output and of each gradient, over the real tokens, this group's view."""
    q, k, v, grad = _inputs(seed, s, hq, hkv, dtype=dtype)
    full = [t.detach().clone().double().requires_grad_() for t in (q, k, v)]
    want = _oracle(*full, causal)
    want.backward(grad.double())
    local = [shard_sequence(t, group, dim=2, zigzag=causal).requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, group, causal, seq_len=s)
    out.backward(shard_sequence(grad, group, dim=2, zigzag=causal))
    got = [out.detach()] + [t.grad for t in local]
    got = [gather_sequence(t, group, seq_len=s, dim=2, zigzag=causal).double() for t in got]
    expected = [want.detach()] + [t.grad for t in full]
    return [(a - b).abs().max().item() for a, b in zip(got, expected)], [b.abs().max().item() for b in expected]


def _relative_rms(got, want):
    return ((got.double() - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item()


def _bf16_errors(group):
    """Relative RMS error of the bf16 ring (output, dq, dk, dv) vs float64 attention of the same bf16 inputs."""
    q, k, v, grad = _inputs(1, 256, 4, 2, d=32, b=1, dtype=torch.bfloat16)
    full = [t.double().requires_grad_() for t in (q, k, v)]
    want = _oracle(*full, True)
    want.backward(grad.double())
    local = [shard_sequence(t, group, dim=2).requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, group, True)
    out.backward(shard_sequence(grad, group, dim=2))
    got = [gather_sequence(t, group, dim=2) for t in [out.detach()] + [t.grad for t in local]]
    return [_relative_rms(a, b) for a, b in zip(got, [want.detach()] + [t.grad for t in full])]


def _saved_bytes(module, x):
    """Bytes of the tensors autograd saves in one forward of ``module`` (parameters excluded), by storage."""
    params = {p.data_ptr() for p in module.parameters()}
    storages = {}

    def pack(t):
        if t.data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


def _module(group, causal, seed=0):
    torch.manual_seed(seed)
    return ContextParallelAttention(hidden_size=32, num_heads=4, cp_group=group, num_kv_heads=2,
                                    causal=causal).double()


def _module_vs_one_rank(group, one, causal, s=13):
    """Output, input gradient and parameter gradients of the module on ``group`` vs the same weights on one rank."""
    g = torch.Generator().manual_seed(5)
    x, up = torch.randn(2, s, 32, generator=g, dtype=torch.float64), torch.randn(2, s, 32, generator=g,
                                                                                  dtype=torch.float64)
    ref = _module(one, causal)
    xr = x.clone().requires_grad_()
    y_ref = ref(xr)
    y_ref.backward(up)
    mod = _module(group, causal)
    xl = shard_sequence(x, group, zigzag=causal).requires_grad_()
    y = mod(xl, seq_len=s)
    y.backward(shard_sequence(up, group, zigzag=causal))
    for p in mod.parameters():  # each rank holds its tokens' share of every weight gradient
        dist.all_reduce(p.grad, group=group)
    errors = {"out": (gather_sequence(y.detach(), group, s, zigzag=causal) - y_ref).abs().max().item(),
              "x.grad": (gather_sequence(xl.grad, group, s, zigzag=causal) - xr.grad).abs().max().item()}
    for (name, p), r in zip(mod.named_parameters(), ref.parameters()):
        errors[name] = (p.grad - r.grad).abs().max().item()
    return errors


def _train(path: Path):
    from torch.distributed.tensor import DTensor

    from nexus.config import load_config
    from nexus.training.run import build_trainer

    trainer = build_trainer(load_config(path))
    trainer.train()
    params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for n, p in trainer.unwrapped_model.named_parameters()}
    return params, trainer.evaluate()["val_loss"], trainer.context_parallel is not None


def _rank_checks(rank, world_size, run_files):
    """Everything multi-process, in one spawn of 4 ranks: the ring's blocks through the attention kernel's
    Triton source (interpreter) once, then through its torch reference (fast)."""
    results = {}
    world = init_context_parallel_group(world_size)
    pairs = init_context_parallel_group(2)  # {0, 1} and {2, 3}: dp 2 x cp 2
    one = init_context_parallel_group(1)
    results["pair_ranks"] = dist.get_process_group_ranks(pairs)
    results["interpret"] = [_ring_errors(world, *case, dtype=torch.float32) for case in INTERPRET_CASES]
    with forced("reference"):
        _reference_checks(results, world, pairs, one, run_files)
    return results


def _reference_checks(results, world, pairs, one, run_files):
    for name, group in (("ring4", world), ("ring2", pairs)):
        results[name] = [_ring_errors(group, *case) for case in RING_CASES]
    results["bf16"] = {p: _bf16_errors(g) for p, g in ((1, one), (2, pairs), (4, world))}
    x = torch.randn(1, 64, 32, dtype=torch.float64)
    results["saved_bytes"] = {p: _saved_bytes(_module(g, True), shard_sequence(x, g))
                              for p, g in ((1, one), (2, pairs), (4, world))}
    results["module"] = {causal: _module_vs_one_rank(pairs, one, causal) for causal in (True, False)}
    dist.barrier()
    results["train"] = {name: _train(path) for name, path in run_files.items()}


@pytest.fixture(scope="module")
def run_files(small_run):
    """The small run without routing Mamba and mixture of depths (they need the whole sequence) and without
    the load-balance loss (a product of two batch means, which depends on how the batch is split)."""
    def write(name, distributed):
        path = small_run(name)
        text = (path.read_text()
                .replace("n_pred_tokens: 2}", "n_pred_tokens: 2, use_mamba: false, use_mod: false, "
                                              "balance_loss_weight: 0.0}")
                .replace("max_steps: 6", f"max_steps: {TRAIN_STEPS}").replace("eval_interval: 3", "eval_interval: 100")
                .replace("save_interval: 3", "save_interval: 100"))
        path.write_text(text + (f"distributed: {distributed}\n" if distributed else ""))
        return path

    layouts = {layout: write(f"cp_{layout}", section) for layout, section in TRAIN_LAYOUTS.items()}
    return write("cp_single", None), layouts


@pytest.fixture(scope="module")
def four_ranks(run_files):
    return run_distributed(_rank_checks, 4, args=(run_files[1],), timeout=600)


@pytest.fixture(scope="module")
def single_run(run_files):
    return _train(run_files[0])


def _metric(path: Path, key: str) -> list[float]:
    name = path.stem
    lines = (path.parent / name / "metrics.jsonl").read_text().splitlines()
    return [r[key] for r in map(json.loads, lines) if key in r]


# ---------------------------------------------------------------------------------------------------
# One process
# ---------------------------------------------------------------------------------------------------
def test_zigzag_layout_holds_chunks_i_and_2p_minus_1_minus_i_and_pads_at_the_end():
    layouts = [SequenceLayout(seq_len=13, cp_size=4, rank=r) for r in range(4)]
    assert layouts[0].chunk == 2 and layouts[0].padded_len == 16
    assert [layout.positions().tolist() for layout in layouts] == [
        [0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
    contiguous = SequenceLayout(seq_len=10, cp_size=4, rank=3, zigzag=False)
    assert contiguous.positions().tolist() == [9, 10, 11]
    # every global position exactly once
    assert sorted(sum((layout.positions().tolist() for layout in layouts), [])) == list(range(16))
    with pytest.raises(ValueError, match="rank"):
        SequenceLayout(seq_len=8, cp_size=2, rank=2)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_one_rank_ring_is_plain_attention(causal):
    errors, scale = _ring_errors(None, causal, 9, 4, 2)
    assert max(errors) < 1e-12 * max(scale), errors


def test_one_rank_module_and_batch_helpers():
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    mod = _module(None, True)
    assert mod(x).shape == (2, 9, 32)
    ids = torch.arange(18).view(2, 9)
    local = shard_batch(ids, None, labels=ids + 1)
    assert torch.equal(local["input_ids"], ids) and local["positions"].tolist() == list(range(9))
    assert torch.equal(local["labels"], ids + 1)


def test_sequence_split_loss_is_the_global_mean_over_tokens():
    """Two cp ranks (simulated: each rank's layout set by hand), seq_len 10 over 4 chunks of 3 (2 padded
    positions): the mean of their losses is multi_token_prediction_loss on the whole window."""
    from nexus.training.losses import multi_token_prediction_loss

    t, v = 10, 7
    window = torch.randint(0, v, (3, t + 2))
    logits, extra = torch.randn(3, t, v), torch.randn(3, t, v)
    want_total, want_lm, _ = multi_token_prediction_loss(logits, [extra], window, mtp_weight=0.5)
    totals, lms = [], []
    for rank in range(2):
        split = SequenceSplit(None, t)
        split.layout = SequenceLayout(seq_len=t, cp_size=2, rank=rank)
        ids, positions = split.inputs(window)
        assert ids.shape == (3, 6) and torch.equal(positions, split.layout.positions())
        total, lm, _ = split.loss(split.layout.shard(logits, pad_value=1e4), [split.layout.shard(extra)], window,
                                  mtp_weight=0.5)  # padded rows' logits are huge: they must not count
        totals.append(total.item())
        lms.append(lm.item())
    assert math.isclose(sum(totals) / 2, want_total.item(), rel_tol=1e-6)
    assert math.isclose(sum(lms) / 2, want_lm.item(), rel_tol=1e-6)


def test_what_cannot_run_on_a_slice_of_the_sequence_is_refused_by_name():
    from nexus.models.moe import MoEConfig, MoETransformer
    from nexus.training.distributed.context_parallelism import apply_context_parallel, context_parallel_mesh
    from nexus.training.distributed.mesh import DistributedConfig, ParallelContext

    small = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32, n_experts=4, max_seq_len=16,
                 mamba_head_dim=16, mamba_d_state=8, mamba_chunk_size=8, mamba_layer_interval=2, mod_layer_interval=2)
    with pytest.raises(ValueError, match="use_mamba"):
        apply_context_parallel(MoETransformer(MoEConfig(**small, use_mod=False)), None)
    with pytest.raises(ValueError, match="use_mod"):
        apply_context_parallel(MoETransformer(MoEConfig(**small, use_mamba=False)), None)
    for config, match in ((DistributedConfig(cp=2, dp_shard=1, dp_replicate=2, sharding_strategy="hybrid"), "hybrid"),
                          (DistributedConfig(cp=2, strategy="zero"), "zero")):
        ctx = ParallelContext(config=config, sizes=config.sizes(4))
        with pytest.raises(ValueError, match=match):
            context_parallel_mesh(ctx)


# ---------------------------------------------------------------------------------------------------
# Four ranks
# ---------------------------------------------------------------------------------------------------
@spawns
@pytest.mark.parametrize("ring", ["ring4", "ring2"])
@pytest.mark.parametrize("case", RING_CASES, ids=[f"{'causal' if c else 'full'}-S{s}-H{h}-KV{kv}"
                                                  for c, s, h, kv in RING_CASES])
def test_ring_attention_equals_full_attention_in_float64(four_ranks, ring, case):
    for rank, results in enumerate(four_ranks):
        errors, scale = results[ring][RING_CASES.index(case)]
        for name, err, mag in zip(("out", "dq", "dk", "dv"), errors, scale):
            assert err < 1e-12 * max(mag, 1.0), (rank, name, err, mag)


@spawns
@pytest.mark.parametrize("case", INTERPRET_CASES, ids=[f"{'causal' if c else 'full'}-S{s}-H{h}-KV{kv}"
                                                       for c, s, h, kv in INTERPRET_CASES])
def test_ring_attention_through_the_kernel_source_in_float32(four_ranks, case):
    for rank, results in enumerate(four_ranks):
        errors, scale = results["interpret"][INTERPRET_CASES.index(case)]
        for name, err, mag in zip(("out", "dq", "dk", "dv"), errors, scale):
            assert err < 2e-5 * max(mag, 1.0), (rank, name, err, mag)


@spawns
def test_groups_of_two_are_consecutive_ranks(four_ranks):
    assert [r["pair_ranks"] for r in four_ranks] == [[0, 1], [0, 1], [2, 3], [2, 3]]


@spawns
def test_bf16_ring_error_does_not_grow_with_the_ring(four_ranks):
    """fp32 partials and travelling dK/dV: 4 ranks' bf16 error within 1.5x of one rank's (same bf16 inputs,
    same float64 oracle); one rank's error is itself bf16-sized (rounding the output once)."""
    errors = four_ranks[0]["bf16"]
    for name, one, two, four in zip(("out", "dq", "dk", "dv"), errors[1], errors[2], errors[4]):
        assert one < 1e-2, (name, one)
        assert two <= 1.5 * one and four <= 1.5 * one, (name, one, two, four)


@spawns
def test_attention_activation_memory_falls_linearly_with_the_ring(four_ranks):
    saved = four_ranks[0]["saved_bytes"]
    assert saved[1] > 0
    for p in (2, 4):  # every saved activation scales with the local sequence
        assert saved[p] * p == pytest.approx(saved[1], rel=0.02), saved


@spawns
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_context_parallel_attention_at_two_ranks_equals_one_rank(four_ranks, causal):
    for rank, results in enumerate(four_ranks):
        errors = results["module"][causal]
        assert max(errors.values()) < 1e-12, (rank, errors)


@spawns
@pytest.mark.parametrize("layout", list(TRAIN_LAYOUTS))
def test_training_with_cp_2_matches_one_process(four_ranks, single_run, run_files, layout):
    params, val_loss, used = four_ranks[0]["train"][layout]
    ref_params, ref_val, ref_used = single_run
    assert used and not ref_used
    single, split = run_files[0], run_files[1][layout]
    losses, ref_losses = _metric(split, "lm_loss"), _metric(single, "lm_loss")
    assert len(losses) == len(ref_losses) == TRAIN_STEPS
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < 1e-5, (losses, ref_losses)
    assert abs(val_loss - ref_val) < 1e-5, (val_loss, ref_val)
    assert params.keys() == ref_params.keys()
    worst = max((params[n] - ref_params[n]).abs().max().item() for n in params)
    assert worst < 1e-5, worst
    for rank_results in four_ranks[1:]:  # every rank holds the same model
        assert all(torch.equal(rank_results["train"][layout][0][n], params[n]) for n in params)
