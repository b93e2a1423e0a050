"""Tensor parallel (apply_tensor_parallel) on the MoE model against one process.

2 ranks, tp = 2: with sequence parallel (dropless experts), and without (fixed expert capacity, tied
embeddings); 4 ranks: dp 2 x tp 2 on a 2-D mesh, tensor parallel plus torch's FSDP2 ``fully_shard``
on the dp dimension. Each compares with the same model run in one process on the same data: logits
and every gradient at every step (sharded ones gathered with ``full_tensor``), then parameters
after the AdamW steps. Every feature of the model is on (GQA, dense FFN, MoE, RoM, MoD, MTP head).

Tolerances (fp32): tensor parallel sums partial matmuls across ranks (row-parallel all-reduce,
reduce-scatter under sequence parallel), a different summation order than one process, so logits
and gradients differ by rounding: measured <= 2.4e-7 over the 3 steps (gradients up to ~0.5),
asserted 2e-6; the loss (~10, one ulp 9.5e-7) measured <= 9.5e-7, asserted 1e-5. Parameters after
3 AdamW steps at lr=1e-3: measured <= 2.9e-6 (AdamW turns tiny gradient entries into lr-sized
updates, amplifying rounding), asserted 2e-5 = lr / 50, while a missing reduction or a wrongly
sharded weight moves entries by ~lr per step and changes logits by far more. Gradients are checked
directly at every step because AdamW's update does not see a gradient's scale.
"""

from __future__ import annotations

import copy

import pytest
import torch

from nexus.models.moe import MoEConfig, MoETransformer
from nexus.training.distributed.tensor_parallel import check_tensor_parallel_sizes
from tests.distributed.harness import run_distributed, run_distributed_checks
from tests.distributed.test_data_parallel import CONFIG, loss_of

