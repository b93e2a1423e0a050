"""Sharded checkpoints (save_sharded / load_sharded / export_safetensors) on the FSDP2-wrapped MoE model.

Three spawns: 2 ranks (save at step 2, continue; a fresh differently-initialised model loads the
checkpoint and continues: bit-identical; export; incompatible models; a failing save), then 4 ranks
as 2 nodes x 2 (load the 2-rank checkpoint into an HSDP + CPU-offload model and continue; train
from scratch, save, continue), then 2 ranks again (load the 4-rank checkpoint into a shard_grad_op +
activation-checkpointing model and continue).

Every run sees the same global batch per step (GLOBAL rows, rank r takes its contiguous slice), so
the loss is the same function of the parameters at any world size and continuations at another
world size differ only by reduction order. Tolerance for those: fp32, 2 AdamW steps after the load
at lr=1e-2, eps=1e-6 (AdamW turns a gradient difference dg into an update difference up to
lr * dg / eps; eps=1e-8 measured 2e-4 on near-zero gradients); measured max abs difference 2.4e-7
(2 -> 4) and 1.2e-7 (4 -> 2); atol 5e-5 is 200x below one step's update (~lr), which a wrongly
resharded optimizer moment or parameter shard exceeds.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from nexus.models.moe import MoEConfig, MoETransformer
from nexus.training.distributed.checkpointing import export_safetensors, load_sharded, save_sharded
from nexus.training.distributed.fsdp2 import FSDP2Config, wrap_model_fsdp2
from nexus.training.losses import multi_token_prediction_loss
from tests.distributed.harness import run_distributed

CONFIG = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32, d_ff_dense=32, max_seq_len=32,
              use_moe=True, n_experts=4, moe_top_k=2, n_shared_experts=1, moe_layer_interval=1, use_mod=True,
              mod_capacity_factor=0.5, mod_layer_interval=2, use_mamba=True, mamba_layer_interval=2, mamba_d_state=8,
              mamba_expand=2, mamba_head_dim=16, mamba_chunk_size=8, rom_n_experts=2, rom_top_k=1, n_pred_tokens=2,
              balance_loss_weight=0.0)
SEQ, GLOBAL, SAVE_AT, STEPS, LR, EPS = 16, 4, 2, 4, 1e-2, 1e-6
ATOL = 5e-5
EXTRA = {"step": SAVE_AT, "rng": torch.arange(5), "schedule": {"lr": [0.1, 0.2]}}


def global_batch(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(200 + step)
    return torch.randint(0, CONFIG["vocab_size"], (GLOBAL, SEQ + CONFIG["n_pred_tokens"]), generator=gen)


def build(seed: int, fsdp: dict | None = None, **overrides):
    """(FSDP2-wrapped model, AdamW) with weights from ``seed``; fp32 so that continuations compare exactly.

    fsdp: FSDP2Config fields (default full sharding): loads may change the layout as well as the world.
    """
    torch.manual_seed(seed)
    config = FSDP2Config(**{"sharding_strategy": "full", "param_dtype": torch.float32, **(fsdp or {})})
    model = wrap_model_fsdp2(MoETransformer(MoEConfig(**{**CONFIG, **overrides})), config)
    return model, torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)


def train(model, opt, rank: int, world_size: int, steps) -> None:
    per = GLOBAL // world_size
    for step in steps:
        window = global_batch(step)[rank * per:(rank + 1) * per]
        out = model(window[:, :SEQ])
        loss = multi_token_prediction_loss(out.logits, out.mtp_logits, window)[0] + out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def full_params(model) -> dict | None:
    """The unsharded parameters on rank 0 (None elsewhere); collective."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if dist.get_rank() == 0 else None


