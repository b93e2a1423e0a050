"""Pipeline parallel (build_pipeline) on the MoE model: 2- and 4-rank pipelines against one process.

One 4-rank spawn runs every case: a (dp_replicate=2, pp=2) mesh gives two independent 2-rank
pipelines, each running gpipe, 1f1b and interleaved_1f1b (2 ranks x 2 stages = 4 one-layer stages);
then the whole world is one 4-rank 1f1b pipeline (4 one-layer stages). The one-process reference
runs the same model on the same microbatches with gradient accumulation (loss / n_microbatches),
which is what a pipeline step computes (see the module docstring of pipeline_parallel).

The model has every feature on and stages of every kind: layer 0 attention + dense (a stage with
no router: its router sums start as constant zeros), 1 MoD(attention + MoE), 2 attention + dense
(passes the sums on), 3 MoD(RoM + MoE); one extra MTP head on the last stage.

Tolerance: fp32, the same kernels on the same microbatches, one intra-op thread in every process
(the harness's ranks and the reference here: with 2 threads the reference's matmuls round
differently, ~7e-6 after 3 steps). What may still differ: the order in which the router losses of
different stages are summed, and torch dividing the accumulated gradients by n_microbatches where
the reference divides each loss (exact for 4). Measured: bit-identical. atol 1e-6 on parameters
and rtol 1e-6 on losses leave room for that rounding; losing half of the aux loss moves the
parameters by 5.5e-2 after these 3 AdamW steps at lr=1e-2 (gradients clipped to norm 1.0 with the
whole model's norm, as the reference does).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from nexus.models.moe import MoEConfig, MoETransformer
from nexus.training.distributed.pipeline_parallel import (
    PipelineConfig,
    build_pipeline,
    mtp_loss_fn,
    plan_stages,
    split_model,
    stage_output_to_moe_output,
)
from tests.distributed.harness import run_distributed, run_distributed_checks

CONFIG = dict(vocab_size=128, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=32, d_ff_dense=48, max_seq_len=32,
              use_moe=True, n_experts=4, moe_top_k=2, n_shared_experts=1, moe_layer_interval=2, use_mod=True,
              mod_capacity_factor=0.5, mod_layer_interval=2, use_mamba=True, mamba_layer_interval=4, mamba_d_state=8,
              mamba_expand=2, mamba_head_dim=16, mamba_chunk_size=8, rom_n_experts=2, rom_top_k=1, n_pred_tokens=2,
              dropout=0.0)
BATCH, SEQ, N_MB, STEPS, LR = 8, 12, 4, 3, 1e-2
MAX_NORM = 1.0  # below the first steps' gradient norm (~1.75): clipping is active and uses the global norm
VAL_BATCH, VAL_MB = 6, 3  # 6 rows do not split into 4: evaluate falls back to 3 microbatches of 2
NPRED = CONFIG["n_pred_tokens"]
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
ATOL, RTOL = 1e-6, 1e-6


def make_model() -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(MoEConfig(**CONFIG))


def windows(step: int, rows: int = BATCH) -> torch.Tensor:
    """[rows, SEQ + n_pred] int64 token windows of one step (the same on every rank)."""
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, CONFIG["vocab_size"], (rows, SEQ + NPRED), generator=gen)


def optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.1)


def train_pipeline(pp, config: PipelineConfig) -> dict:
    """STEPS AdamW steps and one evaluation through a pipeline; what this rank saw."""
    runner = build_pipeline(make_model(), pp, config)
    opt = optimizer(list(runner.parameters()))
    losses, norms = [], []
    for step in range(STEPS):
        w = windows(step)
        losses.append(runner.step(w[:, :SEQ], w).item())
        norms.append(runner.clip_grad_norm_(MAX_NORM).item())
        opt.step()
        opt.zero_grad()
    runner.eval()
    v = windows(99, VAL_BATCH)
    val_loss, val_parts = runner.evaluate(v[:, :SEQ], v)
    return dict(stage_indices=runner.stage_indices, losses=losses, norms=norms,
                metrics={k: v.item() for k, v in runner.last_metrics.items()},
                params={n: p.detach().clone() for n, p in runner.named_parameters()},
                val_loss=val_loss.item(), val_parts={k: v.item() for k, v in val_parts.items()})


# ---- rank-side checks (module level: pickled into the spawned ranks) ----------------------------
def pp2_on_a_mesh(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "pp"))
    return {s: train_pipeline(mesh, PipelineConfig(schedule=s, n_microbatches=N_MB)) for s in SCHEDULES}


def pp4_on_the_world(rank: int, world_size: int) -> dict:
    return train_pipeline(None, PipelineConfig(schedule="1f1b", n_microbatches=N_MB))


def bad_inputs(rank: int, world_size: int) -> dict:
    """Each bad call's exception, by name: raised on every rank before any communication."""
    runner = build_pipeline(make_model(), None, PipelineConfig(schedule="gpipe", n_microbatches=N_MB))
    w = windows(0)
    calls = {
        "batch_not_divisible": lambda: runner.step(w[:6, :SEQ], w[:6]),
        "target_too_short": lambda: runner.step(w[:, :SEQ], w[:, : SEQ + 1]),
        "float_input_ids": lambda: runner.step(w[:, :SEQ].float(), w),
        "too_long": lambda: runner.step(torch.zeros(BATCH, 40, dtype=torch.long),
                                        torch.zeros(BATCH, 40 + NPRED, dtype=torch.long)),
        "no_grad_step": lambda: _no_grad(runner.step, w[:, :SEQ], w),
        "pp_not_a_group": lambda: build_pipeline(make_model(), "pp", PipelineConfig()),
        "too_many_stages": lambda: build_pipeline(
            make_model(), None, PipelineConfig(schedule="interleaved_1f1b", n_microbatches=4, stages_per_rank=2)),
        "meta_model_without_device": lambda: build_pipeline(_meta_model(), None, PipelineConfig()),
    }
    out = {}
    for name, call in calls.items():
        try:
            call()
        except Exception as exc:  # noqa: BLE001 (the test asserts on the type and message)
            out[name] = (type(exc).__name__, str(exc))
        else:
            out[name] = None
    return out


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


