"""Muon and SOAP on FSDP2-sharded parameters: 2 and 4 Gloo ranks against one process.

FSDP2 (torch's ``fully_shard`` per block, then the root, applied here directly) keeps each
parameter as a DTensor of dim-0 blocks; Muon and SOAP must still see whole matrices. Each rank
trains on its slice of a global batch (loss = mean over the slice; FSDP2 averages gradients), so the
averaged gradient is the full-batch gradient. Two models: the tiny MoE transformer (every feature
on) and ``OddModel``, whose first dims (7, 5, 9, 3) do not divide 2 or 4 (FSDP2 pads; some ranks
hold empty blocks), with a 3D stack, a 4D weight, and SOAP matrices preconditioned on one side, on
both, and on neither. Meshes: 1-D over 2 and 4 ranks, HSDP (2 x 2: Replicate over dp_replicate,
Shard(0) over dp_shard), and tensor parallelism then FSDP2 (2 x 2: dp_shard x tp) on ``TPModel``,
whose column-parallel weight FSDP2 turns into strided shards (the general, all-gather path).

Two comparisons with one process, after STEPS steps (SOAP: a basis-building step, then updates
with a basis refresh at t = 2):
- Shadow (every run): each rank also steps an unsharded copy of the model with its own optimizer on
  the very same gradients (all-gathered). The sharded optimizer does the same float operations on
  the same whole matrices, so the parameters must agree exactly (measured: 0.0 everywhere; bound
  SHADOW_ATOL = 1e-12 only leaves room for a BLAS that batches a 3D stack differently by size).
- Independent: one process trains the same model on the full batch. float64 throughout, because
  SOAP amplifies rounding: in one fp32 process, perturbing gradients by 3e-8 relative moves the
  odd model's SOAP parameters by 3e-4 within 4 steps (a first Adam step is sign-like in the
  eigenbasis). In float64 the measured differences are <= 8.4e-9 (Muon MoE: its AdamW norm scales;
  SOAP odd: 4e-10); INDEPENDENT_ATOL = 1e-7 is 1e5 below one step's update (~lr = 1e-2), which a
  locally orthogonalized shard, a lost or misplaced block moves entries by. SOAP on the MoE model is
  left to the shadow comparison: single-process SOAP on it is chaotic even in float64 (a 1e-15
  relative perturbation of the gradients moves parameters by 0.06 to 97 in 4 steps: experts seeing
  few tokens give rank-deficient statistics whose tied zero eigenvalues the refresh orders by
  rounding), so no tolerance separates right from wrong there.

Work split: ``orthogonalize`` (Muon) and ``update_preconditioners`` (SOAP) are patched in each rank
to record the matrices they get: over all ranks every matrix appears exactly once per step, whole,
every rank gets some and none gets all (not checked for the TP run: its one plain matrix is sharded
over dp only, so each tensor-parallel rank's data-parallel group updates its own copy).

Checkpoints: ``torch.distributed.checkpoint`` saves model and optimizer at 2 ranks after RESUME_AT
steps; a fresh 2-rank model resumes bit-identically, and 4 ranks resume from the same files (Muon's
momentum is resharded, SOAP's owner-held whole statistics load onto the new owners) and match the
one-process uninterrupted run.
"""
from __future__ import annotations

import collections
import contextlib
import os
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from torch import nn

from nexus.models.moe import MoEConfig, MoETransformer
from nexus.training.losses import multi_token_prediction_loss
from nexus.training.optimizers import muon as muon_module
from nexus.training.optimizers import soap as soap_module
from nexus.training.optimizers.muon import get_muon_optimizer
from nexus.training.optimizers.soap import SOAP
from nexus_kernels._backend import forced
from tests.distributed.harness import run_distributed
from tests.distributed.models import MOE_CONFIG, spawns, zero_fill_missing_grads





CONFIG = MOE_CONFIG
SEQ, GLOBAL, STEPS, RESUME_AT = 16, 4, 4, 2
ODD_BATCH = 16  # rows per step: more than any dim, so each gradient has full rank (SOAP's bases are unique)
SHADOW_ATOL, INDEPENDENT_ATOL = 1e-12, 1e-7