def error_of(fn) -> str | None:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def first_two_ranks(rank: int, world_size: int, root: str) -> dict:
    import torch.distributed as dist
    import torch.distributed.checkpoint.filesystem as dcp_fs

    out = {}
    model, opt = build(0)
    train(model, opt, rank, world_size, range(SAVE_AT))
    save_sharded(os.path.join(root, "a2"), model, opt, EXTRA)
    out["at_save"] = full_params(model)
    train(model, opt, rank, world_size, range(SAVE_AT, STEPS))
    out["continued"] = full_params(model)
    out["logits"] = model(global_batch(9)[:, :SEQ]).logits.detach()  # every rank, full batch
    export_safetensors(model, os.path.join(root, "model.safetensors"))

    resumed, ropt = build(1)  # other weights: only the load can make it match
    out["extra"] = load_sharded(os.path.join(root, "a2"), resumed, ropt)
    train(resumed, ropt, rank, world_size, range(SAVE_AT, STEPS))
    out["resumed"] = full_params(resumed)

    # incompatible models, a missing checkpoint, a checkpoint without optimizer state
    wide, wopt = build(0, d_ff=48)
    out["err_shape"] = error_of(lambda: load_sharded(os.path.join(root, "a2"), wide, wopt))
    deep, dopt = build(0, n_layers=3)  # layers 0 and 1 as saved, layer 2 new
    out["err_keys"] = error_of(lambda: load_sharded(os.path.join(root, "a2"), deep, dopt))
    out["err_missing"] = error_of(lambda: load_sharded(os.path.join(root, "nowhere"), resumed, ropt))
    save_sharded(os.path.join(root, "model_only"), resumed)
    out["err_no_optim"] = error_of(lambda: load_sharded(os.path.join(root, "model_only"), resumed, ropt))
    out["model_only_extra"] = load_sharded(os.path.join(root, "model_only"), resumed)

    # a save that fails on rank 1 while writing its shards, over the existing a2: a2 must survive whole
    original = dcp_fs.FileSystemWriter.write_data

    def failing_write(self, plan, planner):
        raise OSError("disk full (injected)")

    if rank == 1:
        dcp_fs.FileSystemWriter.write_data = failing_write
    try:
        out["err_failed_save"] = error_of(lambda: save_sharded(os.path.join(root, "a2"), resumed, ropt, {"step": 99}))
    finally:
        dcp_fs.FileSystemWriter.write_data = original
    out["listing_after_failure"] = sorted(os.listdir(root))
    survivor, sopt = build(2)
    out["extra_after_failure"] = load_sharded(os.path.join(root, "a2"), survivor, sopt)
    out["survivor"] = full_params(survivor)

    # a stale temporary directory (a killed save) is replaced; a directory that is not a checkpoint is refused
    if rank == 0:
        os.makedirs(os.path.join(root, ".a3.saving"))
        with open(os.path.join(root, ".a3.saving", "junk"), "w") as f:
            f.write("half")
        os.makedirs(os.path.join(root, "user_dir"))
        with open(os.path.join(root, "user_dir", "notes.txt"), "w") as f:
            f.write("keep me")
    dist.barrier()
    save_sharded(os.path.join(root, "a3"), survivor, sopt, {"step": 3})
    out["a3_files"] = sorted(os.listdir(os.path.join(root, "a3")))
    out["err_user_dir"] = error_of(lambda: save_sharded(os.path.join(root, "user_dir"), survivor, sopt))
    out["user_dir_files"] = sorted(os.listdir(os.path.join(root, "user_dir")))
    out["final_listing"] = sorted(os.listdir(root))
    return out if rank == 0 else {k: out[k] for k in out if k.startswith("err_")}


def four_ranks(rank: int, world_size: int, root: str) -> dict:
    out = {}
    # written by 2 ranks fully sharded, read by 2 nodes x 2 ranks (HSDP) with CPU offload
    model, opt = build(1, {"sharding_strategy": "hybrid", "cpu_offload": True})
    out["extra"] = load_sharded(os.path.join(root, "a2"), model, opt)
    train(model, opt, rank, world_size, range(SAVE_AT, STEPS))
    out["from_2"] = full_params(model)
    scratch, sopt = build(0)
    train(scratch, sopt, rank, world_size, range(SAVE_AT))
    save_sharded(os.path.join(root, "a4"), scratch, sopt, EXTRA)
    train(scratch, sopt, rank, world_size, range(SAVE_AT, STEPS))
    out["continued"] = full_params(scratch)
    return out if rank == 0 else {}