SEQ, STEPS, LR = 16, 3, 1e-3
LOGIT_ATOL = GRAD_ATOL = 2e-6
LOSS_ATOL = 1e-5  # the loss is ~10: one float32 ulp there is 9.5e-7
PARAM_ATOL = 2e-5


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _compare_with_one_process(model, wrapped, reference, dp_rank: int, dp_size: int, per_rank: int) -> dict:
    """Train ``wrapped`` (this rank's dp slice) and ``reference`` (all dp slices, accumulated) in lock step.

    Returns the worst differences: logits and loss per step, gradients per step (name, diff, scale),
    and parameters after the steps (name, diff).
    """
    opt = torch.optim.AdamW(wrapped.parameters(), lr=LR)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=LR)
    ref_params = dict(reference.named_parameters())
    out = {"logits": [], "loss": [], "grads": []}
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(10 + step)
        shape = (dp_size * per_rank, SEQ + CONFIG["n_pred_tokens"])
        batch = torch.randint(0, CONFIG["vocab_size"], shape, generator=gen)
        window = batch[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        result = wrapped(window[:, :SEQ])
        loss = loss_of(result, window)
        loss.backward()
        ref_result = None
        for r in range(dp_size):
            ref_window = batch[r * per_rank:(r + 1) * per_rank]
            ref_out = reference(ref_window[:, :SEQ])
            (loss_of(ref_out, ref_window) / dp_size).backward()
            if r == dp_rank:
                ref_result = (ref_out.logits.detach(), loss_of(ref_out, ref_window).detach())
        out["logits"].append((result.logits.detach() - ref_result[0]).abs().max().item())
        out["loss"].append((loss.detach() - ref_result[1]).abs().item())
        grads = []
        for name, p in model.named_parameters():
            g = _full(p.grad)  # a collective for sharded gradients: every rank gathers in the same order
            ref_grad = ref_params[name].grad
            grads.append(((g - ref_grad).abs().max().item(), name, ref_grad.abs().max().item()))
        out["grads"].append(max(grads))
        out["min_grad_scale"] = min(scale for _, _, scale in grads)
        opt.step()
        opt.zero_grad()
        ref_opt.step()
        ref_opt.zero_grad()
    out["params"] = max(((_full(p.detach()) - ref_params[n]).abs().max().item(), n)
                        for n, p in model.named_parameters())
    out["n_params"] = (len(list(model.parameters())), len(ref_params))
    return out


def _layouts(model) -> dict:
    """Placement (or 'plain') and local shape of a few representative parameters."""
    from torch.distributed.tensor import DTensor

    names = ["layers.0.mixer.q_proj.weight", "layers.0.mixer.k_proj.weight", "layers.0.mixer.o_proj.weight",
             "layers.0.ffn.gate_proj.weight", "layers.0.ffn.down_proj.weight", "layers.0.mixer_norm.weight",
             "layers.1.ffn.router.weight", "layers.1.ffn.experts.2.up_proj.weight",
             "layers.1.ffn.experts.2.down_proj.weight",
             "layers.1.ffn.shared.gate_proj.weight", "layers.2.mixer.in_experts.0.weight",
             "layers.3.router.weight", "layers.3.block.mixer.v_proj.weight", "layers.3.block.ffn_norm.weight",
             "embed_tokens.weight", "lm_head.weight", "mtp_heads.0.block.ffn.up_proj.weight", "mtp_heads.0.norm.weight"]
    params = dict(model.named_parameters(remove_duplicate=False))  # tied lm_head listed too
    out = {}
    for name in names:
        p = params[name]
        if isinstance(p, DTensor):
            out[name] = (repr(p.placements[-1]), tuple(p.to_local().shape))
        else:
            out[name] = ("plain", tuple(p.shape))
    return out


def _tp_case(sequence_parallel: bool, overrides: dict) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from nexus.training.distributed.tensor_parallel import apply_tensor_parallel

    torch.manual_seed(0)
    reference = MoETransformer(MoEConfig(**{**CONFIG, **overrides}))
    model = copy.deepcopy(reference)
    if torch.distributed.get_rank() != 0:  # ranks that initialised differently end up with tp rank 0's weights
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    assert apply_tensor_parallel(model, mesh, sequence_parallel=sequence_parallel) is model
    out = _compare_with_one_process(model, model, reference, dp_rank=0, dp_size=1, per_rank=2)
    out["layouts"] = _layouts(model)
    out["tied"] = model.lm_head.weight is model.embed_tokens.weight
    return out


def check_sequence_parallel(rank: int, world_size: int) -> dict:
    return _tp_case(True, {})


def check_no_sequence_parallel_capacity_tied(rank: int, world_size: int) -> dict:
    return _tp_case(False, {"moe_capacity_factor": 1.0, "tie_embeddings": True})


def check_bad_input(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from nexus.training.distributed.tensor_parallel import apply_tensor_parallel

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    errors = {}
    for key, overrides in (("kv_heads", dict(n_heads=4, n_kv_heads=1)),
                           ("heads", dict(d_model=24, n_heads=3, n_kv_heads=1))):
        try:
            apply_tensor_parallel(MoETransformer(MoEConfig(**{**CONFIG, **overrides})), mesh)
        except ValueError as exc:
            errors[key] = str(exc)
    model = apply_tensor_parallel(MoETransformer(MoEConfig(**CONFIG)), mesh)
    try:
        model(torch.zeros(1, 15, dtype=torch.long))
    except ValueError as exc:
        errors["seq"] = str(exc)
    try:
        apply_tensor_parallel(model, mesh)
    except ValueError as exc:
        errors["twice"] = str(exc)
    try:
        apply_tensor_parallel(torch.nn.Linear(4, 4), mesh)
    except TypeError as exc:
        errors["type"] = str(exc)
    return errors


def check_meta_device_then_init(rank: int, world_size: int) -> dict:
    # the large-model path: build on meta, parallelise, then allocate and initialise only the local shards
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from nexus.training.distributed.tensor_parallel import apply_tensor_parallel

    with torch.device("meta"):
        model = MoETransformer(MoEConfig(**CONFIG))
    apply_tensor_parallel(model, init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    gen = torch.Generator().manual_seed(3)
    window = torch.randint(0, CONFIG["vocab_size"], (2, SEQ + CONFIG["n_pred_tokens"]), generator=gen)
    out = model(window[:, :SEQ])
    loss_of(out, window).backward()
    q = dict(model.named_parameters())["layers.0.mixer.q_proj.weight"]
    return {"finite": bool(torch.isfinite(out.logits).all()) and all(torch.isfinite(_full(p.grad)).all()
                                                                      for p in model.parameters()),
            "q_std": q.full_tensor().std().item(), "q_local": tuple(q.to_local().shape),
            "plain": {n: p.detach().clone() for n, p in model.named_parameters() if not isinstance(p, DTensor)}}


@pytest.fixture(scope="module")
def tp2():
    return run_distributed_checks([check_sequence_parallel, check_no_sequence_parallel_capacity_tied, check_bad_input,
                                   check_meta_device_then_init], world_size=2, timeout=300)


def _assert_matches_one_process(res: dict) -> None:
    assert res["n_params"][0] == res["n_params"][1]
    assert max(res["logits"]) <= LOGIT_ATOL, res["logits"]
    assert max(res["loss"]) <= LOSS_ATOL, res["loss"]
    for step, (diff, name, scale) in enumerate(res["grads"]):
        assert diff <= GRAD_ATOL, (step, name, diff, scale)
    assert res["min_grad_scale"] > 0  # every parameter got a gradient
    assert res["params"][0] <= PARAM_ATOL, res["params"]


@pytest.mark.parametrize("check", ["check_sequence_parallel", "check_no_sequence_parallel_capacity_tied"])
def test_tp2_matches_one_process(tp2, check):
    for res in tp2[check]:
        _assert_matches_one_process(res)


def test_tp2_layouts(tp2):
    sp = tp2["check_sequence_parallel"][0]["layouts"]
    no_sp = tp2["check_no_sequence_parallel_capacity_tied"][0]["layouts"]
    d, hd = CONFIG["d_model"], CONFIG["d_model"] // CONFIG["n_heads"]
    for layouts in (sp, no_sp):
        # heads split whole: 2 of 4 query heads, 1 of 2 kv heads per rank
        assert layouts["layers.0.mixer.q_proj.weight"] == ("Shard(dim=0)", (2 * hd, d))
        assert layouts["layers.0.mixer.k_proj.weight"] == ("Shard(dim=0)", (1 * hd, d))
        assert layouts["layers.0.mixer.o_proj.weight"] == ("Shard(dim=1)", (d, 2 * hd))
        assert layouts["layers.0.ffn.gate_proj.weight"] == ("Shard(dim=0)", (24, d))
        assert layouts["layers.0.ffn.down_proj.weight"] == ("Shard(dim=1)", (d, 24))
        assert layouts["layers.1.ffn.experts.2.up_proj.weight"] == ("Shard(dim=0)", (16, d))
        assert layouts["layers.1.ffn.experts.2.down_proj.weight"] == ("Shard(dim=1)", (d, 16))
        assert layouts["layers.1.ffn.shared.gate_proj.weight"] == ("Shard(dim=0)", (16, d))
        assert layouts["layers.3.block.mixer.v_proj.weight"] == ("Shard(dim=0)", (hd, d))
        assert layouts["mtp_heads.0.block.ffn.up_proj.weight"] == ("Shard(dim=0)", (24, d))
        assert layouts["embed_tokens.weight"] == ("Shard(dim=0)", (64, d))
        assert layouts["lm_head.weight"] == ("Shard(dim=0)", (64, d))
        # replicated: routers, the RoM mixer
        for name in ("layers.1.ffn.router.weight", "layers.3.router.weight", "layers.2.mixer.in_experts.0.weight"):
            assert layouts[name][0] == "plain", name
        assert layouts["layers.3.block.ffn_norm.weight"][0] == "plain"  # inside MoD: no sequence parallel
    # norms on the residual stream: replicated DTensors under sequence parallel, plain without
    assert sp["layers.0.mixer_norm.weight"][0] == "Replicate()" and sp["mtp_heads.0.norm.weight"][0] == "Replicate()"
    assert no_sp["layers.0.mixer_norm.weight"][0] == "plain"
    assert tp2["check_no_sequence_parallel_capacity_tied"][0]["tied"]
    assert not tp2["check_sequence_parallel"][0]["tied"]


def test_tp2_bad_input_names_the_problem(tp2):
    errors = tp2["check_bad_input"][0]
    assert "tp=2" in errors["kv_heads"] and "n_kv_heads=1" in errors["kv_heads"]
    assert "n_heads=3" in errors["heads"] and "n_kv_heads=1" in errors["heads"]
    assert "T=15" in errors["seq"] and "tp=2" in errors["seq"]
    assert "already" in errors["twice"]
    assert "MoETransformer" in errors["type"] and "Linear" in errors["type"]


def test_tp2_from_the_meta_device(tp2):
    results = tp2["check_meta_device_then_init"]
    hd = CONFIG["d_model"] // CONFIG["n_heads"]
    for res in results:
        assert res["finite"] and res["q_local"] == (2 * hd, CONFIG["d_model"])
        assert abs(res["q_std"] - MoEConfig(**CONFIG).init_std) < 0.004  # normal(0, 0.02) over 1024 entries
    for name, p in results[1]["plain"].items():  # replicated weights agree across the tp ranks
        assert torch.equal(p, results[0]["plain"][name]), name


def test_size_check_without_a_mesh():
    cfg = MoEConfig(**CONFIG)
    check_tensor_parallel_sizes(cfg, 2)
    with pytest.raises(ValueError, match=r"tp=4 .*n_kv_heads=2"):
        check_tensor_parallel_sizes(cfg, 4)
    with pytest.raises(ValueError, match=r"d_ff_dense=48"):
        check_tensor_parallel_sizes(MoEConfig(**{**CONFIG, "d_ff_dense": 48}), 32)
    with pytest.raises(ValueError, match="tp=0"):
        check_tensor_parallel_sizes(cfg, 0)


def _dp2_tp2(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from nexus.training.distributed.data_parallel import wrap_data_parallel
    from nexus.training.distributed.tensor_parallel import apply_tensor_parallel

    torch.manual_seed(0)
    reference = MoETransformer(MoEConfig(**CONFIG))
    model = copy.deepcopy(reference)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "tp"))
    apply_tensor_parallel(model, mesh, sequence_parallel=True)  # picks the "tp" dimension
    out = {}
    try:
        wrap_data_parallel(model, mesh["dp_shard"])
    except ValueError as exc:
        out["ddp_refused"] = str(exc)
    for layer in model.layers:  # torchtitan's order: tensor parallel, then FSDP per block, then the root
        fully_shard(layer, mesh=mesh["dp_shard"])
    fully_shard(model, mesh=mesh["dp_shard"])
    out.update(_compare_with_one_process(model, model, reference, dp_rank=mesh["dp_shard"].get_local_rank(),
                                         dp_size=2, per_rank=2))
    q = dict(model.named_parameters())["layers.0.mixer.q_proj.weight"]
    out["q_layout"] = (tuple(repr(p) for p in q.placements), tuple(q.to_local().shape))
    return out


def test_dp2_tp2_with_fsdp2_matches_one_process():
    results = run_distributed(_dp2_tp2, world_size=4, timeout=400)
    hd = CONFIG["d_model"] // CONFIG["n_heads"]
    for res in results:
        _assert_matches_one_process(res)
        assert "DTensor" in res["ddp_refused"] and "fully_shard" in res["ddp_refused"]
        # q_proj [4 heads * hd, d]: heads split over tp (Shard 0), then rows split again over dp by FSDP2
        assert res["q_layout"][1] == (hd, CONFIG["d_model"]) and len(res["q_layout"][0]) == 2
