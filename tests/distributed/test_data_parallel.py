"""DDP (wrap_data_parallel) on the MoE model: 2 and 4 Gloo ranks against one process.

Each rank trains on its slice of a global batch; the one-process reference runs the same slices one
after the other with the loss divided by the number of slices (gradient accumulation), which is
exactly what DDP's gradient average computes (the MoE balance loss is a per-slice quantity in both).
Steps 2 and 3 feed rank groups tokens that the routers send to disjoint experts, so an MoE expert
and a RoM expert get no tokens on some ranks while others use them: DDP must neither hang nor
average them wrongly.

Tolerance: fp32, same model and data; DDP sums the slices' gradients in another order than the
reference (all-reduce vs autograd accumulation), so gradients may differ by rounding. Measured after
4 AdamW steps at lr=1e-3: bit-identical at 2 ranks, max 6e-8 at 4 ranks. atol 1e-6 keeps a 15x
margin and is 1000x below what a wrong average or a lost or doubled expert gradient does (entries
move by ~lr per step under AdamW).
"""

from __future__ import annotations

import copy

import pytest
import torch

from nexus.models.moe import MoEConfig, MoEFeedForward, MoETransformer, RoutingMamba
from nexus.training.losses import multi_token_prediction_loss
from tests.distributed.harness import run_distributed
from tests.distributed.models import steer_experts

# every feature on: layer 0 attention + dense, 1 attention + MoE, 2 RoM + dense, 3 MoD(attention + MoE),
# one extra MTP head
CONFIG = dict(vocab_size=128, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=32, d_ff_dense=48, max_seq_len=32,
              use_moe=True, n_experts=4, moe_top_k=2, n_shared_experts=1, moe_layer_interval=2, use_mod=True,
              mod_capacity_factor=0.5, mod_layer_interval=4, use_mamba=True, mamba_layer_interval=3, mamba_d_state=8,
              mamba_expand=2, mamba_head_dim=16, mamba_chunk_size=8, rom_n_experts=2, rom_top_k=1, n_pred_tokens=2,
              dropout=0.0)
SEQ, PER_RANK, STEPS, LR = 16, 2, 4, 1e-3
SPLIT_STEPS = (2, 3)  # steps whose data leaves experts idle on some ranks
HALF = CONFIG["vocab_size"] // 2
ATOL = 1e-6
GRAD_ATOL = 1e-6


def steered_model() -> MoETransformer:
    """The test model, with weights set so routing depends on which half of the vocabulary a token is in.

    Token ids < HALF get +4 on embedding dim 0, the others -4; dim 0 dominates the residual stream
    through every layer (the layers add ~0.02-sized outputs), so after RMSNorm x[0] is about +-5.6.
    MoE expert 3 and RoM expert 1 get a router weight of 2 on dim 0: first choice for the low half,
    last choice for the high half (MoE top-2 of 4, RoM top-1 of 2: RoM expert 0 takes the high half).
    """
    torch.manual_seed(0)
    return steer_experts(MoETransformer(MoEConfig(**CONFIG)), HALF)


def global_batch(step: int, world_size: int) -> torch.Tensor:
    """[world_size * PER_RANK, SEQ + n_pred] token windows of one step; rank r takes rows r*PER_RANK:(r+1)*PER_RANK.

    In SPLIT_STEPS the first half of the ranks get only low-half tokens, the second half only high-half ones.
    """
    gen = torch.Generator().manual_seed(100 + step)
    shape = (world_size * PER_RANK, SEQ + CONFIG["n_pred_tokens"])
    if step not in SPLIT_STEPS:
        return torch.randint(0, CONFIG["vocab_size"], shape, generator=gen)
    low = torch.randint(0, HALF, shape, generator=gen)
    rank_of_row = torch.arange(shape[0])[:, None] // PER_RANK
    return torch.where(rank_of_row < world_size // 2, low, low + HALF)


def loss_of(out, window: torch.Tensor) -> torch.Tensor:
    return multi_token_prediction_loss(out.logits, out.mtp_logits, window)[0] + out.aux_loss


def count_expert_rows(model: MoETransformer) -> dict[str, list[int]]:
    """Forward hooks recording the rows each routed expert ran on, by the expert's name."""
    counts: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, MoEFeedForward):
            experts = [(f"{name}.experts.{i}", e) for i, e in enumerate(module.experts)]
        elif isinstance(module, RoutingMamba):
            experts = [(f"{name}.in_experts.{i}", e) for i, e in enumerate(module.in_experts)]
        else:
            continue
        for expert_name, expert in experts:
            counts[expert_name] = []
            expert.register_forward_hook(lambda m, args, out, key=expert_name: counts[key].append(args[0].shape[0]))
    return counts


