"""FP8, MXFP8 and FP4 layers under FSDP2 (2 Gloo ranks) against one process on the whole batch.

Each rank trains on its half of a global batch (loss = mean over the half; FSDP2 averages gradients).
One process sees the whole batch, so its input amax is the max of the two halves' amaxes and its
output gradients are the ranks' halves divided by 2 (the mean runs over twice the rows).

Why the parameters can match far below the formats' precision: with amaxes all-reduced (MAX) every
rank scales by exactly the scales of the one process (a gradient's amax and scale differ by the
exact factor 2, which moves no mantissa bit), so each rank quantizes its rows to the very values the
one process gets for them, and only fp32 summation order differs, as in plain FSDP2 (whose test
bounds AdamW parameters after a few steps at lr 1e-2 by 5e-5). That order difference can still
flip the rounding of a rare element to the next grid point of the format, a relative step of
2**-m for m mantissa bits; so the bound is 5e-5 scaled by the coarsest format's step relative to
E4M3's (m = 3): ``param_atol`` gives 1e-4 for FP8 HYBRID and MXFP8 (E5M2 gradients, m = 2) and
2e-4 for FP4 (E2M1, m = 1). Measured: 1.7e-6 (FP8 MoE), 1.5e-8 (MXFP8), 1.2e-5 (FP4).
Without the reduction each rank picks its own scale from its own half and rounds differently by up
to that step: the same runs with the reduction switched off (``set_amax_reduction(enabled=False)``)
must miss the bound by 100x or more (measured: 0.033 FP8, 0.058 FP4, about lr) and keep different
amax histories per rank: the control that shows the comparison can fail.

Layers: FP8Linear (HYBRID, delayed scaling) in the tiny MoE transformer, with routing steered so that
an expert gets no tokens on one rank (its 0-row forward and backward must still join the amax
all-reduces, or the ranks hang); MXFP8Linear (E8M0 blocks of 32) and FP4Linear (one float32 scale
per tensor, round-to-nearest gradients) in a small MLP, 64 rows per rank: a multiple of 32, so the
weight-gradient blocks along the tokens fall as in one process.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from nexus.models.moe import MoEConfig, MoEFeedForward, MoETransformer
from nexus.training.losses import multi_token_prediction_loss
from nexus.training.mixed_precision import (
    FP4Config,
    FP4Linear,
    FP8Format,
    FP8Linear,
    MXFP8Config,
    MXFP8Linear,
    convert_to_fp4,
    convert_to_fp8,
    convert_to_mxfp8,
    fp8_linear,
    mx_linear,
)
from nexus.training.mixed_precision.fp8 import set_amax_reduction
from nexus_kernels._backend import forced
from tests.distributed.harness import run_distributed_checks
from tests.distributed.models import MOE_CONFIG, spawns, steer_experts, zero_fill_missing_grads




CONFIG = MOE_CONFIG
SEQ, GLOBAL_SEQUENCES, GLOBAL_ROWS, STEPS, LR = 16, 4, 128, 3, 1e-2
HALF = CONFIG["vocab_size"] // 2
WORLD = 2
MANTISSA_BITS = {"fp8": 2, "mxfp8": 2, "fp4": 1}  # the coarsest element format each layer kind uses


def param_atol(kind: str) -> float:
    """5e-5 (plain FSDP2's bound) times the coarsest format's grid step relative to E4M3's (docstring)."""
    return 5e-5 * 2.0 ** (3 - MANTISSA_BITS[kind])


# ---------------------------------------------------------------------------------------------
# models and data (the same code in the ranks and in the parent)


def fp8_moe() -> MoETransformer:
    """The MoE model with FP8 linears; MoE expert 3 scores +2 x[0], and embedding dim 0 is +4 for token ids
    < HALF, -4 otherwise, so a rank fed only high-half tokens leaves expert 3 idle."""
    torch.manual_seed(0)
    return convert_to_fp8(steer_experts(MoETransformer(MoEConfig(**CONFIG)), HALF, rom=False), FP8Format.HYBRID)


def mlp(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32))
    if kind == "mxfp8":
        return convert_to_mxfp8(model, MXFP8Config(block_size=32), skip=())
    return convert_to_fp4(model, FP4Config(use_microscaling=False, stochastic_rounding=False), skip=())


def make_model(kind: str) -> nn.Module:
    return fp8_moe() if kind == "fp8" else mlp(kind)


def blocks_of(model: nn.Module) -> list[nn.Module]:
    return list(model.layers) if isinstance(model, MoETransformer) else [m for m in model if len(list(m.parameters()))]