# ---------------------------------------------------------------------------------------------
# models, data, optimizers (the same code in the ranks and in the parent)


class Linear(nn.Module):
    def __init__(self, rows: int, cols: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(rows, cols) / cols**0.5)
        self.bias = nn.Parameter(torch.randn(rows) * 0.1) if bias else None

    def forward(self, x):
        y = x @ self.weight.T
        return y + self.bias if self.bias is not None else y


class Stack(nn.Module):
    """A 3D stack of (5, 4) matrices (like MoE expert weights); matrix e sees x rolled by e features (so the
    three gradients are independent: SOAP's L has distinct eigenvalues), outputs summed."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 5, 4) / 5**0.5)

    def forward(self, x):
        return (torch.stack([x.roll(e, dims=1) for e in range(3)]) @ self.weight).sum(0)


class Conv(nn.Module):
    """A 4D (out, in, kh, kw) weight applied as its (3, 4) flattening."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 2, 2, 1) / 2)

    def forward(self, x):
        return x @ self.weight.flatten(1).T


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Linear(7, 6)
        self.scale = nn.Parameter(torch.ones(7))  # 1D: AdamW (Muon) / Adam (SOAP) on its blocks

    def forward(self, x):
        return torch.tanh(self.inner(x)) * self.scale


class OddModel(nn.Module):
    """x [B, 6] -> [B, 9]; blocks: (7, 6) + (7,), (5, 7) + bias (5,), (3, 5, 4), (3, 2, 2, 1), (9, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Scaled(), Linear(5, 7, bias=True), Stack(), Conv(), Linear(9, 8)])

    def forward(self, x):
        h = self.layers[1](self.layers[0](x))
        s = self.layers[2](h)
        c = self.layers[3](s)
        return self.layers[4](torch.cat([s, c, h[:, :1]], dim=1))


class TPBlock(nn.Module):
    """x + down(relu(up(x))) for tensor parallelism (up column-wise, down row-wise), then proj."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 8)
        self.down = nn.Linear(8, 6, bias=False)
        self.proj = nn.Linear(6, 5, bias=False)

    def forward(self, x):
        return self.proj(x + self.down(torch.relu(self.up(x))))


class TPModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([TPBlock()])

    def forward(self, x):
        return self.layers[0](x)


def make_model(kind: str) -> nn.Module:
    """float64 (see the module docstring: SOAP amplifies fp32 rounding chaotically)."""
    torch.manual_seed(0)
    model = {"moe": lambda: MoETransformer(MoEConfig(**CONFIG)), "odd": OddModel, "tp": TPModel}[kind]()
    return model.to(torch.float64)


def batch(kind: str, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + step)
    if kind == "moe":
        return torch.randint(0, CONFIG["vocab_size"], (GLOBAL, SEQ + CONFIG["n_pred_tokens"]), generator=gen)
    return torch.randn(ODD_BATCH, 6, generator=gen, dtype=torch.float64)  # odd and tp models


