"""Pipeline parallel for the MoE transformer on ``torch.distributed.pipelining``.

The model is split by hand, as torchtitan does: stage ``s`` of ``S = pp * stages_per_rank`` keeps a
contiguous slice of ``model.layers``; the first stage also holds the token embedding, the last the
final norm, ``lm_head`` and the multi-token-prediction heads (they read the final hidden state).
Each stage module keeps the full model's parameter names (``layers`` is an ``nn.ModuleDict`` keyed by
the global layer index, as in torchtitan), so ``layers.3.ffn...`` is the same name on a stage as in
the whole model: checkpoints and parameter comparisons line up by name. Stages are placed in
torch's loop order: stage ``s`` lives on pp rank ``s % pp`` (interleaved: rank ``r`` holds
``r, r + pp, ...``).

What travels between stages (per microbatch): the hidden state ``h`` [mb, T, d_model] and
``router_sums`` [4] fp32 = (MoE balance, MoE z, RoM balance, RoM z) summed over the routers of the
stages so far, with its autograd graph. The last stage rebuilds the model's weighted auxiliary loss
``balance_loss_weight * (s0 + s2) + router_z_loss_weight * (s1 + s3)`` and its router metrics from
it, so the loss and every gradient (routers of early stages included) are those of the single-process
model; only the summation order of the aux terms differs (float rounding).

Which single-process run it equals: torch's schedules run the loss per microbatch and average the
gradients over the ``n_microbatches`` microbatches, so one pipeline step equals one single-process
optimizer step with gradient accumulation over the same microbatches (the Trainer's
``gradient_accumulation_steps`` with loss / accum). The cross-entropy parts equal a full-batch
forward too (equal-size microbatches: mean of means); the MoE balance loss is a statistic of the
tokens in one forward and so is per microbatch, as with gradient accumulation, and a fixed
``moe_capacity_factor`` sizes expert capacity per microbatch. Dropout draws differ from a single
process (each stage draws from its rank's generator).

Example::
    runner = build_pipeline(model, mesh["pp"], PipelineConfig(schedule="1f1b", n_microbatches=4))
    optimizer = torch.optim.AdamW([p for m in runner.stage_modules for p in m.parameters()], lr=3e-4)
    loss = runner.step(window[:, :seq_len], window); optimizer.step(); optimizer.zero_grad()
"""
from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nexus.models.moe.config import MoEConfig
from nexus.models.moe.mod import mod_capacity
from nexus.models.moe.model import MoEOutput, MoETransformer, run_layers
from nexus.models.moe.moe import RouterLosses
from nexus.training.losses import multi_token_prediction_loss

__all__ = [
    "PIPELINE_SCHEDULES",
    "LossFn",
    "MoEPipelineStage",
    "PipelineConfig",
    "PipelineRunner",
    "build_pipeline",
    "mtp_loss_fn",
    "plan_stages",
    "split_model",
    "stage_output_to_moe_output",
]

PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")