def second_two_ranks(rank: int, world_size: int, root: str) -> dict:
    # written by 4 ranks fully sharded, read by 2 ranks as ZeRO-2 with activation checkpointing
    model, opt = build(1, {"sharding_strategy": "shard_grad_op", "activation_checkpointing": True})
    extra = load_sharded(os.path.join(root, "a4"), model, opt)
    train(model, opt, rank, world_size, range(SAVE_AT, STEPS))
    return {"from_4": full_params(model), "extra": extra}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sharded"))
    first = run_distributed(first_two_ranks, 2, (root,), timeout=300)
    four = run_distributed(four_ranks, 4, (root,), timeout=300, local_world_size=2)
    second = run_distributed(second_two_ranks, 2, (root,), timeout=300)
    return {"root": root, "first": first, "four": four[0], "second": second[0]}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_extra(extra: dict) -> None:
    assert extra.keys() == EXTRA.keys() and extra["step"] == SAVE_AT and extra["schedule"] == EXTRA["schedule"]
    assert torch.equal(extra["rng"], EXTRA["rng"])


def test_resume_at_the_same_world_size_is_bit_identical(runs):
    first = runs["first"][0]
    assert_extra(first["extra"])
    assert max_difference(first["continued"], first["at_save"]) > 1e-3  # the continuation moved the weights
    for key, value in first["continued"].items():
        assert torch.equal(first["resumed"][key], value), key


def test_resume_from_2_ranks_at_4(runs):
    assert_extra(runs["four"]["extra"])
    diff = max_difference(runs["four"]["from_2"], runs["first"][0]["continued"])
    print(f"2 -> 4: max abs difference {diff:.3g}")
    assert diff <= ATOL


def test_resume_from_4_ranks_at_2(runs):
    assert_extra(runs["second"]["extra"])
    diff = max_difference(runs["second"]["from_4"], runs["four"]["continued"])
    print(f"4 -> 2: max abs difference {diff:.3g}")
    assert diff <= ATOL
    # the 4-rank run from scratch is the 2-rank run up to reduction order, too
    assert max_difference(runs["four"]["continued"], runs["first"][0]["continued"]) <= ATOL


def test_checkpoint_directory_layout(runs):
    files = runs["first"][0]["a3_files"]
    assert {".metadata", "extra.pt", "nexus_checkpoint.json"} <= set(files)
    assert len([f for f in files if f.endswith(".distcp")]) == 2  # one shard file per rank
    manifest = json.loads(open(os.path.join(runs["root"], "a3", "nexus_checkpoint.json")).read())
    assert manifest["world_size"] == 2 and manifest["model_class"] == "MoETransformer" and manifest["has_optimizer"]


def test_export_safetensors_loads_into_a_plain_model(runs):
    from safetensors.torch import load_file

    first = runs["first"][0]
    state = load_file(os.path.join(runs["root"], "model.safetensors"))
    for key, value in first["continued"].items():
        assert torch.equal(state[key], value), key
    plain = MoETransformer(MoEConfig(**CONFIG))
    plain.load_state_dict(state)  # strict: every key, nothing extra
    with torch.no_grad():
        logits = plain(global_batch(9)[:, :SEQ]).logits
    torch.testing.assert_close(logits, first["logits"], rtol=1e-5, atol=1e-5)