def loss_of(kind: str, model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    if kind == "moe":
        out = model(rows[:, :SEQ])
        return multi_token_prediction_loss(out.logits, out.mtp_logits, rows)[0] + out.aux_loss
    return (model(rows) - 0.5).square().mean()


def make_optimizer(name: str, kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "muon":
        return get_muon_optimizer(model, lr=0.02, momentum=0.9, weight_decay=0.1, adamw_lr=1e-2)
    # MoE: the (128, 32) embedding and head get R only, the 32x32 matrices both sides. Odd model (max 6):
    # (7, 6) R only, (5, 7) and the (3, 20) stack L only, (3, 4) both, (9, 8) none (elementwise Adam).
    return SOAP(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01, precondition_frequency=2,
                max_precond_dim=64 if kind == "moe" else 6)


def train_steps(kind: str, model, opt, steps: range, slice_of=lambda rows: rows) -> None:
    for step in steps:
        loss_of(kind, model, slice_of(batch(kind, step))).backward()
        zero_fill_missing_grads(model)
        opt.step()
        opt.zero_grad(set_to_none=True)


def reference(name: str, kind: str) -> dict[str, torch.Tensor]:
    """One process, full batch, STEPS steps of the same optimizer."""
    with forced("reference"):
        model = make_model(kind)
        train_steps(kind, model, make_optimizer(name, kind, model), range(STEPS))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def expected_matrices(name: str, kind: str) -> Counter:
    """Multiset of the whole matrices one step orthogonalizes (Muon) or preconditions (SOAP)."""
    model = make_model(kind)
    opt = make_optimizer(name, kind, model)
    out = Counter()
    for group in opt.param_groups:
        if name == "muon" and not group["use_muon"]:
            continue
        for p in group["params"]:
            shape = tuple(p.shape)
            if name == "soap":
                if soap_module._preconditioned(shape, group["max_precond_dim"]):
                    out[soap_module._matrix_dims(shape)] += 1
            elif len(shape) == 3:
                out[shape[1:]] += shape[0]
            else:
                out[(shape[0], int(torch.tensor(shape[1:]).prod()))] += 1
    return out


# ---------------------------------------------------------------------------------------------
# rank side


def make_mesh(world_size: int, hsdp: bool, kind: str = ""):
    from torch.distributed.device_mesh import init_device_mesh

    if kind == "tp":
        return init_device_mesh("cpu", (world_size // 2, 2), mesh_dim_names=("dp_shard", "tp"))
    if hsdp:
        return init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    return init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp_shard",))


def sharded_model(kind: str, mesh) -> nn.Module:
    """FSDP2 per block and root; for "tp", tensor parallelism over mesh["tp"] first, then FSDP2 over
    mesh["dp_shard"] (torchtitan's order): up/down become 2-D DTensors, up's with strided shards."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = make_model(kind)
    if kind == "tp":
        parallelize_module(model.layers[0], mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        mesh = mesh["dp_shard"]
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # an expert with no tokens on a rank sends zeros, so every rank joins the same reduce-scatters
    model.set_reduce_scatter_unused_params(True)
    return model


def rank_slice(rank: int, world_size: int, kind: str = ""):
    """This rank's rows of a global batch; the tensor-parallel pair of a "tp" run shares its rows."""
    if kind == "tp":
        rank, world_size = rank // 2, world_size // 2

    def take(rows):
        per = rows.shape[0] // world_size
        return rows[rank * per:(rank + 1) * per]
    return take


@contextlib.contextmanager
def recording_matrices(name: str):
    """Patch this rank's orthogonalize (Muon) or update_preconditioners (SOAP) to record the shapes of
    the matrices it gets, one (rows, cols) per matrix (a 3D stack counted as its matrices); yields the list."""
    seen = []
    module, attr = (muon_module, "orthogonalize") if name == "muon" else (soap_module, "update_preconditioners")
    original = getattr(module, attr)

    def counting(*args, **kwargs):
        G = args[0] if name == "muon" else args[2]
        seen.extend([tuple(G.shape[1:])] * G.shape[0] if G.dim() == 3 else [tuple(G.shape)])
        return original(*args, **kwargs)
    setattr(module, attr, counting)
    try:
        yield seen
    finally:
        setattr(module, attr, original)


def full_params(model) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor() for n, p in model.named_parameters()}  # collective: every rank, same order


def train_sharded(rank: int, world_size: int, name: str, kind: str, hsdp: bool = False) -> dict:
    """STEPS steps of the sharded model on this rank's slice. Beside it, a shadow: the same model unsharded
    with its own optimizer, stepped on the very same (all-gathered) gradients, so that any difference
    between the two is the sharded optimizer's, not the data-parallel gradient's rounding."""
    from torch.distributed.tensor import DTensor

    model = sharded_model(kind, make_mesh(world_size, hsdp, kind))
    opt = make_optimizer(name, kind, model)
    shadow = make_model(kind)
    shadow_opt = make_optimizer(name, kind, shadow)
    take = rank_slice(rank, world_size, kind)
    shadow_gap = 0.0
    with forced("reference"):
        for step in range(STEPS):
            loss_of(kind, model, take(batch(kind, step))).backward()
            for p, q in zip(model.parameters(), shadow.parameters()):
                q.grad = p.grad.full_tensor()  # FSDP2 gives unused parameters zero gradients: never None
            with recording_matrices(name) as seen:
                opt.step()
            shadow_opt.step()
            opt.zero_grad(set_to_none=True)
            shadow_opt.zero_grad(set_to_none=True)
            whole = full_params(model)
            shadow_gap = max([shadow_gap] + [(whole[n] - q).abs().max().item() for n, q in shadow.named_parameters()])
            seen_per_step = seen if step == 0 else seen_per_step + seen
    names = {id(p): n for n, p in model.named_parameters()}
    state_kinds = {}
    for p, state in opt.state.items():
        state_kinds[names[id(p)]] = {k: "dtensor" if isinstance(v, DTensor) else type(v).__name__
                                     for k, v in state.items()}
    return {"params": whole if rank == 0 else None, "shadow_gap": shadow_gap, "matrices": seen_per_step,
            "state": state_kinds, "placements": {n: str(p.placements) for n, p in model.named_parameters()}}


def resume_from_checkpoint(rank: int, world_size: int, name: str, kind: str, ckpt: str, save: bool) -> dict:
    """save: train RESUME_AT steps, save, go on to STEPS; then (any world size) a fresh model loads the
    checkpoint and trains the remaining steps. Returns both runs' final parameters (rank 0)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    mesh = make_mesh(world_size, hsdp=False)
    take = rank_slice(rank, world_size)
    out = {}
    with forced("reference"):
        if save:
            model = sharded_model(kind, mesh)
            opt = make_optimizer(name, kind, model)
            train_steps(kind, model, opt, range(RESUME_AT), take)
            model_sd, optim_sd = get_state_dict(model, opt)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
            train_steps(kind, model, opt, range(RESUME_AT, STEPS), take)
            out["uninterrupted"] = full_params(model)
        model = sharded_model(kind, mesh)
        opt = make_optimizer(name, kind, model)
        model_sd, optim_sd = get_state_dict(model, opt)
        loaded = {"model": model_sd, "optim": optim_sd}
        dcp.load(loaded, checkpoint_id=ckpt)
        set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
        train_steps(kind, model, opt, range(RESUME_AT, STEPS), take)
        out["resumed"] = full_params(model)
    return out if rank == 0 else None


def _checks(rank: int, world_size: int, ckpt_root: str) -> dict:
    results = {}
    runs = [(f"{name}_{kind}", (name, kind)) for kind in ("odd", "moe") for name in ("muon", "soap")]
    if world_size == 4:
        runs += [(f"{name}_odd_hsdp", (name, "odd", True)) for name in ("muon", "soap")]
        runs += [(f"{name}_tp", (name, "tp")) for name in ("muon", "soap")]
    for label, args in runs:
        results[label] = train_sharded(rank, world_size, *args)
        dist.barrier()
    for name in ("muon", "soap"):
        results[f"{name}_dcp"] = resume_from_checkpoint(rank, world_size, name, "odd",
                                                        os.path.join(ckpt_root, name), save=world_size == 2)
        dist.barrier()
    return results


# ---------------------------------------------------------------------------------------------
# parent side


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sharded_optim_ckpt"))


@pytest.fixture(scope="module")
def two_ranks(ckpt_root):
    return run_distributed(_checks, world_size=2, args=(ckpt_root,), timeout=600)


@pytest.fixture(scope="module")
def four_ranks(ckpt_root, two_ranks):  # resumes from the checkpoint the 2-rank run saved
    return run_distributed(_checks, world_size=4, args=(ckpt_root,), timeout=600)


@pytest.fixture(scope="module")
def runs(two_ranks, four_ranks):
    return {2: two_ranks, 4: four_ranks}


_references: dict = {}


def cached_reference(name: str, kind: str) -> dict:
    if (name, kind) not in _references:
        _references[name, kind] = reference(name, kind)
    return _references[name, kind]


def _name_kind(label: str) -> tuple[str, str]:
    name, kind = label.split("_")[:2]
    return name, kind


def assert_params_match(got: dict, want: dict, atol: float) -> None:
    assert got.keys() == want.keys()
    worst, where = max(((got[n] - want[n]).abs().max().item(), n) for n in want)
    print(f"max abs difference from one process: {worst:.3g} ({where})")
    assert worst <= atol, f"{where} differs from one process by {worst:.3g} > {atol}"


LABELS = [(world, f"{name}_{kind}") for world in (2, 4) for kind in ("odd", "moe") for name in ("muon", "soap")]
LABELS += [(4, "muon_odd_hsdp"), (4, "soap_odd_hsdp")]
TP_LABELS = [(4, "muon_tp"), (4, "soap_tp")]


@spawns
@pytest.mark.parametrize("world, label", LABELS + TP_LABELS)
def test_sharded_step_equals_unsharded_step_on_the_same_gradients(runs, world, label):
    gaps = [r[label]["shadow_gap"] for r in runs[world]]
    print(f"{label} at {world} ranks: max gap to the shadow over {STEPS} steps, per rank: {gaps}")
    assert max(gaps) <= SHADOW_ATOL, gaps


@spawns
@pytest.mark.parametrize("world, label", [(w, lab) for w, lab in LABELS + TP_LABELS if lab != "soap_moe"])
def test_sharded_run_matches_one_process(runs, world, label):
    assert_params_match(runs[world][0][label]["params"], cached_reference(*_name_kind(label)), INDEPENDENT_ATOL)


@spawns
def test_the_cases_are_the_intended_ones(runs):
    """The odd model's first dims do not divide 4 (empty blocks at 4 ranks), HSDP replicates, the
    stack is split by whole matrices on a 1-D mesh, and the reference updates are far above the bounds."""
    placements = runs[4][0]["muon_odd"]["placements"]
    assert placements["layers.1.weight"] == "(Shard(dim=0),)"
    assert runs[4][0]["muon_odd_hsdp"]["placements"]["layers.1.weight"] == "(Replicate(), Shard(dim=0))"
    tp = runs[4][0]["muon_tp"]["placements"]
    assert "_StridedShard" in tp["layers.0.up.weight"] and tp["layers.0.down.weight"] == "(Shard(dim=0), Shard(dim=1))"
    assert {p.shape[0] % 4 for p in make_model("odd").parameters()} >= {1, 3}
    for name in ("muon", "soap"):
        for kind in ("odd", "tp"):
            moved = min((cached_reference(name, kind)[n] - p).abs().max().item()
                        for n, p in make_model(kind).named_parameters())
            assert moved > 1e4 * INDEPENDENT_ATOL, (name, kind, moved)


@spawns
@pytest.mark.parametrize("world, label", LABELS)
def test_each_matrix_is_computed_whole_once_and_the_work_is_spread(runs, world, label):
    name, kind = _name_kind(label)
    per_rank = [Counter(r[label]["matrices"]) for r in runs[world]]
    expected = expected_matrices(name, kind)
    assert sum(per_rank, Counter()) == Counter({shape: n * STEPS for shape, n in expected.items()})
    cost = muon_module._orthogonalize_cost if name == "muon" else soap_module._soap_cost
    loads = [sum(cost(shape) * n for shape, n in c.items()) for c in per_rank]
    print(f"{label} at {world} ranks: matrices per rank over {STEPS} steps {[sum(c.values()) for c in per_rank]}, "
          f"work {loads}")
    assert all(load > 0 for load in loads), loads  # every rank takes a share ...
    # ... and none much more than its share: LPT keeps the heaviest within one parameter's work of the mean
    model = make_model(kind)
    largest = max(cost(tuple(p.shape)) for group in make_optimizer(name, kind, model).param_groups
                  for p in group["params"] if p.dim() >= 2 and group.get("use_muon", True))
    assert max(loads) <= sum(loads) / world + largest * STEPS, loads


@spawns
def test_state_layout(runs):
    """Muon's momentum and every AdamW / Adam moment are DTensors like their parameters (DCP shards them);
    SOAP's whole-matrix state lives on exactly one rank per matrix, the others keep the step count."""
    for r in runs[2]:
        for param, state in r["muon_moe"]["state"].items():
            assert set(state.values()) <= {"dtensor", "int"}, (param, state)
    for world in (2, 4):
        holders = collections.defaultdict(list)
        for rank, r in enumerate(runs[world]):
            for param, state in r["soap_moe"]["state"].items():
                if "exp_avg" not in state:
                    assert set(state) == {"step"}, (param, state)
                elif state["exp_avg"] == "Tensor":
                    assert {state[k] for k in state if k != "step"} == {"Tensor"}, (param, state)
                    assert "L" in state or "R" in state, (param, state)
                    holders[param].append(rank)
                else:  # unpreconditioned (1D): elementwise Adam on sharded moments
                    assert state["exp_avg"] == state["exp_avg_sq"] == "dtensor", (param, state)
        matrices = [n for n, p in make_model("moe").named_parameters() if p.dim() >= 2]
        assert sorted(holders) == sorted(matrices)
        assert all(len(ranks) == 1 for ranks in holders.values()), holders
        assert {ranks[0] for ranks in holders.values()} == set(range(world))


@spawns
@pytest.mark.parametrize("name", ["muon", "soap"])
def test_checkpoint_resumes_bit_identically_at_two_ranks(runs, name):
    got = runs[2][0][f"{name}_dcp"]
    for n, p in got["uninterrupted"].items():
        assert torch.equal(got["resumed"][n], p), n


@spawns
@pytest.mark.parametrize("name", ["muon", "soap"])
def test_checkpoint_saved_at_two_ranks_resumes_at_four(runs, name):
    assert_params_match(runs[4][0][f"{name}_dcp"]["resumed"], cached_reference(name, "odd"), INDEPENDENT_ATOL)


# ---------------------------------------------------------------------------------------------
# single-process pieces


def test_owners_go_largest_first_to_the_least_loaded_rank():
    from nexus.training.optimizers._sharded import assign_owners

    assert assign_owners([4.0, 1.0, 1.0, 1.0], world=2) == [0, 1, 1, 1]
    assert assign_owners([1.0, 3.0, 2.0, 2.0], world=2) == [0, 0, 1, 1]  # 3 -> r0, 2 -> r1, 2 -> r1, 1 -> r0
    assert assign_owners([], world=3) == []
    with pytest.raises(ValueError, match="world must be >= 1"):
        assign_owners([1.0], world=0)


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (3, 5, 4), (1, 3), (9, 8, 2)])
@pytest.mark.parametrize("mesh_shape, placements", [
    ((4,), ("S0",)), ((2,), ("S1",)), ((2, 2), ("R", "S0")), ((2, 2), ("S0", "S0")), ((2, 3), ("S0", "S1")),
    ((3, 2), ("S1", "R"))])
def test_blocks_follow_dtensor_chunking(shape, mesh_shape, placements):
    """Every rank's block (the owner's map of who holds what) against DTensor's own local shape and offset."""
    import itertools

    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    from nexus.training.optimizers._sharded import _block

    placements = [Replicate() if p == "R" else Shard(int(p[1])) for p in placements]
    covered = torch.zeros(shape, dtype=torch.int64)
    for coord in itertools.product(*(range(n) for n in mesh_shape)):
        block = _block(shape, placements, coord, mesh_shape)
        size, offset = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coord), placements)
        assert tuple(s.stop - s.start for s in block) == tuple(size), coord
        if all(n > 0 for n in size):
            assert tuple(s.start for s in block) == tuple(offset), coord
        covered[block] += 1
    replicas = 1
    for n, p in zip(mesh_shape, placements):
        replicas *= n if isinstance(p, Replicate) else 1
    assert bool((covered == replicas).all())  # the blocks of one replica tile the tensor exactly once