def _meta_model() -> MoETransformer:
    with torch.device("meta"):
        return MoETransformer(MoEConfig(**CONFIG))


# ---- the one-process reference ------------------------------------------------------------------
@contextlib.contextmanager
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # as in every rank: same matmul blocking, same rounding
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def reference() -> dict:
    """The single-process run, computed in a fresh process like the ranks' (one thread, no state left by
    other tests in this one), so that only the pipeline differs."""
    return run_distributed(_reference, world_size=1, timeout=600)[0]


def _reference(rank: int, world_size: int) -> dict:
    """Gradient accumulation over the same N_MB microbatches, in one process."""
    loss_fn = mtp_loss_fn()
    with one_thread():
        model = make_model()
        opt = optimizer(model.parameters())
        losses, norms = [], []
        for step in range(STEPS):
            w = windows(step)
            total, parts_sum = 0.0, {}
            for ids, win in zip(w[:, :SEQ].chunk(N_MB), w.chunk(N_MB)):
                out = model(ids)
                loss, parts = loss_fn(out, win)
                (loss / N_MB).backward()
                total += loss.item() / N_MB
                for k, v in {**parts, **out.metrics}.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + float(v) / N_MB
            losses.append(total)
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
            opt.step()
            opt.zero_grad()
        model.eval()
        v = windows(99, VAL_BATCH)
        with torch.no_grad():
            chunks = [loss_fn(model(ids), win) for ids, win in zip(v[:, :SEQ].chunk(VAL_MB), v.chunk(VAL_MB))]
            full_lm = loss_fn(model(v[:, :SEQ]), v)[1]["lm_loss"].item()
    return dict(losses=losses, norms=norms, metrics=parts_sum,
                params={n: p.detach().clone() for n, p in model.named_parameters()},
                val_loss=sum(c[0].item() for c in chunks) / VAL_MB,
                val_lm=sum(c[1]["lm_loss"].item() for c in chunks) / VAL_MB, full_lm=full_lm)


@pytest.fixture(scope="module")
def runs() -> dict:
    return run_distributed_checks([pp2_on_a_mesh, pp4_on_the_world, bad_inputs], world_size=4, timeout=600)


def pipelines(runs: dict) -> list[tuple[str, list[dict]]]:
    """(case id, the results of the ranks of one pipeline, by pp rank)."""
    out = []
    mesh_runs = runs["pp2_on_a_mesh"]
    for schedule in SCHEDULES:
        for replica, ranks in enumerate(((0, 1), (2, 3))):  # mesh [[0, 1], [2, 3]]: pp groups are its rows
            out.append((f"pp2-{schedule}-replica{replica}", [mesh_runs[r][schedule] for r in ranks]))
    out.append(("pp4-1f1b", runs["pp4_on_the_world"]))
    return out


# ---- multi-process tests ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.distributed
def test_stages_are_placed_in_loop_order(runs):
    placed = {case: [r["stage_indices"] for r in ranks] for case, ranks in pipelines(runs)}
    for replica in (0, 1):
        assert placed[f"pp2-gpipe-replica{replica}"] == [[0], [1]]
        assert placed[f"pp2-1f1b-replica{replica}"] == [[0], [1]]
        assert placed[f"pp2-interleaved_1f1b-replica{replica}"] == [[0, 2], [1, 3]]
    assert placed["pp4-1f1b"] == [[0], [1], [2], [3]]


