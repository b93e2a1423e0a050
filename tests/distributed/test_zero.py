"""ZeRO stages 1, 2 and 3 (apply_zero) at 2 Gloo ranks against one process.

Each rank trains on its half of a global batch; the loss is a mean over rows, so the data-parallel
average of the half-batch gradients is the full-batch gradient and every stage must follow the
one-process AdamW trajectory to rounding (fp32: the collectives sum in another order; measured
differences ~1e-7 on parameters of size ~0.1; atol 1e-5 is far below one step's update lr=1e-2,
which a lost rank, a sum instead of a mean or a stale shard would show). The model has odd sizes
so that no tensor divides evenly between the ranks.
"""
from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist
from torch import nn

from nexus.training.distributed.zero import ZeROConfig, apply_zero
from tests.distributed.harness import run_distributed_checks
from tests.distributed.models import spawns

D_IN, D_HID, GLOBAL, STEPS, LR = 7, 13, 6, 3, 1e-2
ATOL = 1e-5


class Net(nn.Module):
    """Two residual blocks of odd widths in ``layers`` (FSDP2 shards per block) and an odd head."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_IN))
                                    for _ in range(2))
        self.head = nn.Linear(D_IN, 3)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10 + step)
    return torch.randn(GLOBAL, D_IN, generator=gen), torch.randn(GLOBAL, 3, generator=gen)


def new_model() -> Net:
    torch.manual_seed(0)
    return Net()


def adamw(params):
    # two groups, as build_optimizer makes: decay on matrices only
    params = list(params)
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim > 1], "weight_decay": 0.1},
                              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}], lr=LR)


def train(model, opt, rows: slice, steps=STEPS) -> None:
    for step in range(steps):
        x, y = batch(step)
        loss = nn.functional.mse_loss(model(x[rows]), y[rows])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def full_params(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n.removeprefix("module."): (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters()}


def one_process() -> dict[str, torch.Tensor]:
    model = new_model()
    train(model, adamw(model.parameters()), slice(None))
    return full_params(model)


def run_stage(rank, world_size, stage, **offload):
    """STEPS steps under ZeRO ``stage`` on this rank's rows; what the wrapper did, and the full parameters."""
    model = new_model()
    model, opt = apply_zero(model, adamw(model.parameters()), ZeROConfig(stage=stage, **offload))
    per = GLOBAL // world_size
    train(model, opt, slice(rank * per, (rank + 1) * per))
    out = {"params": full_params(model), "reference": one_process(), "wrapper": type(model).__name__,
           "optimizer": type(opt).__name__, "groups": len(opt.param_groups)}
    if stage == 1:  # this rank's optimizer holds the state of its share of whole tensors
        out["owned"] = sorted(i for i, p in enumerate(model.parameters()) if p in opt.optim.state)
        out["local"] = type(opt.optim).__name__
        out["state_devices"] = sorted({str(v.device) for st in opt.optim.state.values() for v in st.values()
                                       if torch.is_tensor(v)})
        masters = getattr(opt.optim, "_masters", {})
        out["masters_apart"] = bool(masters) and all(m.data_ptr() != p.data_ptr() for p, m in masters.items())
    else:
        from torch.distributed.tensor import DTensor

        group = model._get_fsdp_state()._fsdp_param_group
        out["offload"] = type(group.offload_policy).__name__
        out["local_fraction"] = sum(p.to_local().numel() for p in model.parameters()) / sum(
            p.numel() for p in model.parameters())
        out["sharded_state"] = all(isinstance(s["exp_avg"], DTensor) for s in opt.state.values())
        out["reshard_after_forward"] = [b._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info is not None
                                        for b in model.layers]
    return out


def stage1_checkpoint_round_trip(rank, world_size):
    """A ZeRO-1 state consolidated on rank 0, loaded by a fresh ZeRO-1 optimizer on every rank, continues
    exactly as the uninterrupted run (what the Trainer's checkpoint does); with and without CPU offload."""
    return {offload: _stage1_round_trip(rank, world_size, offload) for offload in (False, True)}


def _stage1_round_trip(rank, world_size, offload):
    per = GLOBAL // world_size
    rows = slice(rank * per, (rank + 1) * per)
    model, opt = apply_zero(new_model(), adamw, ZeROConfig(stage=1, offload_optimizer=offload))
    train(model, opt, rows, steps=2)
    opt.consolidate_state_dict(to=0)
    state = [None]
    if rank == 0:  # through bytes, as a checkpoint file: a live state_dict shares tensors with the optimizer
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        state = [buffer.getvalue()]
    dist.broadcast_object_list(state, src=0)
    state = [torch.load(io.BytesIO(state[0]), weights_only=True)]
    weights = {k: v.clone() for k, v in model.module.state_dict().items()}
    resumed_model, resumed = apply_zero(new_model(), adamw, ZeROConfig(stage=1, offload_optimizer=offload))
    resumed_model.module.load_state_dict(weights)
    resumed.load_state_dict(state[0])
    loaded = [int(s["step"]) for s in resumed.optim.state.values()]  # this rank's share, from rank 0's file
    for m, o in ((model, opt), (resumed_model, resumed)):
        for step in (2, 3):
            x, y = batch(step)
            nn.functional.mse_loss(m(x[rows]), y[rows]).backward()
            o.step()
            o.zero_grad(set_to_none=True)
    return {"same": all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters())),
            "loaded_steps": loaded, "params": len(list(model.parameters()))}