# loss_fn(out, window) on the last stage, per microbatch: out is the microbatch's MoEOutput, window
# [mb, T + n_pred_tokens] int64; returns the scalar loss or (loss, {name: 0-dim tensor}) for logging.
LossFn = Callable[[MoEOutput, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, dict[str, Any]]"]


@dataclasses.dataclass(kw_only=True)
class PipelineConfig:
    """How :func:`build_pipeline` splits and schedules the model; validated when built.

    Fields:
        schedule: ``gpipe`` (all forwards, then all backwards), ``1f1b`` (one forward, one backward
            in steady state: at most ``pp`` microbatches of activations alive), or
            ``interleaved_1f1b`` (several stages per rank, smaller bubble).
        n_microbatches: microbatches per optimizer step; must divide the batch. ``None``: 2 x pp.
            ``1f1b`` needs at least ``pp``; ``interleaved_1f1b`` needs a multiple of
            ``max(1, n_microbatches // pp)`` (torch's rounds).
        stages_per_rank: ``None`` -> 1 (``gpipe``, ``1f1b``) or 2 (``interleaved_1f1b``), which must
            have >= 2; the others run exactly 1.
        layers_per_stage: trunk layers of each stage, in stage order (sum = ``n_layers``, each
            >= 1); ``None``: as even as possible, earlier stages taking the remainder (the last
            stage also carries ``lm_head`` and the MTP heads).

    Example:
        >>> PipelineConfig(schedule="interleaved_1f1b", n_microbatches=4).stages_per_rank
        2
    """

    schedule: str = "1f1b"
    n_microbatches: int | None = None
    stages_per_rank: int | None = None
    layers_per_stage: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.schedule not in PIPELINE_SCHEDULES:
            close = difflib.get_close_matches(str(self.schedule), PIPELINE_SCHEDULES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"PipelineConfig.schedule must be one of {', '.join(PIPELINE_SCHEDULES)}, "
                             f"got {self.schedule!r}{hint}")
        n = self.n_microbatches
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"PipelineConfig.n_microbatches must be an int >= 1 or None, got {n!r}")
        interleaved = self.schedule == "interleaved_1f1b"
        if self.stages_per_rank is None:
            self.stages_per_rank = 2 if interleaved else 1
        spr = self.stages_per_rank
        if isinstance(spr, bool) or not isinstance(spr, int) or spr < 1:
            raise ValueError(f"PipelineConfig.stages_per_rank must be an int >= 1, got {spr!r}")
        if interleaved and spr < 2:
            raise ValueError("PipelineConfig.stages_per_rank must be >= 2 for schedule 'interleaved_1f1b' "
                             f"(got {spr}); with one stage per rank use schedule '1f1b'")
        if not interleaved and spr != 1:
            raise ValueError(f"PipelineConfig.stages_per_rank={spr}: schedule {self.schedule!r} runs one stage "
                             "per rank; several stages per rank need schedule 'interleaved_1f1b'")
        if self.layers_per_stage is not None:
            lps = tuple(self.layers_per_stage)
            if not lps or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in lps):
                raise ValueError(f"PipelineConfig.layers_per_stage must be ints >= 1 (one per stage), got "
                                 f"{self.layers_per_stage!r}")
            self.layers_per_stage = lps

    def microbatches(self, pp_size: int) -> int:
        """``n_microbatches``, or its default 2 x ``pp_size``."""
        return self.n_microbatches if self.n_microbatches is not None else 2 * pp_size