@pytest.mark.slow
@pytest.mark.distributed
def test_parameters_equal_one_process_after_adamw_steps(runs, reference):
    for case, ranks in pipelines(runs):
        gathered: dict[str, torch.Tensor] = {}
        for r in ranks:
            assert not set(r["params"]) & set(gathered), f"{case}: a parameter sits on two stages"
            gathered.update(r["params"])
        assert set(gathered) == set(reference["params"]), f"{case}: stages do not hold the model's parameters"
        for name, ref in reference["params"].items():
            torch.testing.assert_close(gathered[name], ref, atol=ATOL, rtol=0, msg=lambda m: f"{case} {name}: {m}")
        moved = max((gathered[n] - p).abs().max().item() for n, p in make_model().named_parameters())
        assert moved > 1e-3, f"{case}: training did not move the parameters"


@pytest.mark.slow
@pytest.mark.distributed
def test_loss_equals_one_process_on_every_rank(runs, reference):
    for case, ranks in pipelines(runs):
        for r in ranks:  # broadcast from the last stage: rank 0 (first stage) logs the same number
            assert r["losses"] == pytest.approx(reference["losses"], rel=RTOL), case
            assert r["metrics"].keys() == reference["metrics"].keys(), case
            for k, v in reference["metrics"].items():
                assert r["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), f"{case} {k}"


@pytest.mark.slow
@pytest.mark.distributed
def test_gradient_norm_is_the_whole_model_s_on_every_rank(runs, reference):
    assert max(reference["norms"]) > MAX_NORM  # so the clipping changed the update
    for case, ranks in pipelines(runs):
        for r in ranks:  # one stage's own norm would be smaller; the parameters test checks the clipped update
            assert r["norms"] == pytest.approx(reference["norms"], rel=1e-5), case


@pytest.mark.slow
@pytest.mark.distributed
def test_evaluate_is_the_forward_only_loss(runs, reference):
    # the last-step parameters are equal (test above), so the validation losses must be too
    assert reference["val_lm"] == pytest.approx(reference["full_lm"], rel=1e-6)  # microbatching keeps lm loss
    for case, ranks in pipelines(runs):
        for r in ranks:
            assert r["val_loss"] == pytest.approx(reference["val_loss"], rel=RTOL), case
            assert r["val_parts"]["lm_loss"] == pytest.approx(reference["full_lm"], rel=1e-6), case


@pytest.mark.slow
@pytest.mark.distributed
def test_bad_calls_raise_clear_errors_on_every_rank(runs):
    expected = {
        "batch_not_divisible": ("ValueError", "batch size 6 is not divisible by n_microbatches=4"),
        "target_too_short": ("ValueError", "target_windows must be [B=8, >= T + n_pred_tokens = 14]"),
        "float_input_ids": ("ValueError", "input_ids must be an int64 tensor [B, T]"),
        "too_long": ("ValueError", "sequence length 40 > max_seq_len 32"),
        "no_grad_step": ("RuntimeError", "needs gradients enabled"),
        "pp_not_a_group": ("TypeError", "pp must be a DeviceMesh, a ProcessGroup or None"),
        "too_many_stages": ("ValueError", "n_layers=4 cannot be split into 8 stages (pp=4 x stages_per_rank=2)"),
        "meta_model_without_device": ("ValueError", "meta device: pass device="),
    }
    for rank, got in enumerate(runs["bad_inputs"]):
        for name, (kind, text) in expected.items():
            assert got[name] is not None, f"rank {rank}: {name} did not raise"
            assert got[name][0] == kind and text in got[name][1], f"rank {rank}: {name}: {got[name]}"


# ---- one-process tests --------------------------------------------------------------------------
@pytest.mark.parametrize("split", [[4], [2, 2], [1, 3], [1, 1, 1, 1]], ids=lambda s: "-".join(map(str, s)))
def test_stages_chained_by_hand_equal_the_model(split):
    model = make_model()
    ranges = plan_stages(model.config, PipelineConfig(schedule="gpipe", layers_per_stage=tuple(split)), len(split))
    stages = split_model(model, ranges)
    ids = windows(0)[:, :SEQ]
    x = (ids,)
    for stage in stages:
        x = stage(*x)
    got, want = stage_output_to_moe_output(x, model.config), model(ids)
    assert torch.equal(got.logits, want.logits)  # the same ops in the same order
    assert all(torch.equal(a, b) for a, b in zip(got.mtp_logits, want.mtp_logits, strict=True))
    torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1e-6, atol=0)
    assert got.metrics.keys() == want.metrics.keys()
    for k in want.metrics:
        assert float(got.metrics[k]) == pytest.approx(float(want.metrics[k]), rel=1e-6)
    names = [n for s in stages for n, _ in s.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each once, same names
    assert stages[0].embed_tokens is model.embed_tokens and stages[-1].lm_head is model.lm_head  # shared, not copied


def test_router_gradients_reach_every_stage():
    # the aux loss of the last stage's routers and of the first stage's routers both flow back
    model = make_model()
    s0, s1 = split_model(model, [range(0, 2), range(2, 4)])
    h, sums = s0(windows(0)[:, :SEQ])
    aux = stage_output_to_moe_output(s1(h, sums), model.config).aux_loss
    aux.backward()
    assert model.layers[1].block.ffn.router.weight.grad.abs().sum() > 0  # stage 0's MoE router
    assert model.layers[3].block.mixer.router.weight.grad.abs().sum() > 0  # stage 1's RoM router


def test_meta_stages_materialize_and_initialize():
    model = _meta_model()
    (stage,) = split_model(model, [range(0, 2), range(2, 4)], stage_indices=[1])
    stage.to_empty(device="cpu")
    stage.init_weights()
    assert stage.embed_tokens is None and stage.lm_head is not None
    assert torch.equal(stage.norm.weight, torch.ones_like(stage.norm.weight))
    std = stage.lm_head.weight.std().item()
    assert std == pytest.approx(CONFIG.get("init_std", 0.02), rel=0.1)
    assert all(torch.isfinite(p).all() for p in stage.parameters())


def test_plan_stages_splits_evenly_with_the_remainder_first():
    cfg = MoEConfig(**{**CONFIG, "n_layers": 5, "mod_layer_interval": 2})
    assert plan_stages(cfg, PipelineConfig(n_microbatches=4), 2) == [range(0, 3), range(3, 5)]
    assert plan_stages(cfg, PipelineConfig(schedule="interleaved_1f1b", n_microbatches=4), 2) == [
        range(0, 2), range(2, 3), range(3, 4), range(4, 5)]
    assert plan_stages(cfg, PipelineConfig(n_microbatches=2, layers_per_stage=(1, 4)), 2) == [range(0, 1), range(1, 5)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(schedule="1fb1"), "schedule must be one of gpipe, 1f1b, interleaved_1f1b, got '1fb1' (did you mean '1f1b'?)"),
    (dict(n_microbatches=0), "n_microbatches must be an int >= 1 or None, got 0"),
    (dict(schedule="gpipe", stages_per_rank=2), "stages_per_rank=2: schedule 'gpipe' runs one stage per rank"),
    (dict(schedule="interleaved_1f1b", stages_per_rank=1),
     "stages_per_rank must be >= 2 for schedule 'interleaved_1f1b'"),
    (dict(layers_per_stage=(2, 0)), "layers_per_stage must be ints >= 1"),
], ids=["misspelt-schedule", "zero-microbatches", "gpipe-two-stages", "interleaved-one-stage", "empty-stage"])
def test_bad_config_is_named(kwargs, message):
    with pytest.raises(ValueError) as err:
        PipelineConfig(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("model_kwargs, kwargs, pp, message", [
    ({}, dict(layers_per_stage=(1, 1, 2)), 2, "layers_per_stage has 3 entries for 2 stages"),
    ({}, dict(layers_per_stage=(1, 2)), 2, "layers_per_stage (1, 2) sums to 3, the model has n_layers=4"),
    (dict(tie_embeddings=True), {}, 2, "tie_embeddings=True cannot be split into 2 stages"),
    ({}, dict(schedule="1f1b", n_microbatches=2), 4, "schedule '1f1b' needs n_microbatches >= pp (4), got 2"),
    ({}, dict(schedule="interleaved_1f1b", n_microbatches=5), 2,
     "needs n_microbatches to be a multiple of max(1, n_microbatches // pp) = 2 (pp=2), got 5"),
], ids=["stage-count", "layer-sum", "tied-embeddings", "1f1b-few-microbatches", "interleaved-rounds"])
def test_bad_split_is_named(model_kwargs, kwargs, pp, message):
    cfg = MoEConfig(**{**CONFIG, **model_kwargs})
    with pytest.raises(ValueError) as err:
        plan_stages(cfg, PipelineConfig(**kwargs), pp)
    assert message in str(err.value)


def test_build_needs_a_process_group_and_an_moe_model():
    with pytest.raises(RuntimeError, match="needs an initialized process group"):
        build_pipeline(make_model(), None, PipelineConfig())
    with pytest.raises(TypeError, match="splits a MoETransformer, got Linear"):
        build_pipeline(torch.nn.Linear(2, 2), None, PipelineConfig())