def _ddp_run(rank: int, world_size: int) -> dict:
    from nexus.training.distributed.data_parallel import DataParallelModel, unwrap_model, wrap_data_parallel

    from torch.distributed.device_mesh import init_device_mesh

    model = steered_model()
    reference = copy.deepcopy(model) if rank == 0 else None
    counts = count_expert_rows(model)
    errors = {}
    mesh_2d = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    for key, kwargs in (("both", dict(mesh=mesh_2d["dp_shard"], process_group=torch.distributed.group.WORLD)),
                        ("2d", dict(mesh=mesh_2d))):
        try:
            wrap_data_parallel(model, **kwargs)
        except ValueError as exc:
            errors[key] = str(exc)
    # 2 ranks: the default group; 4 ranks: a 1-D mesh
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp_replicate",)) if world_size == 4 else None
    wrapped = wrap_data_parallel(model, mesh)
    result = {
        "errors": errors,
        "group_size": torch.distributed.get_world_size(wrapped.process_group),
        "is_ddp": isinstance(wrapped, DataParallelModel),
        "attributes": (wrapped.config is model.config, wrapped.layers is model.layers,
                       wrapped.num_parameters(active=True) == model.num_parameters(active=True),
                       wrapped.num_parameters() == model.num_parameters(), unwrap_model(wrapped) is model),
    }
    opt = torch.optim.AdamW(wrapped.parameters(), lr=LR)
    # the one-process run (rank 0 only): the same slices one after the other, accumulated, in lock step
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=LR) if reference is not None else None
    losses, grad_diffs = [], []
    for step in range(STEPS):
        batch = global_batch(step, world_size)
        window = batch[rank * PER_RANK:(rank + 1) * PER_RANK]
        loss = loss_of(wrapped(window[:, :SEQ]), window)
        loss.backward()
        losses.append(loss.item())
        if reference is not None:
            for r in range(world_size):
                window = batch[r * PER_RANK:(r + 1) * PER_RANK]
                (loss_of(reference(window[:, :SEQ]), window) / world_size).backward()
            ref_grads = dict(reference.named_parameters())
            grad_diffs.append({n: ((p.grad - ref_grads[n].grad).abs().max().item(),
                                   ref_grads[n].grad.abs().max().item()) for n, p in model.named_parameters()})
            ref_opt.step()
            ref_opt.zero_grad()
        opt.step()
        opt.zero_grad()
    result["counts"] = counts
    result["losses"] = losses
    result["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    if reference is not None:
        result["grad_diffs"] = grad_diffs
        result["reference"] = {n: p.detach().clone() for n, p in reference.named_parameters()}
    return result


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def ddp_run(request):
    return request.param, run_distributed(_ddp_run, request.param, timeout=300)


def test_wrapper_exposes_the_inner_model(ddp_run):
    world_size, results = ddp_run
    for r in results:
        assert r["is_ddp"] and all(r["attributes"]), r["attributes"]
        assert r["group_size"] == world_size


def test_bad_mesh_arguments_name_the_problem(ddp_run):
    _, results = ddp_run
    errors = results[0]["errors"]
    assert "mesh or process_group, not both" in errors["both"]
    assert "1-D" in errors["2d"] and "2 dimensions" in errors["2d"] and "dp_replicate" in errors["2d"]


def test_some_experts_get_no_tokens_on_some_ranks_only(ddp_run):
    world_size, results = ddp_run
    low, high = results[: world_size // 2], results[world_size // 2:]
    assert all(len(rows) == STEPS for rows in results[0]["counts"].values())  # one call per expert per step
    # (expert, ranks where it must be idle, ranks where it must work) in the split steps
    cases = [("layers.1.ffn.experts.3", high, low), ("layers.3.block.ffn.experts.3", high, low),
             ("layers.2.mixer.in_experts.1", high, low), ("layers.2.mixer.in_experts.0", low, high)]
    for name, idle, busy in cases:
        for step in SPLIT_STEPS:
            assert [r["counts"][name][step] for r in idle] == [0] * len(idle), (name, step)
            assert all(r["counts"][name][step] > 0 for r in busy), (name, step)
    for step in range(STEPS):
        if step not in SPLIT_STEPS:  # mixed tokens: those experts work on every rank
            for name, _, _ in cases:
                assert all(r["counts"][name][step] > 0 for r in results), (name, step)


def test_all_ranks_hold_identical_parameters(ddp_run):
    _, results = ddp_run
    for r in results[1:]:
        for name, p in r["params"].items():
            assert torch.equal(p, results[0]["params"][name]), name


def test_gradients_are_the_mean_over_ranks_at_every_step(ddp_run):
    # AdamW is blind to a gradient's scale, so the average itself is checked here, not only the parameters
    _, results = ddp_run
    for step, diffs in enumerate(results[0]["grad_diffs"]):
        assert len(diffs) == len(results[0]["params"])  # (a parameter without .grad fails in the rank)
        worst = max(diffs, key=lambda n: diffs[n][0])
        assert diffs[worst][0] <= GRAD_ATOL, (step, worst, diffs[worst])


def test_parameters_equal_one_process_after_adamw_steps(ddp_run):
    _, results = ddp_run
    params, reference = results[0]["params"], results[0]["reference"]
    assert params.keys() == reference.keys()
    for name, p in params.items():
        torch.testing.assert_close(p, reference[name], atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    # and training did something: every parameter, idle experts included, moved from its start
    start = dict(steered_model().named_parameters())
    assert [n for n, p in params.items() if torch.equal(p, start[n])] == []


def test_an_idle_expert_still_gets_a_zero_gradient():
    # the mechanism that keeps DDP from waiting: no expert parameter is left without a gradient
    model = steered_model()
    counts = count_expert_rows(model)
    window = global_batch(SPLIT_STEPS[0], 2)[PER_RANK:]  # high-half tokens only
    loss_of(model(window[:, :SEQ]), window).backward()
    assert counts["layers.1.ffn.experts.3"] == [0] and counts["layers.2.mixer.in_experts.1"] == [0]
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    for idle in ("layers.1.ffn.experts.3.", "layers.3.block.ffn.experts.3.", "layers.2.mixer.in_experts.1.",
                 "layers.2.mixer.out_experts.1."):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(idle)]
        assert grads and all(torch.count_nonzero(g) == 0 for g in grads), idle


def test_wrap_needs_a_process_group():
    from nexus.training.distributed.data_parallel import unwrap_model, wrap_data_parallel

    model = steered_model()
    with pytest.raises(RuntimeError, match="initialised process group"):
        wrap_data_parallel(model)
    assert unwrap_model(model) is model