def plan_stages(model_config: MoEConfig, config: PipelineConfig, pp_size: int) -> list[range]:
    """The trunk layers of every stage (global indices), after checking the split can run.

    Raises ValueError naming the problem: fewer layers than stages, ``layers_per_stage`` that does
    not match, tied embeddings across stages, too few microbatches for the schedule.

    Example:
        >>> plan_stages(MoEConfig(n_layers=5, ...), PipelineConfig(schedule="1f1b", n_microbatches=4), 2)
        [range(0, 3), range(3, 5)]
    """
    if isinstance(pp_size, bool) or not isinstance(pp_size, int) or pp_size < 1:
        raise ValueError(f"pipeline group size must be an int >= 1, got {pp_size!r}")
    n_layers = model_config.n_layers
    n_stages = pp_size * config.stages_per_rank
    split = f"{n_stages} stages (pp={pp_size} x stages_per_rank={config.stages_per_rank})"
    if config.layers_per_stage is not None:
        lps = config.layers_per_stage
        if len(lps) != n_stages:
            raise ValueError(f"PipelineConfig.layers_per_stage has {len(lps)} entries for {split}")
        if sum(lps) != n_layers:
            raise ValueError(f"PipelineConfig.layers_per_stage {lps} sums to {sum(lps)}, the model has "
                             f"n_layers={n_layers}")
    else:
        if n_layers < n_stages:
            raise ValueError(f"n_layers={n_layers} cannot be split into {split}: each stage needs at least "
                             "one layer")
        base, extra = divmod(n_layers, n_stages)
        lps = tuple(base + (s < extra) for s in range(n_stages))
    if model_config.tie_embeddings and n_stages > 1:
        raise ValueError(f"tie_embeddings=True cannot be split into {split}: the embedding sits on the first "
                         "stage and lm_head on the last; untie them (tie_embeddings=False) for pipeline parallel")
    n_mb = config.microbatches(pp_size)
    if config.schedule == "1f1b" and n_mb < pp_size:
        raise ValueError(f"schedule '1f1b' needs n_microbatches >= pp ({pp_size}), got {n_mb}")
    if config.schedule == "interleaved_1f1b":
        rounds = max(1, n_mb // pp_size)
        if n_mb % rounds:
            raise ValueError(f"schedule 'interleaved_1f1b' needs n_microbatches to be a multiple of "
                             f"max(1, n_microbatches // pp) = {rounds} (pp={pp_size}), got {n_mb}")
    starts = [sum(lps[:s]) for s in range(n_stages)]
    return [range(start, start + k) for start, k in zip(starts, lps)]


def _sum_router_losses(moe: list[RouterLosses], rom: list[RouterLosses], device: torch.device) -> torch.Tensor:
    zero = torch.zeros((), dtype=torch.float32, device=device)
    parts = []
    for group in (moe, rom):
        for attr in ("balance", "z"):
            parts.append(torch.stack([getattr(rl, attr).float() for rl in group]).sum() if group else zero)
    return torch.stack(parts)


class MoEPipelineStage(nn.Module):
    """One pipeline stage of a :class:`MoETransformer`: its slice of layers, sharing the model's modules.

    Parameter names are the full model's (``embed_tokens.weight``, ``layers.<global index>...``,
    ``norm.weight``, ``lm_head.weight``, ``mtp_heads.<k>...``); absent parts are ``None``.

    Shapes (mb = microbatch, T = sequence length, D = d_model, V = vocab_size):
        first stage: forward(input_ids [mb, T] int64)
        other stages: forward(h [mb, T, D], router_sums [4] fp32)
        returns (h, router_sums) except on the last stage: (logits [mb, T, V], *mtp_logits
        (n_pred_tokens - 1 tensors [mb, T, V]), router_sums). ``router_sums`` = running sums of the
        un-weighted (MoE balance, MoE z, RoM balance, RoM z) router losses.

    Example:
        >>> s0, s1 = split_model(model, [range(0, 2), range(2, 4)])
        >>> logits, *mtp, sums = s1(*s0(input_ids))  # == model(input_ids).logits
    """

    def __init__(self, model: MoETransformer, layer_ids: Sequence[int], *, first: bool, last: bool) -> None:
        super().__init__()
        self.config = model.config
        self.is_first, self.is_last = first, last
        self.layer_ids = tuple(layer_ids)
        self.embed_tokens = model.embed_tokens if first else None
        self.dropout = model.dropout
        # keyed by global index: names stay those of the whole model (torchtitan does the same)
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in self.layer_ids})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.mtp_heads = model.mtp_heads if last else None

    def init_weights(self) -> None:
        """The model's initialisation, applied to this stage's modules (after ``to_empty`` from meta)."""
        # the model's init reads only config, named_modules and parameters, which a stage has under the same names
        MoETransformer.init_weights(self)  # type: ignore[arg-type]

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks of this stage (trunk layers, then MTP heads): what FSDP wraps one by one."""
        return list(self.layers.values()) + (list(self.mtp_heads) if self.mtp_heads is not None else [])

    def forward(self, x: torch.Tensor, router_sums: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        if self.is_first:
            if x.dim() != 2 or x.dtype != torch.long:
                raise ValueError(f"first pipeline stage takes input_ids [B, T] int64, got {tuple(x.shape)} {x.dtype}")
            if x.shape[1] > self.config.max_seq_len:
                raise ValueError(f"sequence length {x.shape[1]} > max_seq_len {self.config.max_seq_len}")
            h = self.dropout(self.embed_tokens(x))
        else:
            if router_sums is None:
                raise ValueError(f"pipeline stage with layers {self.layer_ids} takes (h, router_sums), got h only")
            h = x
        positions = torch.arange(h.shape[1], device=h.device)
        h, moe, rom, _ = run_layers(self.layers.values(), h, positions)
        if moe or rom:
            local = _sum_router_losses(moe, rom, h.device)
            sums = local if router_sums is None else router_sums + local
        elif router_sums is None:
            sums = torch.zeros(4, dtype=torch.float32, device=h.device)
        else:
            sums = router_sums.clone()  # a fresh tensor: never send the receive buffer itself on
        if not self.is_last:
            return h, sums
        logits = self.lm_head(self.norm(h))
        mtp = tuple(self.lm_head(head(h, positions)) for head in self.mtp_heads)
        return (logits, *mtp, sums)


def split_model(model: MoETransformer, stage_layers: Sequence[range],
                stage_indices: Sequence[int] | None = None) -> list[MoEPipelineStage]:
    """Stage modules for ``stage_indices`` (default: all) of the split ``stage_layers``.

    The stages share the model's modules (no copy): build the model on the meta device to avoid
    holding all of it, or drop ``model`` after the split. Stage ``0`` gets the embedding, stage
    ``len(stage_layers) - 1`` the norm, ``lm_head`` and MTP heads.

    Example:
        >>> stages = split_model(model, plan_stages(model.config, PipelineConfig(), pp_size=2))
    """
    if not isinstance(model, MoETransformer):
        raise TypeError(f"pipeline parallel splits a MoETransformer, got {type(model).__name__}")
    n = len(stage_layers)
    covered = [i for r in stage_layers for i in r]
    if covered != list(range(model.config.n_layers)):
        raise ValueError(f"stage layer ranges {list(stage_layers)} do not cover layers 0..{model.config.n_layers - 1} "
                         "once each, in order")
    indices = range(n) if stage_indices is None else stage_indices
    for s in indices:
        if not 0 <= s < n:
            raise ValueError(f"stage index {s} outside [0, {n})")
    return [MoEPipelineStage(model, stage_layers[s], first=s == 0, last=s == n - 1) for s in indices]


def stage_output_to_moe_output(output: Sequence[torch.Tensor], config: MoEConfig) -> MoEOutput:
    """The :class:`MoEOutput` of the last stage's tuple ``(logits, *mtp_logits, router_sums)``.

    aux_loss = balance_loss_weight * (MoE + RoM balance sums) + router_z_loss_weight * (MoE + RoM z
    sums), as the model computes it; metrics are the per-layer means the model reports.
    """
    logits, *mtp, sums = output
    aux = config.balance_loss_weight * (sums[0] + sums[2]) + config.router_z_loss_weight * (sums[1] + sums[3])
    specs = [config.layer_spec(i) for i in range(config.n_layers)]
    n_moe = sum(s.ffn == "moe" for s in specs)
    n_rom = sum(s.mixer == "rom" for s in specs)
    metrics: dict[str, torch.Tensor | float] = {}
    with torch.no_grad():
        for prefix, count, offset in (("moe", n_moe, 0), ("rom", n_rom, 2)):
            if count:
                metrics[f"{prefix}_balance_loss"] = sums[offset].detach() / count
                metrics[f"{prefix}_z_loss"] = sums[offset + 1].detach() / count
    if any(s.mod for s in specs):
        t = logits.shape[1]
        metrics["mod_fraction"] = mod_capacity(t, config.mod_capacity_factor) / t
    return MoEOutput(logits, tuple(mtp), aux, metrics)


def mtp_loss_fn(mtp_weight: float = 1.0) -> LossFn:
    """The Trainer's loss: multi-token prediction loss + aux_loss, with parts for logging.

    Returns ``loss_fn(out, window) -> (loss, parts)``, parts: ``lm_loss``, ``aux_loss``,
    ``mtp_loss_<k>`` (detached 0-dim).

    Example:
        >>> runner = build_pipeline(model, group, PipelineConfig(), mtp_loss_fn(mtp_weight=0.5))
    """

    def loss_fn(out: MoEOutput, window: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, lm, extra = multi_token_prediction_loss(out.logits, out.mtp_logits, window, mtp_weight=mtp_weight)
        parts = {"lm_loss": lm.detach(), "aux_loss": out.aux_loss.detach()}
        for k, e in enumerate(extra, start=1):
            parts[f"mtp_loss_{k}"] = e.detach()
        return total + out.aux_loss, parts

    return loss_fn


def _pp_group(pp: Any) -> dist.ProcessGroup:
    if not dist.is_initialized():
        raise RuntimeError("pipeline parallel needs an initialized process group (torchrun / init_process_group)")
    if pp is None:
        return dist.group.WORLD
    if isinstance(pp, dist.ProcessGroup):
        return pp
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(pp, DeviceMesh):
        names = pp.mesh_dim_names or ()
        if pp.ndim == 1:
            return pp.get_group()
        if "pp" in names:
            return pp["pp"].get_group()
        raise ValueError(f"pipeline parallel needs a 1-D mesh or one with a 'pp' dim, got dims {names or pp.ndim}")
    raise TypeError(f"pp must be a DeviceMesh, a ProcessGroup or None (the world), got {type(pp).__name__}")


class PipelineRunner:
    """Runs the local stages of a pipeline: training steps and forward-only evaluation.

    Every rank of the pipeline group calls :meth:`step` / :meth:`evaluate` with the same batch (only
    the first stage reads ``input_ids``, only the last ``target_windows``). The loss comes back on
    every rank (broadcast from the last stage's rank), so rank 0 can log it.

    Attributes:
        stage_modules: the local stage modules (after ``parallelize_fn``), in stage order; the
            optimizer takes ``[p for m in runner.stage_modules for p in m.parameters()]``.
        stage_indices: their global stage indices; ``n_stages``: stages in the whole pipeline.
        n_microbatches: microbatches per :meth:`step`.
        last_metrics: after :meth:`step`, the loss parts and model metrics, each averaged over the
            microbatches: 0-dim fp32 tensors on this rank's device, the same on every rank.
    """

    def __init__(self, stage_modules: list[nn.Module], stage_indices: list[int], n_stages: int,
                 group: dist.ProcessGroup, device: torch.device, config: PipelineConfig, loss_fn: LossFn,
                 model_config: MoEConfig) -> None:
        self.stage_modules = stage_modules
        self.stage_indices = stage_indices
        self.n_stages = n_stages
        self.group = group
        self.device = device
        self.config = config
        self.model_config = model_config
        self.pp_size = dist.get_world_size(group)
        self.pp_rank = dist.get_rank(group)
        self.n_microbatches = config.microbatches(self.pp_size)
        self.has_first = 0 in stage_indices
        self.has_last = n_stages - 1 in stage_indices
        self.last_metrics: dict[str, torch.Tensor] = {}
        self._loss_fn = loss_fn
        self._schedules: dict[tuple, Any] = {}
        self._records: list[dict[str, torch.Tensor]] = []
        self._keys: dict[bool, list[str]] = {}

    def named_parameters(self):
        """``(name, parameter)`` of the local stages; names are the whole model's."""
        for module in self.stage_modules:
            yield from module.named_parameters()

    def parameters(self):
        for module in self.stage_modules:
            yield from module.parameters()

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the gradients of the whole model (every stage, every pp rank) to ``max_norm``.

        A local ``clip_grad_norm_`` would see one stage's gradients only; this combines the stages'
        norms over the pipeline group (sum of p-th powers, or max for inf) first. Returns the total
        norm (0-dim fp32, the same on every rank), as ``torch.nn.utils.clip_grad_norm_`` does.
        """
        params = [p for p in self.parameters() if p.grad is not None]
        norm_type = float(norm_type)
        if params:
            local = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type)
            if hasattr(local, "full_tensor"):  # FSDP/TP gradients are DTensors: the norm of the whole tensors
                local = local.full_tensor()
            local = local.float()
        else:
            local = torch.zeros((), dtype=torch.float32, device=self.device)
        if self.pp_size > 1:
            if norm_type == float("inf"):
                dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self.group)
                total = local
            else:
                powered = local ** norm_type
                dist.all_reduce(powered, group=self.group)
                total = powered ** (1.0 / norm_type)
        else:
            total = local
        if params:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    def train(self, mode: bool = True) -> PipelineRunner:
        for module in self.stage_modules:
            module.train(mode)
        return self

    def eval(self) -> PipelineRunner:
        return self.train(False)

    # ---- running ------------------------------------------------------------------------------
    def step(self, input_ids: torch.Tensor, target_windows: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one optimizer step over ``n_microbatches`` microbatches.

        input_ids [B, T] int64, target_windows [B, T + n_pred_tokens] int64 (B divisible by
        n_microbatches). Gradients accumulate in the local stages' ``.grad`` as the mean over
        microbatches (zero them between steps). Returns the loss, 0-dim fp32, mean over
        microbatches, the same on every rank of the group; :attr:`last_metrics` holds the parts.
        """
        if not torch.is_grad_enabled():
            raise RuntimeError("PipelineRunner.step needs gradients enabled; use evaluate() for a forward-only pass")
        n_mb = self.n_microbatches
        self._check_batch(input_ids, target_windows, n_mb)
        schedule = self._schedule(True, n_mb, tuple(input_ids.shape))
        loss, metrics = self._run(schedule, input_ids, target_windows, n_mb, training=True)
        self.last_metrics = metrics
        return loss

    @torch.no_grad()
    def evaluate(self, input_ids: torch.Tensor, target_windows: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Forward-only loss of a batch: ``(loss, parts)``, means over microbatches, on every rank.

        Uses the largest microbatch count <= n_microbatches that divides B (and suits the
        schedule), so a short last validation batch still runs. With dropless MoE, ``parts["lm_loss"]``
        equals the full-batch next-token loss of the single-process model. Call :meth:`eval` first
        to switch dropout off, as for any model.
        """
        b = input_ids.shape[0] if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 else 1
        n_mb = max(d for d in range(1, self.n_microbatches + 1) if b % d == 0 and self._schedulable(d))
        self._check_batch(input_ids, target_windows, n_mb)
        schedule = self._schedule(False, n_mb, tuple(input_ids.shape))
        return self._run(schedule, input_ids, target_windows, n_mb, training=False)

    def _schedulable(self, n_mb: int) -> bool:
        # forward-only runs use GPipe (any count) with one stage per rank, else interleaved 1F1B's rounds rule
        return len(self.stage_modules) == 1 or n_mb % max(1, n_mb // self.pp_size) == 0

    def _check_batch(self, input_ids: torch.Tensor, target_windows: torch.Tensor, n_mb: int) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be an int64 tensor [B, T], got "
                             f"{tuple(getattr(input_ids, 'shape', ()))} {getattr(input_ids, 'dtype', type(input_ids))}")
        b, t = input_ids.shape
        if b % n_mb:
            raise ValueError(f"batch size {b} is not divisible by n_microbatches={n_mb}")
        if t > self.model_config.max_seq_len:
            raise ValueError(f"sequence length {t} > max_seq_len {self.model_config.max_seq_len}")
        need = t + self.model_config.n_pred_tokens
        if (not isinstance(target_windows, torch.Tensor) or target_windows.dim() != 2
                or target_windows.shape[0] != b or target_windows.shape[1] < need):
            raise ValueError(f"target_windows must be [B={b}, >= T + n_pred_tokens = {need}], got "
                             f"{tuple(getattr(target_windows, 'shape', ()))}")

    def _schedule(self, training: bool, n_mb: int, shape: tuple[int, int]):
        # torch sizes its receive buffers on the first step: one schedule (and stages) per batch shape
        key = (training, n_mb, shape)
        if key not in self._schedules:
            from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                                      ScheduleInterleaved1F1B)

            stages = [PipelineStage(m, s, self.n_stages, self.device, group=self.group)
                      for m, s in zip(self.stage_modules, self.stage_indices)]
            if len(stages) > 1:
                self._schedules[key] = ScheduleInterleaved1F1B(stages, n_mb, loss_fn=self._stage_loss)
            else:
                cls = Schedule1F1B if training and self.config.schedule == "1f1b" else ScheduleGPipe
                self._schedules[key] = cls(stages[0], n_mb, loss_fn=self._stage_loss)
        return self._schedules[key]

    def _stage_loss(self, output: tuple[torch.Tensor, ...], window: torch.Tensor) -> torch.Tensor:
        out = stage_output_to_moe_output(output, self.model_config)
        result = self._loss_fn(out, window)
        loss, parts = result if isinstance(result, tuple) else (result, {})
        record = {name: torch.as_tensor(v, device=loss.device).detach().float()
                  for name, v in {**parts, **out.metrics}.items()}
        self._records.append(record)
        return loss

    def _run(self, schedule, input_ids, target_windows, n_mb: int, *, training: bool):
        self._records = []
        losses: list[torch.Tensor] = []
        args = (input_ids.to(self.device),) if self.has_first else ()
        target = target_windows.to(self.device) if self.has_last else None
        if training:
            schedule.step(*args, target=target, losses=losses, return_outputs=False)
        else:
            schedule.eval(*args, target=target, losses=losses)
        values = None
        if self.has_last:
            # torch's metadata inference may call the loss once more before the microbatches: keep the last n_mb
            records = self._records[-n_mb:]
            keys = list(records[0])
            values = torch.stack([torch.stack(losses).detach().float().mean()]
                                 + [torch.stack([r[k] for r in records]).mean() for k in keys])
        self._records = []
        if self.pp_size > 1:
            last_rank = (self.n_stages - 1) % self.pp_size
            if training not in self._keys:  # the part names travel once; later steps send one tensor
                box = [keys if self.has_last else None]
                dist.broadcast_object_list(box, group=self.group, group_src=last_rank, device=self.device)
                self._keys[training] = box[0]
            keys = self._keys[training]
            if values is None:
                values = torch.empty(1 + len(keys), dtype=torch.float32, device=self.device)
            elif values.numel() != 1 + len(keys):
                raise RuntimeError(f"loss_fn returned parts {list(records[0])}, earlier steps returned {keys}: "
                                   "the parts must stay the same from step to step")
            dist.broadcast(values, group=self.group, group_src=last_rank)
        return values[0], {k: values[i + 1] for i, k in enumerate(keys)}


def build_pipeline(model: MoETransformer, pp: Any, config: PipelineConfig | None = None,
                   loss_fn: LossFn | None = None, *,
                   parallelize_fn: Callable[[MoEPipelineStage], nn.Module] | None = None,
                   device: torch.device | str | None = None) -> PipelineRunner:
    """Split ``model`` into pipeline stages, keep this rank's, and schedule them.

    Args:
        model: a :class:`MoETransformer` (its modules are shared with the stages, not copied).
        pp: the pipeline group: a ``DeviceMesh`` (1-D, or one with a ``"pp"`` dim), a
            ``ProcessGroup``, or ``None`` for the whole world.
        config: :class:`PipelineConfig` (default ``1f1b`` with 2 x pp microbatches).
        loss_fn: ``loss_fn(out: MoEOutput, window [mb, T + n_pred] int64) -> loss`` or
            ``(loss, parts)``, per microbatch on the last stage; default :func:`mtp_loss_fn` (the
            Trainer's loss, aux included). The Trainer's own works as
            ``lambda out, w: trainer.compute_loss(w, out)``.
        parallelize_fn: applied to each local stage module before scheduling (TP, activation
            checkpointing, FSDP: torchtitan's order); returns the module to run.
        device: where the stages run; default: the model's parameters' device (required when the
            model is on the meta device: materialize ``runner.stage_modules`` there before stepping).

    Returns:
        :class:`PipelineRunner`.

    Example:
        >>> runner = build_pipeline(model, mesh["pp"], PipelineConfig(schedule="gpipe", n_microbatches=8))
        >>> loss = runner.step(window[:, :-model.config.n_pred_tokens], window)
    """
    config = PipelineConfig() if config is None else config
    if not isinstance(config, PipelineConfig):
        raise TypeError(f"config must be a PipelineConfig, got {type(config).__name__}")
    if not isinstance(model, MoETransformer):
        raise TypeError(f"pipeline parallel splits a MoETransformer, got {type(model).__name__}")
    group = _pp_group(pp)
    pp_size, pp_rank = dist.get_world_size(group), dist.get_rank(group)
    stage_layers = plan_stages(model.config, config, pp_size)
    if device is None:
        device = next(model.parameters()).device
        if device.type == "meta":
            raise ValueError("the model is on the meta device: pass device= (where its stages will be materialized)")
    device = torch.device(device)
    n_stages = len(stage_layers)
    indices = [pp_rank + k * pp_size for k in range(config.stages_per_rank)]  # torch's loop placement
    modules: list[nn.Module] = split_model(model, stage_layers, indices)
    if parallelize_fn is not None:
        modules = [parallelize_fn(m) for m in modules]
    return PipelineRunner(modules, indices, n_stages, group, device, config,
                          loss_fn if loss_fn is not None else mtp_loss_fn(), model.config)
