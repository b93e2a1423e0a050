"""FSDP2 (wrap_model_fsdp2) on the MoE model: 2 and 4 Gloo ranks against one process.

Each rank trains on its slice of a global batch (GLOBAL rows per step). The loss is the MTP cross
entropy (a mean over the slice's tokens) plus the router z-loss (a mean over each router's tokens);
every slice has the same token count, so the mean over ranks of the slice losses equals the
full-batch loss and FSDP2's averaged gradient equals the one-process full-batch gradient. The
load-balance loss E * sum_i f_i P_i is a product of two batch means, not a mean, so it is 0 in that
comparison; one check turns it on and compares with the one-process mean of the per-slice losses
(what any data-parallel MoE computes).

Steered routing: token ids < HALF push embedding dim 0 to +4, the others to -4, and one MoE expert and
one RoM expert route on that dim, so a rank fed only high-half tokens leaves those experts idle while
other ranks use them (the hooks prove it happened); the step must neither hang nor average wrongly.

Tolerance: fp32 throughout (param_dtype=fp32 where mixed precision is on). Gradients after the first
backward: the reduce-scatter sums slice gradients in another order than autograd sums the full
batch; measured max abs difference 6e-8 on gradients up to 0.35 (atol 1e-6; summing instead of
averaging doubles them, a lost rank's slice moves them by ~1e-1). Parameters after STEPS AdamW steps at lr=1e-2: AdamW's
update g / (sqrt(v) + eps) turns a gradient difference dg into an update difference up to lr * dg / eps,
so eps=1e-6 (not 1e-8, which measured 2e-4 on near-zero gradients) keeps rounding at rounding
level: measured max 7e-7; atol 5e-5 is 200x below one step's update (~lr), which a wrong average,
a lost rank or a dropped expert gradient moves entries by.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from nexus.models.moe import MoEConfig, MoEFeedForward, MoETransformer, RoutingMamba
from nexus.training.distributed.fsdp2 import FSDP2Config, find_blocks, wrap_model_fsdp2
from nexus.training.losses import multi_token_prediction_loss
from tests.distributed.harness import run_distributed_checks
from tests.distributed.models import MOE_CONFIG, steer_experts, zero_fill_missing_grads

# every feature on: layer 0 attention + MoE, layer 1 MoD(RoM + MoE), one extra MTP head
CONFIG = MOE_CONFIG
SEQ, GLOBAL, STEPS, LR, EPS = 16, 4, 3, 1e-2, 1e-6
HALF = CONFIG["vocab_size"] // 2
GRAD_ATOL, PARAM_ATOL = 1e-6, 5e-5
FP32 = dict(param_dtype=torch.float32)  # mixed precision stays on, in fp32: bf16 matmuls crawl on this CPU


def steered_model(**overrides) -> MoETransformer:
    """The test model (seed 0) with routing tied to the vocabulary half of a token: MoE expert 3 and
    RoM expert 1 score +2 * x[0], and x[0] (embedding dim 0, which dominates the residual stream) is
    +4 for ids < HALF, -4 otherwise: high-half-only slices never pick them."""
    torch.manual_seed(0)
    return steer_experts(MoETransformer(MoEConfig(**{**CONFIG, **overrides})), HALF)


def global_batch(step: int) -> torch.Tensor:
    """[GLOBAL, SEQ + 2] windows; from step 1 on, the last half of the rows hold high-half tokens only."""
    gen = torch.Generator().manual_seed(100 + step)
    window = torch.randint(0, CONFIG["vocab_size"], (GLOBAL, SEQ + CONFIG["n_pred_tokens"]), generator=gen)
    if step >= 1:
        window[GLOBAL // 2:] = window[GLOBAL // 2:] % HALF + HALF
    return window


def loss_of(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    out = model(window[:, :SEQ])
    return multi_token_prediction_loss(out.logits, out.mtp_logits, window)[0] + out.aux_loss


def idle_expert_steps(model: MoETransformer) -> list:
    """Forward hooks; the list gets, per MoE/RoM router call, the expert ids that got no tokens."""
    idle = []
    for name, module in model.named_modules():
        if isinstance(module, (MoEFeedForward, RoutingMamba)):
            k = module.top_k

            def hook(mod, args, logits, name=name, k=k):
                chosen = set(logits.topk(k, dim=-1).indices.flatten().tolist())
                idle.append((name, sorted(set(range(logits.shape[-1])) - chosen)))
            module.router.register_forward_hook(hook)
    return idle


def reference(per_slice_world: int | None = None, **overrides) -> dict:
    """One process, same model, data and AdamW: first-step gradients and final parameters.

    per_slice_world=None: the full batch in one forward; W: the mean of the W slice losses.
    """
    model = steered_model(**overrides)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    grads = None
    for step in range(STEPS):
        window = global_batch(step)
        if per_slice_world is None:
            loss = loss_of(model, window)
        else:
            loss = torch.stack([loss_of(model, s) for s in window.chunk(per_slice_world)]).mean()
        loss.backward()
        zero_fill_missing_grads(model)
        if grads is None:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"grads": grads, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def train_sharded(rank: int, world_size: int, config: FSDP2Config, mesh=None, **overrides) -> dict:
    """STEPS AdamW steps of the wrapped model on this rank's slice; full tensors come back on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    model = steered_model(**overrides)
    idle = idle_expert_steps(model)
    norm_calls = []
    model.layers[0].mixer_norm.register_forward_hook(lambda *a: norm_calls.append(1))
    full_numel = {n: p.numel() for n, p in model.named_parameters()}
    wrap_model_fsdp2(model, config, mesh)
    local_numel = {n: p.to_local().numel() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    per = GLOBAL // world_size
    grads, still_sharded, losses = None, None, []
    for step in range(STEPS):
        loss = loss_of(model, global_batch(step)[rank * per:(rank + 1) * per])
        if step == 0:  # which blocks freed their gathered parameters after forward (reshard_after_forward)
            still_sharded = [isinstance(b.mixer_norm.weight if hasattr(b, "mixer_norm") else b.block.mixer_norm.weight,
                                        DTensor) for b in model.layers]
        loss.backward()
        if grads is None:  # every rank joins each full_tensor all-gather, in the same order
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    params = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    group = model._get_fsdp_state()._fsdp_param_group
    return {
        "grads": grads if rank == 0 else None,
        "params": params if rank == 0 else None,
        "idle": idle,
        "losses": losses,
        "norm_calls_per_step": len(norm_calls) / STEPS,
        "still_sharded_after_forward": still_sharded,
        "local_fraction": sum(local_numel.values()) / sum(full_numel.values()),
        "offload": type(group.offload_policy).__name__,
        "mesh_shape": tuple(group.mesh_info.mesh.shape),
        "is_dtensor": all(isinstance(p, DTensor) for p in model.parameters()),
    }


# ---------------------------------------------------------------------------------------------
# rank-side checks (2 ranks)


def full(rank, world_size):
    return train_sharded(rank, world_size, FSDP2Config(sharding_strategy="full", **FP32))


def shard_grad_op_offload_ac(rank, world_size):
    return train_sharded(rank, world_size, FSDP2Config(sharding_strategy="shard_grad_op", cpu_offload=True,
                                                       activation_checkpointing=True, **FP32))


def no_shard_ac(rank, world_size):
    return train_sharded(rank, world_size,
                         FSDP2Config(sharding_strategy="no_shard", activation_checkpointing=True, **FP32))


def full_offload_no_mixed_precision(rank, world_size):
    return train_sharded(rank, world_size,
                         FSDP2Config(sharding_strategy="full", cpu_offload=True, mixed_precision=False))


def balance_loss_on(rank, world_size):
    return train_sharded(rank, world_size, FSDP2Config(sharding_strategy="full", **FP32), balance_loss_weight=0.01)


def seed_example(rank, world_size):
    """Seeds 000/002 as written (bf16 parameters): one step runs and the loss is finite."""
    torch.manual_seed(0)
    model = MoETransformer(MoEConfig(**CONFIG))
    config = FSDP2Config(
        sharding_strategy="full",
        mixed_precision=True,
        activation_checkpointing=True,
    )
    model = wrap_model_fsdp2(model, config)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    out = model(global_batch(0)[rank * 2:(rank + 1) * 2, :SEQ])
    loss = multi_token_prediction_loss(out.logits, out.mtp_logits, global_batch(0)[rank * 2:(rank + 1) * 2])[0]
    loss.backward()
    opt.step()
    return {"loss": loss.item(), "logits_dtype": out.logits.dtype,
            "param_dtypes": {p.dtype for p in model.parameters()}}


def meta_device_init(rank, world_size):
    """A model built on the meta device (no memory), wrapped, then materialised shard by shard."""
    with torch.device("meta"):
        model = MoETransformer(MoEConfig(**CONFIG))
    wrap_model_fsdp2(model, FSDP2Config(**FP32))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    loss = loss_of(model, global_batch(0)[rank * 2:(rank + 1) * 2])
    loss.backward()
    return {"loss": loss.item(), "norm": model.layers[0].mixer_norm.weight.full_tensor(),
            "embed_std": model.embed_tokens.weight.full_tensor().std().item(),
            "local_rows": model.embed_tokens.weight.to_local().shape[0]}


class GatedBlock(nn.Module):
    """Uses branch a or branch b (different shapes) depending on the sign of its input: a data-dependent
    unused parameter set, the case FSDP2's reduce-scatter mismatches on unless told to send zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 6)
        self.up = nn.Linear(6, 8)

    def forward(self, x):
        return x + (self.a(x) if x.sum() > 0 else self.up(self.b(x)))


class GatedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([GatedBlock(), GatedBlock()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def gated_batch() -> torch.Tensor:
    """[4, 8]: rows 0-1 positive (branch a), rows 2-3 negative (branch b)."""
    x = torch.rand(4, 8, generator=torch.Generator().manual_seed(3)) + 0.1
    x[2:] = -x[2:]
    return x


def unused_parameters(rank, world_size):
    torch.manual_seed(0)
    model = wrap_model_fsdp2(GatedModel(), FSDP2Config(mixed_precision=False))
    model(gated_batch()[rank * 2:(rank + 1) * 2]).square().mean().backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}  # collective: every rank
    return grads if rank == 0 else None


def errors_with_a_group(rank, world_size):
    """Bad inputs that need the world size or a mesh: each error message, by case."""
    from torch.distributed.device_mesh import init_device_mesh

    cases = {
        "node_size_not_dividing": lambda: wrap_model_fsdp2(steered_model(), FSDP2Config(sharding_strategy="hybrid",
                                                                                        node_size=3, **FP32)),
        "mesh_names": lambda: wrap_model_fsdp2(steered_model(), FSDP2Config(**FP32),
                                               init_device_mesh("cpu", (1, 2), mesh_dim_names=("a", "b"))),
        "full_on_replicated_mesh": lambda: wrap_model_fsdp2(
            steered_model(), FSDP2Config(**FP32),
            init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp_replicate", "dp_shard"))),
        "wrapped_twice": lambda: wrap_model_fsdp2(wrap_model_fsdp2(steered_model(), FSDP2Config(**FP32)),
                                                  FSDP2Config(**FP32)),
    }
    out = {}
    for name, case in cases.items():
        try:
            case()
            out[name] = None
        except (ValueError, TypeError) as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


# rank-side checks (4 ranks as 2 nodes x 2)


def hybrid_from_env(rank, world_size):
    return train_sharded(rank, world_size, FSDP2Config(sharding_strategy="hybrid", **FP32))


def hybrid_mesh_offload_ac(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    return train_sharded(rank, world_size, FSDP2Config(sharding_strategy="hybrid", cpu_offload=True,
                                                       activation_checkpointing=True, **FP32), mesh)


def full_1d_mesh_4(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp_shard",))
    return train_sharded(rank, world_size, FSDP2Config(sharding_strategy="full", **FP32), mesh)


# ---------------------------------------------------------------------------------------------
# parent side

CHECKS_2 = (full, shard_grad_op_offload_ac, no_shard_ac, full_offload_no_mixed_precision, balance_loss_on,
            seed_example, meta_device_init, unused_parameters, errors_with_a_group)
CHECKS_4 = (hybrid_from_env, hybrid_mesh_offload_ac, full_1d_mesh_4)


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed_checks(CHECKS_2, world_size=2, timeout=300)


@pytest.fixture(scope="module")
def four_ranks():
    return run_distributed_checks(CHECKS_4, world_size=4, local_world_size=2, timeout=300)


@pytest.fixture(scope="module")
def full_batch_reference():
    return reference()


def assert_matches(result: dict, ref: dict) -> None:
    for kind, atol in (("grads", GRAD_ATOL), ("params", PARAM_ATOL)):
        assert result[kind].keys() == ref[kind].keys()
        worst = max(((result[kind][n] - ref[kind][n]).abs().max().item(), n) for n in ref[kind])
        print(f"{kind}: max abs difference {worst[0]:.3g} ({worst[1]})")
        assert worst[0] <= atol, f"{kind}: {worst[1]} differs from one process by {worst[0]:.3g} > {atol}"


STRATEGY_EXPECTATIONS = {
    # name: (mesh shape, sharded after forward per trunk block (the MTP head runs last and keeps its
    #        parameters for backward), forward calls of a block's first norm per step (2 with activation
    #        checkpointing: forward + recompute), offload policy)
    "full": ((2,), [True, True], 1, "OffloadPolicy"),
    "shard_grad_op_offload_ac": ((2,), [False, False], 2, "CPUOffloadPolicy"),
    "no_shard_ac": ((2, 1), [False, False], 2, "OffloadPolicy"),
    "full_offload_no_mixed_precision": ((2,), [True, True], 1, "CPUOffloadPolicy"),
}


def assert_layout(results: list, mesh_shape: tuple, sharded_after_forward: list, norm_calls: int, offload: str) -> None:
    world = len(results)
    shard = mesh_shape[-1]
    for r in results:
        assert r["mesh_shape"] == mesh_shape and r["is_dtensor"] and r["offload"] == offload
        # dim-0 shards: about 1/shard of the parameters each (uneven first dims round up on low ranks)
        assert abs(r["local_fraction"] - 1 / shard) < 0.05
        assert r["still_sharded_after_forward"] == sharded_after_forward
        assert r["norm_calls_per_step"] == norm_calls
    # every element is held by exactly world / shard ranks (the replicas)
    assert sum(r["local_fraction"] for r in results) == pytest.approx(world / shard, abs=1e-12)
    assert len({tuple(r["losses"]) for r in results}) == world  # each rank saw its own slice


@pytest.mark.parametrize("name", list(STRATEGY_EXPECTATIONS))
def test_two_ranks_match_one_process(two_ranks, full_batch_reference, name):
    results = two_ranks[name]
    assert_matches(results[0], full_batch_reference)
    assert_layout(results, *STRATEGY_EXPECTATIONS[name])


def test_idle_experts_neither_hang_nor_skew(two_ranks, full_batch_reference):
    """Rank 1 (high-half tokens from step 1) leaves MoE expert 3 and RoM expert 1 idle; rank 0 uses them."""
    rank0, rank1 = two_ranks["full"]
    idle1 = [(name, ids) for name, ids in rank1["idle"][len(rank1["idle"]) // STEPS:]]
    assert any("ffn" in name and 3 in ids for name, ids in idle1)
    assert any("mixer" in name and 1 in ids for name, ids in idle1)
    assert all(3 not in ids for name, ids in rank0["idle"] if "ffn" in name)
    assert_matches(rank0, full_batch_reference)


def test_balance_loss_matches_mean_of_slice_losses(two_ranks):
    assert_matches(two_ranks["balance_loss_on"][0], reference(per_slice_world=2, balance_loss_weight=0.01))


def test_seed_example_runs_in_bf16(two_ranks):
    for r in two_ranks["seed_example"]:
        # next-token + one extra head, each ~ln(128) = 4.85 at init
        assert torch.isfinite(torch.tensor(r["loss"])) and 8.5 < r["loss"] < 11.0
        assert r["logits_dtype"] == torch.bfloat16  # computed in param_dtype
        assert r["param_dtypes"] == {torch.float32}  # the sharded master weights stay fp32


def test_meta_device_model_is_materialised_sharded(two_ranks):
    for r in two_ranks["meta_device_init"]:
        assert r["local_rows"] == CONFIG["vocab_size"] // 2  # each rank allocated only its shard
        assert torch.equal(r["norm"], torch.ones(CONFIG["d_model"]))
        assert abs(r["embed_std"] - 0.02) < 0.002  # init_std
        assert 8.5 < r["loss"] < 11.0


def test_unused_parameters_get_zero_gradients(two_ranks):
    """Without set_reduce_scatter_unused_params the ranks reduce-scatter different tensors and Gloo aborts."""
    torch.manual_seed(0)
    model = GatedModel()
    torch.stack([model(s).square().mean() for s in gated_batch().chunk(2)]).mean().backward()
    got = two_ranks["unused_parameters"][0]
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_errors_that_need_a_group_name_the_problem(two_ranks):
    errors = two_ranks["errors_with_a_group"][0]
    assert "hybrid node size 3 does not divide the 2" in errors["node_size_not_dividing"]
    assert "('dp_replicate', 'dp_shard')" in errors["mesh_names"] and "('a', 'b')" in errors["mesh_names"]
    assert "use sharding_strategy='hybrid'" in errors["full_on_replicated_mesh"]
    assert "already wrapped" in errors["wrapped_twice"]


FOUR_EXPECTATIONS = {
    "hybrid_from_env": ((2, 2), [True, True], 1, "OffloadPolicy"),
    "hybrid_mesh_offload_ac": ((2, 2), [True, True], 2, "CPUOffloadPolicy"),
    "full_1d_mesh_4": ((4,), [True, True], 1, "OffloadPolicy"),
}


@pytest.mark.parametrize("name", list(FOUR_EXPECTATIONS))
def test_four_ranks_match_one_process(four_ranks, full_batch_reference, name):
    results = four_ranks[name]
    assert_matches(results[0], full_batch_reference)
    assert_layout(results, *FOUR_EXPECTATIONS[name])


# ---------------------------------------------------------------------------------------------
# bad inputs without a process group


def test_misspelt_strategy_is_named():
    with pytest.raises(ValueError, match=r"sharding_strategy .* got 'ful'; did you mean 'full'"):
        FSDP2Config(sharding_strategy="ful")
    with pytest.raises(ValueError, match="got 'FULL_SHARD'"):
        FSDP2Config(sharding_strategy="FULL_SHARD")


def test_hybrid_needs_a_node_size(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="hybrid' needs a node size.*node_size=.*LOCAL_WORLD_SIZE"):
        FSDP2Config(sharding_strategy="hybrid")
    assert FSDP2Config(sharding_strategy="hybrid", node_size=8).resolved_node_size() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert FSDP2Config(sharding_strategy="hybrid").resolved_node_size() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "four")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE='four'"):
        FSDP2Config(sharding_strategy="hybrid")


@pytest.mark.parametrize("field, value, message", [
    ("param_dtype", torch.int8, "param_dtype must be a floating torch.dtype"),
    ("reduce_dtype", "fp32", "reduce_dtype must be a floating torch.dtype"),
    ("cpu_offload", 1, "cpu_offload must be a bool"),
    ("reshard_after_forward", 0, "reshard_after_forward must be None, a bool or an int >= 1"),
    ("node_size", 0, "node_size must be a positive int"),
])
def test_bad_config_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        FSDP2Config(**{field: value})


def test_reshard_after_forward_with_no_shard_is_refused():
    with pytest.raises(ValueError, match="no meaning with sharding_strategy='no_shard'"):
        FSDP2Config(sharding_strategy="no_shard", reshard_after_forward=True)


def test_keyword_only():
    with pytest.raises(TypeError):
        FSDP2Config("full")  # noqa


def test_model_without_blocks_is_named():
    with pytest.raises(ValueError, match="no transformer blocks to wrap in Linear.*blocks="):
        wrap_model_fsdp2(nn.Linear(4, 4), FSDP2Config())
    with pytest.raises(ValueError, match="not a submodule of Linear"):
        find_blocks(nn.Linear(4, 4), blocks=[nn.Linear(2, 2)])


def test_blocks_found_on_the_moe_model_and_others():
    model = MoETransformer(MoEConfig(**CONFIG))
    assert find_blocks(model) == [*model.layers, *model.mtp_heads]
    seq = nn.Sequential(nn.Linear(2, 2))
    seq.stack = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])  # any outermost ModuleList
    assert find_blocks(seq) == list(seq.stack)


def test_no_process_group_is_a_clear_error():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="needs a process group: launch with torchrun"):
        wrap_model_fsdp2(MoETransformer(MoEConfig(**CONFIG)), FSDP2Config())