def test_export_with_tied_embeddings_single_process(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = MoETransformer(MoEConfig(**{**CONFIG, "tie_embeddings": True}))
    path = export_safetensors(model, tmp_path / "tied.safetensors")
    plain = MoETransformer(MoEConfig(**{**CONFIG, "tie_embeddings": True}))
    plain.load_state_dict(load_file(path))
    batch = global_batch(0)[:, :SEQ]
    with torch.no_grad():
        assert torch.equal(plain(batch).logits, model(batch).logits)
    assert sorted(os.listdir(tmp_path)) == ["tied.safetensors"]  # no temporary file left


def test_incompatible_checkpoints_name_the_path_and_key(runs):
    a2 = os.path.join(runs["root"], "a2")
    for rank_result in runs["first"]:
        shape = rank_result["err_shape"]
        assert shape.startswith("ValueError") and a2 in shape
        assert ("'model.layers.0.ffn.experts.0.gate_proj.weight' has shape [32, 32] in the checkpoint "
                "but [48, 32]") in shape
        keys = rank_result["err_keys"]
        assert keys.startswith("ValueError") and a2 in keys
        assert "key 'model.layers.2." in keys and "is missing from the checkpoint (and " in keys
        missing = rank_result["err_missing"]
        assert missing.startswith("FileNotFoundError") and "nowhere does not exist" in missing
        assert "model_only holds no optimizer state (saved with optimizer=None)" in rank_result["err_no_optim"]
    assert runs["first"][0]["model_only_extra"] == {}


def test_failed_save_leaves_the_previous_checkpoint_whole(runs):
    first = runs["first"][0]
    a2 = os.path.join(runs["root"], "a2")
    for rank_result in runs["first"]:
        err = rank_result["err_failed_save"]
        assert err.startswith("RuntimeError") and a2 in err and "holds what it held before" in err
        assert "rank 1: OSError: disk full (injected)" in err
    assert ".a2.saving" not in first["listing_after_failure"]
    assert_extra(first["extra_after_failure"])  # not {"step": 99}
    for key, value in first["at_save"].items():
        assert torch.equal(first["survivor"][key], value), key


def test_stale_temporary_is_replaced_and_foreign_directories_refused(runs):
    first = runs["first"][0]
    assert "junk" not in first["a3_files"]
    assert not [f for f in first["final_listing"] if f.startswith(".")]  # no .saving / .replaced left
    for rank_result in runs["first"]:
        # the same exception type on every rank, though only rank 0 looked
        refused = rank_result["err_user_dir"]
        assert refused.startswith("FileExistsError") and "not a Nexus sharded checkpoint" in refused
    assert first["user_dir_files"] == ["notes.txt"]


def test_single_process_round_trip_and_bad_extra(tmp_path):
    """No process group: a plain model and optimizer; extra must be plain data, refused before any write."""
    torch.manual_seed(0)
    model = MoETransformer(MoEConfig(**CONFIG))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    window = global_batch(0)
    out = model(window[:, :SEQ])
    multi_token_prediction_loss(out.logits, out.mtp_logits, window)[0].backward()
    opt.step()
    for bad in ({"module": nn.Linear(2, 2)}, {"fn": lambda: 0}):
        with pytest.raises(TypeError, match="extra must be plain data"):
            save_sharded(tmp_path / "bad", model, opt, bad)
    with pytest.raises(TypeError, match="extra must be a dict or None, got list"):
        save_sharded(tmp_path / "bad", model, opt, [1])
    assert not os.listdir(tmp_path)
    save_sharded(tmp_path / "ok", model, opt, {"step": 1})
    torch.manual_seed(5)
    other = MoETransformer(MoEConfig(**CONFIG))
    other_opt = torch.optim.AdamW(other.parameters(), lr=LR, eps=EPS)
    assert load_sharded(tmp_path / "ok", other, other_opt) == {"step": 1}
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(p, q), name
        assert torch.equal(opt.state[p]["exp_avg"], other_opt.state[q]["exp_avg"]), name
    save_sharded(tmp_path / "ok", model, opt, {"step": 2})  # replacing a checkpoint
    assert load_sharded(tmp_path / "ok", other, other_opt) == {"step": 2}
    assert sorted(os.listdir(tmp_path)) == ["ok"]
    # a replace interrupted between its two renames: the old checkpoint waits under .ok.replaced
    os.rename(tmp_path / "ok", tmp_path / ".ok.replaced")
    with pytest.raises(FileNotFoundError, match=r"ok does not exist; .*previous checkpoint at .*\.ok\.replaced"):
        load_sharded(tmp_path / "ok", other, other_opt)
    save_sharded(tmp_path / "ok", model, opt, {"step": 3})
    assert sorted(os.listdir(tmp_path)) == ["ok"] and load_sharded(tmp_path / "ok", other) == {"step": 3}