def global_batch(kind: str, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + step)
    if kind != "fp8":
        return torch.randn(GLOBAL_ROWS, 64, generator=gen)
    window = torch.randint(0, CONFIG["vocab_size"], (GLOBAL_SEQUENCES, SEQ + CONFIG["n_pred_tokens"]), generator=gen)
    window[GLOBAL_SEQUENCES // 2:] = window[GLOBAL_SEQUENCES // 2:] % HALF + HALF  # rank 1: high half only
    return window


def loss_of(kind: str, model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    if kind != "fp8":
        return (model(rows) - 0.1).square().mean()
    out = model(rows[:, :SEQ])
    return multi_token_prediction_loss(out.logits, out.mtp_logits, rows)[0] + out.aux_loss


def amax_histories(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: torch.stack(m.amax_histories).clone() for name, m in model.named_modules()
            if isinstance(m, FP8Linear)}


def train(kind: str, model: nn.Module, take=lambda rows: rows) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    with forced("reference"):
        for step in range(STEPS):
            loss_of(kind, model, take(global_batch(kind, step))).backward()
            zero_fill_missing_grads(model)
            opt.step()
            opt.zero_grad(set_to_none=True)


def reference(kind: str) -> dict:
    model = make_model(kind)
    train(kind, model)
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "amax": amax_histories(model)}


# ---------------------------------------------------------------------------------------------
# rank side


def train_sharded(rank: int, world_size: int, kind: str, reduce: bool = True) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp_shard",))
    model = make_model(kind)
    set_amax_reduction(model, mesh if reduce else None, enabled=reduce)
    seen_weights, idle = [], []
    for module in model.modules():
        if isinstance(module, (FP8Linear, MXFP8Linear, FP4Linear)):
            module.register_forward_pre_hook(lambda mod, args: seen_weights.append(type(mod.weight).__name__))
        if isinstance(module, MoEFeedForward):
            def hook(mod, args, logits, k=module.top_k):
                chosen = set(logits.topk(k, dim=-1).indices.flatten().tolist())
                idle.append(sorted(set(range(logits.shape[-1])) - chosen))
            module.router.register_forward_hook(hook)
    for block in blocks_of(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.set_reduce_scatter_unused_params(True)  # an idle expert sends zeros
    per = (GLOBAL_SEQUENCES if kind == "fp8" else GLOBAL_ROWS) // world_size
    train(kind, model, lambda rows: rows[rank * per:(rank + 1) * per])
    params = {n: p.full_tensor() for n, p in model.named_parameters()}  # collective: every rank
    return {"params": params if rank == 0 else None, "amax": amax_histories(model),
            "weights_seen_in_forward": sorted(set(seen_weights)),
            "sharded_outside_forward": all(isinstance(p, DTensor) for p in model.parameters()),
            "idle_experts": any(ids for ids in idle)}


def fp8_moe_reduced(rank, world_size):
    return train_sharded(rank, world_size, "fp8")


def fp8_moe_not_reduced(rank, world_size):
    return train_sharded(rank, world_size, "fp8", reduce=False)


def mxfp8_mlp(rank, world_size):
    return train_sharded(rank, world_size, "mxfp8")


def fp4_per_tensor_reduced(rank, world_size):
    return train_sharded(rank, world_size, "fp4")


def fp4_per_tensor_not_reduced(rank, world_size):
    return train_sharded(rank, world_size, "fp4", reduce=False)


def dtensor_weights_are_refused(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    weight = distribute_tensor(torch.randn(32, 64), mesh, [Shard(0)])
    errors = {}
    for name, call in (("fp8", lambda: fp8_linear(torch.randn(4, 64), weight)),
                       ("mx", lambda: mx_linear(torch.randn(4, 64), weight, None, MXFP8Config().spec))):
        try:
            call()
            errors[name] = None
        except ValueError as exc:
            errors[name] = str(exc)
    return errors


CHECKS = (fp8_moe_reduced, fp8_moe_not_reduced, mxfp8_mlp, fp4_per_tensor_reduced, fp4_per_tensor_not_reduced,
          dtensor_weights_are_refused)


# ---------------------------------------------------------------------------------------------
# parent side


@pytest.fixture(scope="module")
def ranks():
    return run_distributed_checks(CHECKS, world_size=WORLD, timeout=600)


_references: dict = {}


def cached_reference(kind: str) -> dict:
    if kind not in _references:
        _references[kind] = reference(kind)
    return _references[kind]


def max_difference(got: dict, want: dict) -> tuple[float, str]:
    assert got.keys() == want.keys()
    return max(((got[n] - want[n]).abs().max().item(), n) for n in want)


@pytest.mark.parametrize("check, kind", [("fp8_moe_reduced", "fp8"), ("mxfp8_mlp", "mxfp8"),
                                         ("fp4_per_tensor_reduced", "fp4")])
@spawns
def test_two_ranks_match_one_process(ranks, check, kind):
    worst, where = max_difference(ranks[check][0]["params"], cached_reference(kind)["params"])
    print(f"{check}: max abs difference from one process {worst:.3g} ({where})")
    assert worst <= param_atol(kind), f"{where} differs from one process by {worst:.3g} > {param_atol(kind)}"


@spawns
@pytest.mark.parametrize("check, kind", [("fp8_moe_not_reduced", "fp8"), ("fp4_per_tensor_not_reduced", "fp4")])
def test_without_amax_reduction_the_ranks_drift_from_one_process(ranks, check, kind):
    """The control: the same runs, each rank scaling by its own amaxes, miss the bound by far."""
    worst, where = max_difference(ranks[check][0]["params"], cached_reference(kind)["params"])
    print(f"{check}: max abs difference from one process {worst:.3g} ({where})")
    assert worst > 100 * param_atol(kind)


@spawns
def test_amax_histories_agree_across_ranks_and_with_one_process(ranks):
    rank0, rank1 = ranks["fp8_moe_reduced"]
    assert rank0["amax"].keys() == rank1["amax"].keys() and len(rank0["amax"]) > 10
    for name, history in rank0["amax"].items():
        assert torch.equal(history, rank1["amax"][name]), name
        assert bool((history[:, :STEPS] > 0).all()) and bool((history[:, STEPS:] == 0).all()), name
    one = cached_reference("fp8")["amax"]
    for name, history in rank0["amax"].items():
        # input and weight amaxes are those of the whole batch; the output gradients' are WORLD times
        # larger (each rank's loss is a mean over 1/WORLD of the rows); weights differ from one
        # process by the parameters' few 1e-7
        torch.testing.assert_close(history[:2], one[name][:2], rtol=1e-5, atol=0, msg=name)
        torch.testing.assert_close(history[2], WORLD * one[name][2], rtol=1e-5, atol=0, msg=name)
    drifted = ranks["fp8_moe_not_reduced"]
    assert any(not torch.equal(h, drifted[1]["amax"][n]) for n, h in drifted[0]["amax"].items())


@spawns
def test_forward_sees_gathered_plain_weights(ranks):
    """FSDP2 keeps DTensor shards between steps and hands each layer's forward the all-gathered weight
    as a plain tensor, which the fp8 / MX custom ops take as they are."""
    for check in ("fp8_moe_reduced", "mxfp8_mlp", "fp4_per_tensor_reduced"):
        for result in ranks[check]:
            assert result["weights_seen_in_forward"] == ["Parameter"], check
            assert result["sharded_outside_forward"], check


@spawns
def test_an_expert_idle_on_one_rank_does_not_hang_the_amax_reductions(ranks):
    rank0, rank1 = ranks["fp8_moe_reduced"]
    assert rank1["idle_experts"]  # rank 1 (high-half tokens only) leaves expert 3 without tokens


@spawns
def test_dtensor_weights_are_refused_with_a_clear_error(ranks):
    for errors in ranks["dtensor_weights_are_refused"]:
        assert "fp8_linear: the weight is a DTensor" in errors["fp8"]
        assert "mx_linear: the weight is a DTensor" in errors["mx"]
        assert "tensor parallelism" in errors["fp8"]


def test_bad_reduction_settings_name_the_problem():
    from nexus.training.mixed_precision import mx_quantize_dequantize

    model = mlp("mxfp8")
    with pytest.raises(TypeError, match="group must be None, a ProcessGroup or a 1-D DeviceMesh, got str"):
        set_amax_reduction(model, "dp")
    with pytest.raises(TypeError, match="enabled must be a bool"):
        set_amax_reduction(model, enabled="yes")
    with pytest.raises(ValueError, match="amax applies to per-tensor scaling"):
        mx_quantize_dequantize(torch.randn(4, 32), "e4m3", 32, amax=torch.tensor(1.0))
    set_amax_reduction(model, enabled=False)
    assert {m.reduce_amax for m in model.modules() if isinstance(m, MXFP8Linear)} == {False}


def test_per_tensor_amax_override_scales_as_given():
    """amax= replaces the tensor's own amax (what the ranks pass after their all-reduce)."""
    from nexus.training.mixed_precision import mx_quantize_dequantize

    x = torch.tensor([[0.5, -1.0, 3.0]])
    assert torch.equal(mx_quantize_dequantize(x, "e2m1", None), x)  # scale 3 / 6: on the grid already
    # scale 12 / 6 = 2: the grid is {0, 1, 2, 3, 4, 6, 8, 12} x sign; 0.5 rounds to 0 (even), 3 stays 3
    assert torch.equal(mx_quantize_dequantize(x, "e2m1", None, amax=torch.tensor(12.0)),
                       torch.tensor([[0.0, -1.0, 3.0]]))
