"""Selective activation checkpointing and activation offloading (nexus.training.gradient_methods).

Gradients: on CPU a recomputed op runs the same kernel on the same inputs in the same order as the
forward did, so every policy must give bit-identical losses and gradients (atol = rtol = 0); a
difference means the recomputation saw other inputs (other RNG state, other routing). Memory: the
MLP stack's saved bytes per policy follow from its shapes (derived in ``test_mlp_saved_bytes_per_policy``)
and are checked exactly; the MoE model's are checked for their order and against AUTO's budget.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.checkpoint import CheckpointPolicy as TorchPolicy

import nexus.training.gradient_methods as gm
from nexus.config import ConfigError, build_dataclass
from nexus.models.moe import TINY_CONFIG, MixtureOfDepths, MoEConfig, MoEFeedForward, MoETransformer, RoutingMamba
from nexus.training import CheckpointPolicy, SelectiveCheckpoint, SelectiveCheckpointConfig
from nexus.training.gradient_methods import (ActivationOffloader, MemoryConfig, OffloadConfig,
                                             apply_memory_config, apply_selective_checkpointing, build_offloader,
                                             heavy_ops_policy, measure_activation_memory,
                                             remove_selective_checkpointing, selective_checkpoint_runner)
from nexus.training.losses import multi_token_prediction_loss

EXACT = dict(atol=0.0, rtol=0.0)

# every policy with the settings it needs; AUTO both as a fraction and in bytes
POLICIES = {
    "none": dict(policy="none"),
    "all": dict(policy="all"),
    "heavy_ops": dict(policy="heavy_ops"),
    "alternate": dict(policy="alternate"),
    "auto_fraction": dict(policy="auto", memory_budget=0.5),
    "auto_bytes": dict(policy="auto", memory_budget=9000),
    "custom": dict(policy="custom", custom_fn=heavy_ops_policy),
}


def assert_same_grads(model: nn.Module, reference: dict[str, torch.Tensor]) -> None:
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == reference.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, reference[name], **EXACT, msg=lambda m, name=name: f"{name}: {m}")


def zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


# ---- a small MLP stack: exact bytes -----------------------------------------------------------

N, D, H, L = 8, 16, 64, 4  # rows, width, hidden width (4 D), blocks


class MLPBlock(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, D)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(x))
        if self.dropout:
            h = F.dropout(h, self.dropout, self.training)
        return x + self.fc2(h)


class MLPStack(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MLPBlock(dropout) for _ in range(L))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def mlp(dropout: float = 0.0) -> MLPStack:
    torch.manual_seed(0)
    return MLPStack(dropout)


def mlp_input() -> torch.Tensor:
    return torch.randn(N, D, generator=torch.Generator().manual_seed(1))


def mlp_step(model: nn.Module, x: torch.Tensor, seed: int = 5):
    """One forward (memory measured) and backward; returns (loss, grads, ActivationMemory)."""
    zero_grads(model)
    torch.manual_seed(seed)  # dropout masks
    out, mem = measure_activation_memory(model, x)
    loss = out.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, mem


@pytest.mark.parametrize("name", list(POLICIES))
def test_mlp_gradients_equal_uncheckpointed(name):
    x = mlp_input()
    ref_loss, ref_grads, _ = mlp_step(mlp(dropout=0.25), x)
    model = apply_selective_checkpointing(mlp(dropout=0.25), SelectiveCheckpointConfig(**POLICIES[name]))
    for _ in range(2):  # AUTO measures in the first step and follows its plan from the second
        loss, _, _ = mlp_step(model, x)
        torch.testing.assert_close(loss, ref_loss, **EXACT)
        assert_same_grads(model, ref_grads)


def test_mlp_saved_bytes_per_policy():
    """Per block (fp32, rows N): no checkpointing keeps fc1's output (gelu's input) and gelu's output
    (fc2's input), 2 N H floats; HEAVY_OPS keeps the two matmul outputs, N (H + D) floats; a fully
    checkpointed block keeps nothing (its input is the previous block's output, alive anyway). Outside
    the blocks: the L - 1 block outputs that are inputs of the next block, N D floats each."""
    x = mlp_input()
    none_block, heavy_block, between = 2 * N * H * 4, N * (H + D) * 4, (L - 1) * N * D * 4
    expected = {"none": between + L * none_block, "all": between, "heavy_ops": between + L * heavy_block,
                "alternate": between + (L // 2) * none_block, "custom": between + L * heavy_block}
    for name, live in expected.items():
        model = apply_selective_checkpointing(mlp(), SelectiveCheckpointConfig(**POLICIES[name]))
        _, _, mem = mlp_step(model, x)
        assert mem.live_bytes == live, name
        assert mem.output_bytes == N * D * 4
    # what autograd saved through hooks at the model's level: a checkpointed block hides its insides and
    # saves only its input, for the recompute
    _, _, none = mlp_step(mlp(), x)
    _, _, full = mlp_step(apply_selective_checkpointing(mlp(), SelectiveCheckpointConfig(policy="all")), x)
    assert none.saved_tensors == 3 * L  # fc1 input, gelu input, fc2 input (weights are not counted)
    assert (full.saved_tensors, full.saved_bytes) == (L, L * N * D * 4)


def test_mlp_auto_fits_budget_greedily():
    """Budget 0.5 of the uncheckpointed blocks: 0.5 * L * 2NH*4 = 8192 bytes. Heavy-ops blocks cost
    N(H+D)*4 = 2560 each: three fit (7680), a fourth does not; none fits a move to no checkpointing."""
    x = mlp_input()
    model = apply_selective_checkpointing(mlp(), SelectiveCheckpointConfig(policy="auto", memory_budget=0.5))
    _, _, first = mlp_step(model, x)
    runner = selective_checkpoint_runner(model)
    sizes = runner.measured
    assert all((s.full, s.selective, s.none) == (0, N * (H + D) * 4, 2 * N * H * 4) for s in sizes.values())
    assert sorted(runner.plan.values()) == ["full", "selective", "selective", "selective"]
    _, _, second = mlp_step(model, x)
    between = (L - 1) * N * D * 4
    assert first.live_bytes == between  # first step: fully checkpointed while measuring
    assert second.live_bytes == between + 3 * N * (H + D) * 4
    # bytes: 2 uncheckpointed blocks (8192) + 1 byte fit; blocks go to heavy-ops first, then to none
    model = apply_selective_checkpointing(mlp(), SelectiveCheckpointConfig(policy="auto", memory_budget=8193))
    mlp_step(model, x)
    plan = selective_checkpoint_runner(model).plan
    # 4 x 2560 = 10240 > 8193: three heavy (7680), then no 1536-byte move to none fits (9216)
    assert sorted(plan.values()) == ["full", "selective", "selective", "selective"]
    model = apply_selective_checkpointing(mlp(), SelectiveCheckpointConfig(policy="auto", memory_budget=1.0))
    mlp_step(model, x)
    assert set(selective_checkpoint_runner(model).plan.values()) == {"none"}  # the whole budget: no recompute


def test_auto_probes_leave_rng_and_buffers_unchanged():
    """AUTO's first step probes every block three times; with a budget that keeps every block fully
    checkpointed it must then equal ALL exactly: same RNG stream after the step, same BatchNorm
    statistics (updated in the forward and again in the recompute, under both), same gradients."""
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(D, D), nn.BatchNorm1d(D), nn.Dropout(0.5))
                                         for _ in range(2)])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    torch.manual_seed(0)
    base = Noisy()
    full, auto = copy.deepcopy(base), copy.deepcopy(base)
    apply_selective_checkpointing(full, SelectiveCheckpointConfig(policy="all"))
    apply_selective_checkpointing(auto, SelectiveCheckpointConfig(policy="auto", memory_budget=1e-9))
    x = mlp_input()
    after = []
    for model in (full, auto):
        torch.manual_seed(3)
        model(x).sum().backward()
        after.append(torch.rand(()))  # the RNG stream after the step
    assert set(selective_checkpoint_runner(auto).plan.values()) == {"full"}
    torch.testing.assert_close(after[1], after[0], **EXACT)
    for (name, b), b_full in zip(auto.named_buffers(), full.buffers()):
        torch.testing.assert_close(b, b_full, **EXACT, msg=name)
    assert_same_grads(auto, {n: p.grad for n, p in full.named_parameters()})


def test_custom_fn_decides_per_op():
    seen = []

    def save_nothing_but_count(ctx, op, *args, **kwargs):
        seen.append(op)
        return False  # a bool is accepted: False = recompute

    x = mlp_input()
    _, ref_grads, _ = mlp_step(mlp(), x)
    model = apply_selective_checkpointing(mlp(), SelectiveCheckpointConfig(policy="custom",
                                                                           custom_fn=save_nothing_but_count))
    _, _, mem = mlp_step(model, x)
    assert torch.ops.aten.addmm.default in seen and torch.ops.aten.gelu.default in seen
    assert mem.live_bytes == (L - 1) * N * D * 4  # saving nothing = full recompute
    assert_same_grads(model, ref_grads)


def test_heavy_ops_policy_saves_matmuls_and_attention_not_pointwise():
    assert heavy_ops_policy(None, torch.ops.aten.mm.default) is TorchPolicy.MUST_SAVE
    assert heavy_ops_policy(None, torch.ops.aten.addmm.default) is TorchPolicy.MUST_SAVE
    assert heavy_ops_policy(None, torch.ops.aten.bmm.default) is TorchPolicy.MUST_SAVE
    assert heavy_ops_policy(None, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default) \
        is TorchPolicy.MUST_SAVE
    for op in (torch.ops.aten.gelu.default, torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor,
               torch.ops.aten.silu.default, torch.ops.aten.exp.default):
        assert heavy_ops_policy(None, op) is TorchPolicy.PREFER_RECOMPUTE


# ---- the tiny MoE model, every feature on ----------------------------------------------------

SEQ = 32


def moe(dropout: float = 0.0) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(MoEConfig(**{**TINY_CONFIG, "dropout": dropout}))


def moe_window(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(10 + step)
    return torch.randint(0, TINY_CONFIG["vocab_size"], (2, SEQ + TINY_CONFIG["n_pred_tokens"]), generator=gen)


def moe_step(model: nn.Module, step: int, measure: bool = False):
    """One forward and backward; ``measure`` (slower: a Python call per op) returns the ActivationMemory.
    Not inside an offloader: the measuring hooks, innermost, would take the saved tensors from it."""
    zero_grads(model)
    torch.manual_seed(100 + step)  # dropout masks
    window = moe_window(step)
    if measure:
        out, mem = measure_activation_memory(model, window[:, :SEQ])
    else:
        out, mem = model(window[:, :SEQ]), None
    loss = multi_token_prediction_loss(out.logits, out.mtp_logits, window)[0] + out.aux_loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, mem


@pytest.fixture(scope="module")
def moe_reference():
    """Uncheckpointed losses, gradients and activation memory of two steps (dropout 0.1)."""
    model = moe(dropout=0.1)
    return [moe_step(model, step, measure=True) for step in range(2)]


@pytest.mark.parametrize("name", [n for n in POLICIES if n != "auto_bytes"])
def test_moe_gradients_equal_uncheckpointed(name, moe_reference):
    model = apply_selective_checkpointing(moe(dropout=0.1), SelectiveCheckpointConfig(**POLICIES[name]))
    assert isinstance(model.layers[1], MixtureOfDepths)  # classes and names are kept
    assert list(model.state_dict()) == list(moe().state_dict())
    for step, (ref_loss, ref_grads, _) in enumerate(moe_reference):
        loss, _, _ = moe_step(model, step)
        torch.testing.assert_close(loss, ref_loss, **EXACT)
        assert_same_grads(model, ref_grads)


def test_moe_activation_memory_per_policy(moe_reference):
    """Held for backward (besides the logits): ALL < HEAVY_OPS < NONE and ALL < ALTERNATE < NONE; AUTO's
    choice costs what its probes measured (to 1%: a few index tensors of MoD are counted in its block
    probe and outside it) and fits its budget."""
    none = moe_reference[1][2].live_bytes
    live = {}
    for name in ("all", "heavy_ops", "alternate", "auto_fraction"):
        model = apply_selective_checkpointing(moe(dropout=0.1), SelectiveCheckpointConfig(**POLICIES[name]))
        if name == "auto_fraction":  # measures its blocks in the first step, follows its plan from the second
            moe_step(model, 0)
            runner = selective_checkpoint_runner(model)
        live[name] = moe_step(model, 1, measure=True)[2].live_bytes
    assert live["all"] < live["heavy_ops"] < none
    assert live["all"] < live["alternate"] < none
    assert live["all"] < 0.1 * none  # the blocks hold nearly all activations of this model
    sizes, plan = runner.measured, runner.plan
    assert len(plan) == TINY_CONFIG["n_layers"] + TINY_CONFIG["n_pred_tokens"] - 1  # layers and MTP heads
    assert live["all"] + sum(s.none for s in sizes.values()) == pytest.approx(none, rel=0.01)
    assert live["all"] + sum(s.selective for s in sizes.values()) == pytest.approx(live["heavy_ops"], rel=0.01)
    chosen = sum(getattr(sizes[i], level) for i, level in plan.items())
    assert live["auto_fraction"] == pytest.approx(live["all"] + chosen, rel=0.01)
    assert chosen <= 0.5 * sum(s.none for s in sizes.values())
    assert set(plan.values()) - {"full"}  # the budget leaves room for some blocks to recompute less


def _routing_recorder(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Forward hooks on every router (MoE, RoM, MoD): the expert / token choices of each call."""
    calls: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        if isinstance(module, (MoEFeedForward, RoutingMamba)):
            k, dim = module.top_k, -1
        elif isinstance(module, MixtureOfDepths):
            k, dim = None, -2  # top capacity * T tokens over the sequence
        else:
            continue

        def hook(mod, args, out, name=name, k=k, dim=dim):
            kk = k if k is not None else max(1, int(0.5 * out.shape[-2]))
            calls.setdefault(name, []).append(out.detach().topk(kk, dim=dim).indices.sort(dim=dim).values)
        module.router.register_forward_hook(hook)
    return calls


def test_moe_routing_is_recomputed_identically(moe_reference):
    """Under ALL every router runs twice, in forward and in the recompute, and chooses the same experts
    and tokens (dropout 0.1 before the routers: the recompute needs the forward's RNG state)."""
    model = apply_selective_checkpointing(moe(dropout=0.1), SelectiveCheckpointConfig(policy="all"))
    calls = _routing_recorder(model)
    loss, _, _ = moe_step(model, 0)
    torch.testing.assert_close(loss, moe_reference[0][0], **EXACT)
    assert len(calls) == 5  # MoE in layers 1 and 3, RoM in layer 3, MoD in layers 1 and 3
    for name, choices in calls.items():
        assert len(choices) == 2, name
        torch.testing.assert_close(choices[0], choices[1], **EXACT, msg=name)
    # without the forward's RNG state the recomputed dropout masks differ, so routing (hence the
    # recomputed shapes) differs: torch's determinism check refuses
    model = apply_selective_checkpointing(moe(dropout=0.1), SelectiveCheckpointConfig(policy="all",
                                                                                      preserve_rng_state=False))
    with pytest.raises(torch.utils.checkpoint.CheckpointError, match="different metadata"):
        moe_step(model, 0)


# ---- the seeds' examples, as written ----------------------------------------------------------

def test_seed_000_selective_checkpointing_example():
    torch.manual_seed(0)
    attention_layer = nn.MultiheadAttention(embed_dim=32, num_heads=4, batch_first=True)
    query, key, value = (torch.randn(2, 6, 32, requires_grad=True) for _ in range(3))
    expected = attention_layer(query, key, value)[0]
    expected_grads = torch.autograd.grad(expected.square().sum(), (query, key, value))

    from nexus.training import SelectiveCheckpoint, SelectiveCheckpointConfig, CheckpointPolicy

    config = SelectiveCheckpointConfig(policy=CheckpointPolicy.HEAVY_OPS)
    checkpoint = SelectiveCheckpoint(config)
    output = checkpoint(attention_layer, query, key, value)

    torch.testing.assert_close(output[0], expected, **EXACT)
    grads = torch.autograd.grad(output[0].square().sum(), (query, key, value))
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, **EXACT)


def test_seed_000_offloading_example(monkeypatch):
    """On this CPU-only machine the context is a no-op that says so once; gradients are plain autograd's."""
    monkeypatch.setattr(gm, "_cpu_only_notice_given", False)
    model, input = mlp(), mlp_input()
    ref = copy.deepcopy(model)
    ref(input).square().mean().backward()

    from nexus.training import ActivationOffloader

    with pytest.warns(RuntimeWarning, match="no CUDA device"):
        offloader = ActivationOffloader(
            enabled=True,
            offload_threshold_mb=10.0
        )
        with offloader.offload_context():
            output = model(input)
            loss = output.square().mean()
            loss.backward()
    assert_same_grads(model, {n: p.grad for n, p in ref.named_parameters()})


def test_seed_001_memory_efficient_example(moe_reference):
    model = moe(dropout=0.1)

    from nexus.training.gradient_methods import SelectiveCheckpointConfig, apply_selective_checkpointing

    # Configure selective checkpointing
    config = SelectiveCheckpointConfig(policy="heavy_ops")

    # Apply to model
    model = apply_selective_checkpointing(model, config)

    assert config.policy is CheckpointPolicy.HEAVY_OPS
    loss, _, mem = moe_step(model, 0, measure=True)
    torch.testing.assert_close(loss, moe_reference[0][0], **EXACT)
    assert mem.live_bytes < moe_reference[0][2].live_bytes


# ---- the callable on its own ------------------------------------------------------------------

def _functional_step(checkpoint: SelectiveCheckpoint, model: MLPStack, x: torch.Tensor):
    zero_grads(model)

    def forward(h):
        for layer in model.layers:
            h = checkpoint(layer, h)
        return h

    out, mem = measure_activation_memory(forward, x)
    out.square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, mem


def test_callable_numbers_layers_by_first_call():
    """ALTERNATE through the callable: layers 0 and 2 (first calls) recomputed, 1 and 3 not; AUTO plans
    once a layer repeats (the second step) and fits its budget from the third."""
    x = mlp_input()
    _, ref_grads, _ = mlp_step(mlp(), x)
    model = mlp()
    grads, mem = _functional_step(SelectiveCheckpoint(SelectiveCheckpointConfig(policy="alternate")), model, x)
    assert mem.live_bytes == (L - 1) * N * D * 4 + (L // 2) * 2 * N * H * 4
    assert_same_grads(model, ref_grads)

    auto = SelectiveCheckpoint(SelectiveCheckpointConfig(policy="auto", memory_budget=0.5))
    live = [_functional_step(auto, model, x)[1].live_bytes for _ in range(2)]
    assert live == [(L - 1) * N * D * 4, (L - 1) * N * D * 4 + 3 * N * (H + D) * 4]
    assert sorted(auto.plan.values()) == ["full", "selective", "selective", "selective"]
    assert_same_grads(model, ref_grads)


def test_callable_passes_keyword_arguments_and_skips_checkpoint_without_grad():
    checkpoint = SelectiveCheckpoint(SelectiveCheckpointConfig(policy="all"))
    layer = nn.Linear(D, D)
    x = mlp_input()
    out = checkpoint(F.linear, x, weight=layer.weight, bias=layer.bias)
    torch.testing.assert_close(out, layer(x), **EXACT)
    with torch.no_grad():
        _, mem = measure_activation_memory(checkpoint, layer, x)
    assert mem.live_bytes == 0
    with pytest.raises(TypeError, match="layer must be callable"):
        checkpoint("not a layer", x)


# ---- wrapping models --------------------------------------------------------------------------

def test_apply_keeps_classes_names_and_can_be_undone():
    model = moe()
    keys = list(model.state_dict())
    apply_selective_checkpointing(model, SelectiveCheckpointConfig(policy="heavy_ops"))
    assert [type(b).__name__ for b in model.layers] == ["TransformerBlock", "MixtureOfDepths"] * 2
    assert list(model.state_dict()) == keys
    assert "forward" in model.layers[0].__dict__ and "forward" in model.mtp_heads[0].__dict__
    assert "forward" not in model.layers[0].mixer.__dict__  # blocks only, not their insides
    twin = copy.deepcopy(model)  # the copy's blocks run their own forward, not the original's
    assert twin.layers[2].forward.__self__ is twin.layers[2]
    with torch.no_grad():  # evaluation: no checkpointing, same logits
        tokens = moe_window(0)[:, :SEQ]
        torch.testing.assert_close(twin(tokens).logits, moe()(tokens).logits, **EXACT)
    with pytest.raises(ValueError, match="already checkpointed"):
        apply_selective_checkpointing(model, SelectiveCheckpointConfig(policy="all"))
    remove_selective_checkpointing(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    apply_selective_checkpointing(model, SelectiveCheckpointConfig(policy="all"))  # again, after removal


def test_apply_refuses_what_it_cannot_wrap():
    config = SelectiveCheckpointConfig(policy="all")
    with pytest.raises(ValueError, match="Linear has none"):
        apply_selective_checkpointing(nn.Linear(2, 2), config)
    with pytest.raises(ValueError, match="not one"):
        apply_selective_checkpointing(mlp(), config, blocks=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="empty"):
        apply_selective_checkpointing(mlp(), config, blocks=[])
    with pytest.raises(TypeError, match="SelectiveCheckpointConfig"):
        apply_selective_checkpointing(mlp(), "all")
    from torch.distributed._composable import checkpoint as composable_checkpoint

    model = mlp()
    composable_checkpoint(model.layers[1])
    with pytest.raises(ValueError, match="another activation checkpoint"):
        apply_selective_checkpointing(model, config)
    model = mlp()
    apply_selective_checkpointing(model, config, blocks=[model.layers[3]])  # chosen blocks only
    assert [("forward" in b.__dict__) for b in model.layers] == [False, False, False, True]
    assert apply_selective_checkpointing(model, SelectiveCheckpointConfig(policy="none")) is model


# ---- configuration ----------------------------------------------------------------------------

def test_policy_accepts_enum_and_names():
    assert SelectiveCheckpointConfig(policy="heavy_ops").policy is CheckpointPolicy.HEAVY_OPS
    assert SelectiveCheckpointConfig(policy="ALTERNATE").policy is CheckpointPolicy.ALTERNATE
    assert SelectiveCheckpointConfig(policy=CheckpointPolicy.ALL).policy is CheckpointPolicy.ALL
    assert [p.name for p in CheckpointPolicy] == ["NONE", "ALL", "AUTO", "CUSTOM", "ALTERNATE", "HEAVY_OPS"]
    with pytest.raises(TypeError):
        SelectiveCheckpointConfig("all")  # keyword-only


@pytest.mark.parametrize("kwargs, message", [
    (dict(policy="heavy"), "policy must be a CheckpointPolicy or one of none, all, auto, custom, alternate, heavy_ops"),
    (dict(policy=3), "policy must be"),
    (dict(policy="custom"), "custom_fn is required with policy CUSTOM"),
    (dict(policy="heavy_ops", custom_fn=heavy_ops_policy), "custom_fn is only used with policy CUSTOM"),
    (dict(policy="custom", custom_fn="mm"), "custom_fn must be callable"),
    (dict(policy="auto"), "memory_budget is required with policy AUTO"),
    (dict(policy="all", memory_budget=0.5), "memory_budget is only used with policy AUTO"),
    (dict(policy="auto", memory_budget=0), "memory_budget must be a finite number > 0"),
    (dict(policy="auto", memory_budget=-1e9), "memory_budget must be a finite number > 0"),
    (dict(policy="auto", memory_budget=math.inf), "memory_budget must be a finite number > 0"),
    (dict(policy="auto", memory_budget=math.nan), "memory_budget must be a finite number > 0"),
    (dict(policy="auto", memory_budget=True), "memory_budget must be a finite number > 0"),
    (dict(policy="auto", memory_budget="half"), "memory_budget must be a finite number > 0"),
    (dict(policy="all", preserve_rng_state=1), "preserve_rng_state must be a bool"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_checkpoint_config_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        SelectiveCheckpointConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(offload_threshold_mb=-1), "offload_threshold_mb must be a finite number >= 0"),
    (dict(offload_threshold_mb=math.nan), "offload_threshold_mb must be a finite number >= 0"),
    (dict(offload_threshold_mb="10"), "offload_threshold_mb must be a finite number >= 0"),
    (dict(enabled="yes"), "enabled must be a bool"),
    (dict(pin_memory=None), "pin_memory must be a bool"),
    (dict(prefetch=1), "prefetch must be a bool"),
    (dict(prefetch_depth=0), "prefetch_depth must be an int >= 1"),
    (dict(force_cpu_roundtrip="on"), "force_cpu_roundtrip must be a bool"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_offloader_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ActivationOffloader(**kwargs)


def test_memory_section_of_a_run_file():
    cfg = build_dataclass(MemoryConfig, {"checkpointing": "heavy_ops", "offload": {"threshold_mb": 10}}, "memory")
    assert cfg.checkpointing == "heavy_ops" and cfg.policy is CheckpointPolicy.HEAVY_OPS
    assert cfg.offload == OffloadConfig(threshold_mb=10.0)
    assert dataclasses.asdict(cfg)["checkpointing"] == "heavy_ops"  # plain data: the run file round-trips
    model = apply_memory_config(moe(), cfg)
    assert selective_checkpoint_runner(model).config.policy is CheckpointPolicy.HEAVY_OPS
    offloader = build_offloader(cfg)
    assert (offloader.enabled, offloader.offload_threshold_mb, offloader.pin_memory, offloader.prefetch) == (
        True, 10.0, True, True)
    assert build_offloader(MemoryConfig()).enabled is False
    assert apply_memory_config(mlp(), MemoryConfig()).layers[0].__dict__.get("forward") is None
    auto = build_dataclass(MemoryConfig, {"checkpointing": "auto", "memory_budget": 0.4}, "memory")
    assert auto.checkpoint_config().memory_budget == 0.4
    with pytest.raises(ConfigError, match=r"memory.offload: unknown key 'threshold' \(did you mean 'threshold_mb'"):
        build_dataclass(MemoryConfig, {"offload": {"threshold": 10}}, "memory")
    with pytest.raises(ConfigError, match="memory.checkpointing must be a CheckpointPolicy or one of"):
        build_dataclass(MemoryConfig, {"checkpointing": "heavy"}, "memory")
    with pytest.raises(ConfigError, match="custom needs a Python function"):
        build_dataclass(MemoryConfig, {"checkpointing": "custom"}, "memory")
    with pytest.raises(ConfigError, match="memory: memory_budget is required with policy AUTO"):
        build_dataclass(MemoryConfig, {"checkpointing": "auto"}, "memory")
    with pytest.raises(ConfigError, match="offload.threshold_mb must be a finite number >= 0"):
        build_dataclass(MemoryConfig, {"offload": {"threshold_mb": -1}}, "memory")


# ---- activation offloading --------------------------------------------------------------------

def roundtrip(**kwargs) -> ActivationOffloader:
    """An offloader that moves CPU tensors to separate host copies: the pack/unpack path, testable here."""
    return ActivationOffloader(force_cpu_roundtrip=True, **kwargs)


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "on_demand"])
def test_offloading_gives_identical_moe_gradients(prefetch, moe_reference):
    model = moe(dropout=0.1)
    offloader = roundtrip(offload_threshold_mb=0.01, prefetch=prefetch)  # 10 KiB: most activations move
    with offloader.offload_context():
        loss, _, _ = moe_step(model, 0)
    torch.testing.assert_close(loss, moe_reference[0][0], **EXACT)
    assert_same_grads(model, moe_reference[0][1])
    s = offloader.stats
    assert s.offloaded_tensors > 100 and s.kept_tensors > 0 and s.shared > 0
    assert s.prefetched + s.fetched_on_demand == s.offloaded_tensors + s.shared  # every save came back once
    assert (s.prefetched > s.fetched_on_demand) if prefetch else (s.prefetched == 0)


def test_offloading_composes_with_checkpointing(moe_reference):
    model = apply_selective_checkpointing(moe(dropout=0.1), SelectiveCheckpointConfig(policy="alternate"))
    offloader = roundtrip(offload_threshold_mb=0.01)
    with offloader.offload_context():
        moe_step(model, 0)
    assert_same_grads(model, moe_reference[0][1])
    alone = roundtrip(offload_threshold_mb=0.01)
    with alone.offload_context():
        moe_step(moe(dropout=0.1), 0)
    # a checkpointed block saves nothing at this level, so there is less to offload
    assert 0 < offloader.stats.offloaded_bytes < alone.stats.offloaded_bytes


def test_offloaded_tensor_is_a_host_snapshot_and_a_kept_one_is_checked():
    """sin saves its input. Modified in place after the forward: the offloaded copy still holds the
    value the forward used (the gradient is cos of it); a tensor kept in place is refused, as plain
    autograd refuses it."""
    leaf = torch.randn(64, requires_grad=True)
    with roundtrip(offload_threshold_mb=0).offload_context():
        x = leaf * 1.0
        y = x.sin()
        with torch.no_grad():
            x.add_(1.0)
        y.sum().backward()
    torch.testing.assert_close(leaf.grad, leaf.detach().cos(), **EXACT)
    for ctx in (contextlib.nullcontext(), roundtrip(offload_threshold_mb=1.0).offload_context()):
        with ctx:
            x = leaf * 1.0
            y = x.sin()
            with torch.no_grad():
                x.add_(1.0)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                y.sum().backward()


def test_threshold_and_parameters_decide_what_moves():
    layer = nn.Linear(256, 256)  # weight: 256 KiB, saved by the matmul as a view of the parameter
    big = torch.randn(512, 256, requires_grad=True)  # 512 KiB
    small = torch.randn(4, 256, requires_grad=True)  # 4 KiB
    offloader = roundtrip(offload_threshold_mb=0.25)  # 256 KiB
    with offloader.offload_context():
        (layer(big).sum() + layer(small).sum()).backward()
    # moved: big (input of the matmul); kept: small, and the weight view twice (never offloaded)
    assert (offloader.stats.offloaded_tensors, offloader.stats.offloaded_bytes) == (1, 512 * 256 * 4)
    assert offloader.stats.kept_tensors == 3


def test_prefetch_brings_back_the_next_tensors_ahead_of_use():
    """A chain of 6 sins, each saving its input: backward unpacks them last to first. The first unpack
    fetches on demand and starts the two before it; every later one finds its tensor already there."""
    def chain(offloader):
        x = torch.randn(1024, requires_grad=True)
        with offloader.offload_context():
            y = x
            for _ in range(6):
                y = y.sin()
            y.sum().backward()
        return x.grad, offloader.stats

    g, s = chain(roundtrip(offload_threshold_mb=0, prefetch_depth=2))
    assert (s.offloaded_tensors, s.prefetched, s.fetched_on_demand) == (6, 5, 1)
    g, s = chain(roundtrip(offload_threshold_mb=0, prefetch=False))
    assert (s.prefetched, s.fetched_on_demand) == (0, 6)
    # a backward after the context (and after another context began) still prefetches its own tensors
    offloader = roundtrip(offload_threshold_mb=0)
    x = torch.randn(1024, requires_grad=True)
    with offloader.offload_context():
        y = x
        for _ in range(6):
            y = y.sin()
    with offloader.offload_context():
        (x * 2).sin()
    y.sum().backward()
    assert (offloader.stats.prefetched, offloader.stats.fetched_on_demand) == (5, 1)  # the stats of the latest context
    plain = x.detach().requires_grad_()
    y = plain
    for _ in range(6):
        y = y.sin()
    y.sum().backward()
    torch.testing.assert_close(x.grad, plain.grad, **EXACT)


def test_saved_tensor_hooks_leave_no_reference_cycle():
    """sigmoid saves its own output. A pack hook that returned the tensor itself would make output ->
    node -> output a cycle through the C++ graph, never freed: both hooks here keep a detached alias."""
    def run(ctx):
        x = torch.randn(4096, requires_grad=True)
        with ctx:
            y = torch.sigmoid(x * 2.0)
            ref = StorageWeakRef(y.untyped_storage())
            y.exp().sum().backward()
        del y
        gc.collect()
        return ref.expired()

    assert run(roundtrip(offload_threshold_mb=1.0).offload_context())  # kept in place
    assert run(roundtrip(offload_threshold_mb=0).offload_context())  # offloaded
    with contextlib.ExitStack() as stack:
        x = torch.randn(4096, requires_grad=True)
        out, _ = measure_activation_memory(lambda: torch.sigmoid(x * 2.0))
        ref = StorageWeakRef(out.untyped_storage())
        out.exp().sum().backward()
        del out
        stack.callback(gc.collect)
    assert ref.expired()


def test_cpu_only_machine_says_so_once(monkeypatch):
    monkeypatch.setattr(gm, "_cpu_only_notice_given", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    offloader = ActivationOffloader()
    assert not offloader.active
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            with offloader.offload_context():
                pass
        with ActivationOffloader(offload_threshold_mb=1.0).offload_context():
            pass
        with ActivationOffloader(enabled=False).offload_context():
            pass
    assert [str(w.message) for w in caught] == [
        "ActivationOffloader: no CUDA device, so activation offloading does nothing here "
        "(activations already live in host memory)"]
    assert offloader.stats == gm.OffloadStats()  # nothing was packed


# ---- under FSDP2 (2 Gloo ranks) ---------------------------------------------------------------

# every feature on, small: layer 0 attention + MoE, layer 1 MoD(RoM + MoE), one MTP head. The load-balance
# loss is a product of batch means, not a mean, so it is off: then the mean of the ranks' slice losses is
# the full-batch loss and FSDP2's averaged gradient is the one-process gradient (to summation order)
FSDP_CONFIG = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32, d_ff_dense=32,
                   max_seq_len=32, n_experts=4, moe_top_k=2, moe_layer_interval=1, mod_layer_interval=2,
                   mamba_layer_interval=2, mamba_d_state=8, mamba_head_dim=16, mamba_chunk_size=8, rom_n_experts=2,
                   n_pred_tokens=2, balance_loss_weight=0.0)
FSDP_SEQ, FSDP_BATCH = 16, 4


def _fsdp_model() -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(MoEConfig(**FSDP_CONFIG))


def _fsdp_loss(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    out = model(window[:, :FSDP_SEQ])
    return multi_token_prediction_loss(out.logits, out.mtp_logits, window)[0] + out.aux_loss


def _fsdp_window() -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, FSDP_CONFIG["vocab_size"], (FSDP_BATCH, FSDP_SEQ + 2), generator=gen)


def _heavy_ops_under_fsdp2(rank: int, world_size: int) -> dict:
    from nexus.training.distributed.fsdp2 import FSDP2Config, wrap_model_fsdp2

    model = apply_selective_checkpointing(_fsdp_model(), SelectiveCheckpointConfig(policy="heavy_ops"))
    calls = _routing_recorder(model)
    wrap_model_fsdp2(model, FSDP2Config(sharding_strategy="full", param_dtype=torch.float32))
    per = FSDP_BATCH // world_size
    _fsdp_loss(model, _fsdp_window()[rank * per:(rank + 1) * per]).backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    return grads, {name: len(c) for name, c in calls.items()}


@pytest.mark.slow
@pytest.mark.distributed
def test_heavy_ops_under_fsdp2_equals_one_process():
    """fully_shard applied after the checkpointing: every router runs twice (forward, recompute) and the
    gradients on 2 ranks equal one uncheckpointed process to 1e-6 (the reduce-scatter sums the slices'
    gradients in another order)."""
    from tests.distributed.harness import run_distributed

    model = _fsdp_model()
    _fsdp_loss(model, _fsdp_window()).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for grads, router_calls in run_distributed(_heavy_ops_under_fsdp2, world_size=2, timeout=180):
        assert router_calls == {"layers.0.ffn": 2, "layers.1": 2, "layers.1.block.mixer": 2, "layers.1.block.ffn": 2}
        assert grads.keys() == expected.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, expected[name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["all", "heavy_ops", "alternate"])
def test_checkpointed_model_compiles(name):
    """torch.compile traces the wrapped blocks (checkpoint and its selective contexts are higher-order
    ops to it). aot_eager: the same graphs without code generation, so gradients equal eager exactly."""
    torch._dynamo.reset()
    x = mlp_input()
    _, ref_grads, _ = mlp_step(mlp(), x)
    model = apply_selective_checkpointing(mlp(), SelectiveCheckpointConfig(**POLICIES[name]))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(x).square().mean().backward()
    assert_same_grads(model, ref_grads)


@pytest.mark.slow
def test_offloading_under_compile_gives_identical_gradients():
    """The compiled graph saves its tensors through the offloader's hooks too."""
    torch._dynamo.reset()
    x = mlp_input()
    _, ref_grads, _ = mlp_step(mlp(), x)
    model = mlp()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    offloader = roundtrip(offload_threshold_mb=0)
    with offloader.offload_context():
        compiled(x).square().mean().backward()
    assert offloader.stats.offloaded_tensors >= 3 * L
    assert_same_grads(model, ref_grads)


@pytest.mark.slow
def test_memory_bench_prints_the_policy_table(tmp_path, monkeypatch, capsys):
    import json
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))  # the repository's bench package
    from bench.memory import main

    monkeypatch.setenv("NEXUS_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["memory.py", "--batch", "2", "--seq", "16", "--threads", "1"])
    main()
    out = capsys.readouterr().out
    assert "auto(0.5) plan per block" in out and "50-90% saved" in out
    (path,) = tmp_path.glob("memory-*.json")
    record = json.loads(path.read_text())
    rows = {r["policy"]: r for r in record["rows"]}
    assert list(rows) == ["none", "all", "heavy_ops", "alternate", "auto(0.5)"]  # no offloading arm without CUDA
    act = record["config"]["activation_bytes"]
    assert act["all"] < act["heavy_ops"] < act["none"] and act["all"] < act["alternate"] < act["none"]
    assert {c["arm"] for c in record["comparisons"]} == {"all", "heavy_ops", "alternate", "auto(0.5)"}
    assert all(len(c["ratios"]) == 5 for c in record["comparisons"])