def run_file_wiring(rank, world_size):
    """What ``distributed: {strategy: zero, ...}`` builds through parallelize and shard_optimizer."""
    from nexus.training.distributed.mesh import DistributedConfig, init_parallel
    from nexus.training.distributed.parallelize import parallelize
    from nexus.training.distributed.zero import shard_optimizer

    built = {}
    for stage, offload in ((1, False), (2, True), (3, False)):
        ctx = init_parallel(DistributedConfig(strategy="zero", zero_stage=stage, offload_optimizer=offload))
        model = parallelize(new_model(), ctx)
        opt = shard_optimizer(adamw(model.parameters()), ctx)
        policy = None if stage == 1 else type(model._get_fsdp_state()._fsdp_param_group.offload_policy).__name__
        built[stage] = (type(model).__name__, type(opt).__name__, policy)
    return built


def stage_1(rank, world_size):
    return run_stage(rank, world_size, 1)


def stage_2(rank, world_size):
    return run_stage(rank, world_size, 2)


def stage_3(rank, world_size):
    return run_stage(rank, world_size, 3)


def stage_1_offload(rank, world_size):
    out = run_stage(rank, world_size, 1, offload_optimizer=True)
    return out


def stage_3_offload(rank, world_size):
    return run_stage(rank, world_size, 3, offload_optimizer=True, offload_params=True)


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed_checks([stage_1, stage_1_offload, stage_2, stage_3, stage_3_offload, stage1_checkpoint_round_trip, run_file_wiring],
                                  world_size=2, timeout=600)


def _close_to_reference(out):
    for name, ref in out["reference"].items():
        torch.testing.assert_close(out["params"][name], ref, atol=ATOL, rtol=0, msg=name)
    moved = max((out["params"][n] - new_model().state_dict()[n]).abs().max().item() for n in out["reference"])
    assert moved > 5 * LR * 0.5  # the run trained (AdamW moves each entry ~lr per step)


@spawns
@pytest.mark.parametrize("check", ["stage_1", "stage_1_offload", "stage_2", "stage_3", "stage_3_offload"])
def test_each_stage_follows_the_one_process_trajectory(two_ranks, check):
    for out in two_ranks[check]:
        _close_to_reference(out)
        assert out["groups"] == 2  # weight-decay groups survive the rebuild


@spawns
def test_stage_1_is_ddp_with_each_rank_holding_its_share_of_the_optimizer_state(two_ranks):
    ranks = two_ranks["stage_1"]
    assert {r["wrapper"] for r in ranks} == {"DataParallelModel"}
    assert {r["optimizer"] for r in ranks} == {"ZeroRedundancyOptimizer"}
    owned = [set(r["owned"]) for r in ranks]
    assert owned[0] and owned[1] and not owned[0] & owned[1]  # disjoint, both non-empty
    assert owned[0] | owned[1] == set(range(len(ranks[0]["params"])))  # every tensor has one owner


@spawns
def test_stages_2_and_3_shard_parameters_gradients_and_state_on_fsdp2(two_ranks):
    for check, resharded, offload in (("stage_2", False, "OffloadPolicy"), ("stage_3", True, "OffloadPolicy"),
                                      ("stage_3_offload", True, "CPUOffloadPolicy")):
        for r in two_ranks[check]:
            assert r["wrapper"].startswith("FSDP") and r["optimizer"] == "AdamW"
            assert r["sharded_state"]  # optimizer moments are shards (DTensor), not whole tensors
            assert 0.4 < r["local_fraction"] < 0.6, r["local_fraction"]  # half of every tensor per rank
            assert r["offload"] == offload
            # stage 3 frees a block's parameters after its forward; the last block's backward comes at once
            assert r["reshard_after_forward"] == [resharded, False]


@spawns
def test_stage_1_checkpoint_consolidates_and_resumes_exactly(two_ranks):
    for offload in (False, True):
        ranks = [r[offload] for r in two_ranks["stage1_checkpoint_round_trip"]]
        assert all(r["same"] for r in ranks)
        # rank 0's file held every parameter's state (both shares); each rank took back its own share
        assert sum(len(r["loaded_steps"]) for r in ranks) == ranks[0]["params"] == 10
        assert {s for r in ranks for s in r["loaded_steps"]} == {2}


@spawns
def test_stage_1_offload_steps_cpu_copies_and_keeps_its_state_on_the_cpu(two_ranks):
    for r in two_ranks["stage_1_offload"]:
        assert r["optimizer"] == "ZeroRedundancyOptimizer" and r["local"] == "CPUOffloadedAdamW"
        assert r["state_devices"] == ["cpu"] and r["masters_apart"]


@spawns
def test_run_file_strategy_zero_builds_each_stage(two_ranks):
    for r in two_ranks["run_file_wiring"]:
        assert r[1] == ("DataParallelModel", "ZeroRedundancyOptimizer", None)
        assert r[2] == ("FSDPNet", "AdamW", "CPUOffloadPolicy")
        assert r[3] == ("FSDPNet", "AdamW", "OffloadPolicy")


def test_one_process_returns_model_and_optimizer_as_they_are():
    model = new_model()
    opt = adamw(model.parameters())
    assert apply_zero(model, opt, ZeROConfig(stage=3)) == (model, opt)


@pytest.mark.parametrize("kwargs,message", [
    ({"stage": 0}, "stage must be 1, 2 or 3"),
    ({"stage": 2, "offload_params": True}, "offload_params needs stage 3"),
    ({"stage": 3, "offload_optimizer": "yes"}, "offload_optimizer must be a bool"),
])
def test_bad_zero_configs_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ZeROConfig(**kwargs)
