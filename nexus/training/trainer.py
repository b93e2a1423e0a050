"""The training loop: accumulation, autocast, clipping, evaluation, checkpoints, logging.

Example::
    trainer = Trainer(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                      train_loader=train_loader, val_loader=val_loader,
                      gradient_accumulation_steps=8, checkpoint_dir="./checkpoints")
    trainer.train(max_steps=100000)
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from nexus.data.sampler import ResumableShuffleSampler
from nexus.training import checkpoint as ckpt
from nexus.training.losses import multi_token_prediction_loss

PRECISIONS = ("fp32", "bf16", "fp16", "fp8", "mxfp8", "fp4")


@dataclasses.dataclass(kw_only=True)
class TrainingArguments:
    """Everything the loop needs besides the model, data and optimizer. Validated when built."""

    output_dir: str = "runs/default"
    checkpoint_dir: str | None = None  # defaults to output_dir
    seq_len: int = 128
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int | None = None
    total_tokens: int | None = None  # sets max_steps when max_steps is not given
    max_lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 0
    lr_schedule: str = "cosine"  # cosine | wsd | sgdr | constant
    decay_steps: int | None = None  # wsd: length of the final decay (default: the last 20% of steps)
    wsd_decay: str = "linear"  # wsd: linear | cosine | 1-sqrt
    restart_steps: int = 1000  # sgdr: first cycle length T_0
    restart_mult: int = 1  # sgdr: cycle length multiplier T_mult
    max_grad_norm: float | None = 1.0
    precision: str = "fp32"
    mtp_loss_weight: float = 1.0
    log_interval: int = 10
    eval_interval: int = 100
    eval_steps: int = 20
    save_interval: int = 500
    keep_last: int = 3
    save_best: bool = True
    metric_for_best: str = "val_loss"
    early_stopping_patience: int | None = None
    seed: int = 0
    device: str = "auto"
    use_wandb: bool = False
    wandb_project: str = "nexus"
    wandb_mode: str = "offline"
    tensorboard: bool = True
    progress_bar: bool = True
    peak_flops: float | None = None  # device peak FLOP/s for model FLOPs utilisation

    def __post_init__(self):
        positive = ("seq_len", "batch_size", "gradient_accumulation_steps", "log_interval", "eval_interval",
                    "eval_steps", "save_interval", "keep_last")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "total_tokens", "early_stopping_patience"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        steps = self.resolve_max_steps()
        if steps is not None and self.warmup_steps > steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({steps})")
        if not self.max_lr > 0:
            raise ValueError(f"max_lr must be positive, got {self.max_lr}")
        if not 0 <= self.min_lr <= self.max_lr:
            raise ValueError(f"need 0 <= min_lr <= max_lr, got min_lr={self.min_lr}, max_lr={self.max_lr}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive or null, got {self.max_grad_norm}")
        if self.lr_schedule not in ("cosine", "wsd", "sgdr", "constant"):
            raise ValueError(f"lr_schedule must be cosine, wsd, sgdr or constant, got {self.lr_schedule!r}")
        if self.wsd_decay not in ("linear", "cosine", "1-sqrt"):
            raise ValueError(f"wsd_decay must be linear, cosine or 1-sqrt, got {self.wsd_decay!r}")
        for name in ("decay_steps", "restart_steps", "restart_mult"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb_mode must be offline, online or disabled, got {self.wandb_mode!r}")
        if self.metric_for_best not in ("val_loss", "val_perplexity"):
            raise ValueError(f"metric_for_best must be val_loss or val_perplexity, got {self.metric_for_best!r}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps * self.seq_len

    def resolve_max_steps(self) -> int | None:
        if self.max_steps is not None:
            return self.max_steps
        if self.total_tokens is not None:
            return max(self.total_tokens // self.tokens_per_step, 1)
        return None

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} was asked for but CUDA is not available")
        return torch.device(self.device)


class TrainerCallback:
    """Hooks called by ``Trainer``; override the ones you need. Set ``trainer.should_stop`` to stop."""

    def on_train_begin(self, trainer: Trainer) -> None: ...
    def on_log(self, trainer: Trainer, metrics: dict) -> None: ...
    def on_evaluate(self, trainer: Trainer, metrics: dict) -> None: ...
    def on_save(self, trainer: Trainer, path: Path) -> None: ...
    def on_train_end(self, trainer: Trainer) -> None: ...


@dataclasses.dataclass
class TrainResult:
    step: int
    tokens_seen: int
    stop_reason: str  # "max_steps" | "early_stopping" | "nonfinite_loss" | "callback"
    last_checkpoint: Path | None
    best_metric: float | None
    metrics: dict


class NonFiniteLossError(RuntimeError):
    """Raised inside the loop when the loss or the gradient norm is NaN or inf."""


class Trainer:
    """Train ``model`` (returning logits, ``mtp_logits`` and ``aux_loss``) on windows of token ids.

    ``args`` holds the settings; keyword arguments named like ``TrainingArguments`` fields override it
    (``gradient_accumulation_steps=8, checkpoint_dir="./ckpt", log_interval=10`` ...). ``config`` is
    saved in checkpoints for reference (a dataclass or a mapping of plain values).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: Any = None,
        train_loader: Any = None,
        val_loader: Any = None,
        config: Any = None,
        args: TrainingArguments | None = None,
        callbacks: list[TrainerCallback] | None = None,
        **overrides: Any,
    ):
        names = {f.name for f in dataclasses.fields(TrainingArguments)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"Trainer got unknown argument(s) {unknown}; TrainingArguments fields are {sorted(names)}")
        args = args or TrainingArguments()
        self.args = dataclasses.replace(args, **overrides) if overrides else args
        if train_loader is None:
            raise ValueError("train_loader is required")
        self.device = self.args.resolve_device()
        if self.args.precision in ("fp8", "mxfp8", "fp4"):
            from nexus.training.mixed_precision import apply_precision

            model = apply_precision(model, self.args.precision)  # swapped layers keep the same Parameters
        self.model = model.to(self.device)
        self.optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=self.args.max_lr, weight_decay=0.1)
        self.lr_scheduler = lr_scheduler
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.config = config
        self.callbacks = list(callbacks or [])
        self.output_dir = Path(self.args.output_dir)
        self.checkpoint_dir = Path(self.args.checkpoint_dir or self.args.output_dir)
        self.step = 0
        self.tokens_seen = 0
        self.micro_batches_seen = 0
        self.best_metric: float | None = None
        self.evals_without_improvement = 0
        self.should_stop = False
        self.last_checkpoint: Path | None = None
        self.scaler = torch.amp.GradScaler(self.device.type) if self.args.precision == "fp16" else None
        self._autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.args.precision)
        self._data_iter = None
        self._flops_per_token = self._estimate_flops_per_token()

    # ---- data position -------------------------------------------------------------------------
    def _data_state(self) -> dict:
        """Where the data stream stands: counted here, since loaders prefetch ahead of use."""
        state = {"micro_batches": self.micro_batches_seen}
        sampler = getattr(self.train_loader, "sampler", None)
        dataset = getattr(self.train_loader, "dataset", None)
        if isinstance(sampler, ResumableShuffleSampler):
            batch_size = getattr(self.train_loader, "batch_size", None) or 1
            state["sampler"] = sampler.state_dict(consumed=self.micro_batches_seen * batch_size)
        elif hasattr(dataset, "state_dict"):
            state["dataset"] = dataset.state_dict()
        return state

    def _restore_data(self, state: dict) -> None:
        if "sampler" in state:
            self.train_loader.sampler.load_state_dict(state["sampler"])
        elif "dataset" in state:
            self.train_loader.dataset.load_state_dict(state["dataset"])
        else:  # a plain loader: replay its order up to where the run stopped (exact when not shuffled)
            self._data_iter = self._new_data_iter()
            for _ in range(state["micro_batches"]):
                self._next_batch()
            self.micro_batches_seen = state["micro_batches"]
            return
        self._data_iter = None

    def _new_data_iter(self):
        # A DataLoader iterator draws its base seed from the global RNG unless given a generator;
        # keep that draw off the training stream so that a resumed run sees the same dropout.
        with torch.random.fork_rng(devices=[]):
            return iter(self.train_loader)

    def _next_batch(self) -> torch.Tensor:
        if self._data_iter is None:
            self._data_iter = self._new_data_iter()
        try:
            batch = next(self._data_iter)
        except StopIteration:
            self._data_iter = self._new_data_iter()
            batch = next(self._data_iter)
        self.micro_batches_seen += 1
        return batch

    # ---- loss and steps ------------------------------------------------------------------------
    def _autocast(self):
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    def compute_loss(self, window: torch.Tensor, out: Any = None) -> tuple[torch.Tensor, dict]:
        """Loss of one micro-batch ``window`` [B, seq_len + n_pred_tokens]; returns (loss, parts).

        ``out`` is the model's output on ``window[:, :seq_len]`` when the caller already ran it.
        """
        if out is None:
            out = self.model(window[:, : self.args.seq_len])
        total, lm, extra = multi_token_prediction_loss(
            out.logits, out.mtp_logits, window, mtp_weight=self.args.mtp_loss_weight
        )
        aux = getattr(out, "aux_loss", None)
        if aux is not None:
            total = total + aux
        parts = {"lm_loss": lm.detach(), "aux_loss": aux.detach() if aux is not None else torch.zeros(())}
        for k, e in enumerate(extra, start=1):
            parts[f"mtp_loss_{k}"] = e.detach()
        return total, parts

    def _train_step(self) -> dict:
        self.model.train()
        accum = self.args.gradient_accumulation_steps
        sums: dict[str, float] = {}
        tokens = 0
        for micro in range(accum):
            window = self._next_batch().to(self.device, non_blocking=True)
            with self._autocast():
                out = self.model(window[:, : self.args.seq_len])
                loss, parts = self.compute_loss(window, out)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"loss is {loss.item()} at step {self.step + 1}")
            if micro == 0 and getattr(self.optimizer, "hessian_due", False):
                # Sophia's Gauss-Newton-Bartlett estimate reuses this forward's logits (graph still alive)
                self.optimizer.update_hessian(logits=out.logits)
            scaled = loss / accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            sums["loss"] = sums.get("loss", 0.0) + loss.item() / accum
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.item() / accum
            tokens += window.shape[0] * self.args.seq_len
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item() if params else 0.0
        if not math.isfinite(grad_norm) and self.scaler is None:
            raise NonFiniteLossError(f"gradient norm is {grad_norm} at step {self.step + 1}")
        skipped = False
        if self.scaler:
            scale_before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale_before  # the scaler skips steps whose grads overflowed
            sums["skipped"] = float(skipped)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None and not skipped:
            self.lr_scheduler.step()
        self.step += 1
        self.tokens_seen += tokens
        sums["grad_norm"] = grad_norm
        sums["lr"] = self.optimizer.param_groups[0]["lr"]
        sums["tokens"] = tokens
        return sums

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean next-token loss and perplexity over up to ``eval_steps`` validation batches."""
        if self.val_loader is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        swap = getattr(self.optimizer, "eval", None)  # schedule-free optimizers evaluate at their x iterate
        if callable(swap):
            swap()
        total, count = 0.0, 0
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            # Evaluating must not move the training RNG streams (the val loader draws a seed), or resuming would diverge.
            with torch.random.fork_rng(devices=devices):
                for i, window in enumerate(self.val_loader):
                    if i >= self.args.eval_steps:
                        break
                    window = window.to(self.device)
                    with self._autocast():
                        _, parts = self.compute_loss(window)
                    total += parts["lm_loss"].item() * window.shape[0]
                    count += window.shape[0]
        finally:
            if callable(swap):
                self.optimizer.train()
            self.model.train(was_training)
        if count == 0:
            raise ValueError("the validation loader yielded no batches")
        loss = total / count
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        config = self.config
        if dataclasses.is_dataclass(config):
            config = dataclasses.asdict(config)
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "model": self.model.state_dict(),
            "model_signature": ckpt.model_signature(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": ckpt.rng_state(),
            "data": self._data_state(),
            "best_metric": self.best_metric,
            "evals_without_improvement": self.evals_without_improvement,
            "args": dataclasses.asdict(self.args),
            "config": config,
        }

    def save_checkpoint(self) -> Path:
        path = self.checkpoint_dir / f"checkpoint_step_{self.step}.pt"
        ckpt.save_checkpoint(self.state_dict(), path)
        ckpt.prune_checkpoints(self.checkpoint_dir, self.args.keep_last, current_step=self.step)
        self.last_checkpoint = path
        for cb in self.callbacks:
            cb.on_save(self, path)
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore everything ``save_checkpoint`` wrote; the model must have the same parameters."""
        # On CPU first: RNG states must stay CPU tensors; load_state_dict moves the rest to the params' devices.
        state = ckpt.load_checkpoint(path, map_location="cpu")
        try:
            ckpt.check_signature(state["model_signature"], self.model, path)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.lr_scheduler is not None and state["scheduler"] is not None:
                self.lr_scheduler.load_state_dict(state["scheduler"])
            if self.scaler and state["scaler"]:
                self.scaler.load_state_dict(state["scaler"])
            self.step = state["step"]
            self.tokens_seen = state["tokens_seen"]
            self.micro_batches_seen = state["data"]["micro_batches"]
            self.best_metric = state["best_metric"]
            self.evals_without_improvement = state["evals_without_improvement"]
            ckpt.set_rng_state(state["rng"])
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit this run: {exc!r}") from exc
        self._restore_data(state["data"])

    # ---- logging -------------------------------------------------------------------------------
    def _estimate_flops_per_token(self) -> float | None:
        count = getattr(self.model, "num_parameters", None)
        if count is None:
            return None
        # 6 N per token for forward + backward over the active parameters (Kaplan et al. 2020)
        return 6.0 * count(active=True)

    def _open_loggers(self) -> None:
        self._wandb = None
        if self.args.use_wandb:  # first, so a missing extra fails before any file is opened
            try:
                import wandb
            except ImportError as exc:
                raise RuntimeError(
                    "use_wandb=True needs Weights & Biases: pip install 'nexus-train[track]'"
                ) from exc
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.output_dir / "metrics.jsonl", "a")
        self._tb = None
        if self.args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.output_dir / "tensorboard"))
        if self.args.use_wandb:
            self._wandb = wandb.init(
                project=self.args.wandb_project, mode=self.args.wandb_mode, dir=str(self.output_dir),
                config=dataclasses.asdict(self.args), resume="allow",
            )

    def _close_loggers(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

    def log(self, metrics: dict) -> None:
        record = {"step": self.step, "tokens": self.tokens_seen, **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, self.step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=self.step)

    # ---- the loop ------------------------------------------------------------------------------
    def _improved(self, metrics: dict) -> bool:
        value = metrics[self.args.metric_for_best]
        if self.best_metric is None or value < self.best_metric:
            self.best_metric = value
            self.evals_without_improvement = 0
            return True
        self.evals_without_improvement += 1
        return False

    def train(self, max_steps: int | None = None, resume_from: str | Path | None = None) -> TrainResult:
        """Run until ``max_steps`` (argument, ``args.max_steps`` or ``args.total_tokens``), early stopping or NaN."""
        from nexus.training.progress import TrainingProgress

        if resume_from is not None:
            self.load_checkpoint(resume_from)
        max_steps = max_steps or self.args.resolve_max_steps()
        if max_steps is None:
            raise ValueError("give max_steps (to train() or TrainingArguments) or total_tokens")
        self._open_loggers()
        for cb in self.callbacks:
            cb.on_train_begin(self)
        stop_reason = "max_steps"
        metrics: dict = {}
        progress = TrainingProgress(total=max_steps, start=self.step, enabled=self.args.progress_bar)
        window_time, window_tokens = 0.0, 0  # tokens/s over training steps only, not eval or checkpoints
        try:
            with progress:
                if self.step == 0 and self.val_loader is not None:  # the baseline the run improves on
                    start = self.evaluate()
                    self.log(start)
                    progress.print_metrics(0, max_steps, start)
                while self.step < max_steps and not self.should_stop:
                    good_micro_batches, good_rng = self.micro_batches_seen, ckpt.rng_state()
                    step_start = time.perf_counter()
                    try:
                        metrics = self._train_step()
                    except NonFiniteLossError as exc:
                        # the checkpoint must be exactly the state after the last good step
                        self.optimizer.zero_grad(set_to_none=True)
                        self.micro_batches_seen = good_micro_batches
                        ckpt.set_rng_state(good_rng)
                        path = self.save_checkpoint()
                        progress.print(f"[red]stopping: {exc}; the last good state is saved in {path}[/red]")
                        self.log({"nonfinite_at_step": self.step + 1})
                        stop_reason = "nonfinite_loss"
                        break
                    window_time += time.perf_counter() - step_start
                    window_tokens += metrics.pop("tokens")
                    metrics["tokens_per_s"] = window_tokens / max(window_time, 1e-9)
                    if self._flops_per_token and self.args.peak_flops:
                        metrics["mfu"] = metrics["tokens_per_s"] * self._flops_per_token / self.args.peak_flops
                    progress.update(self.step, loss=metrics["loss"], tokens_per_s=metrics["tokens_per_s"])
                    if self.step % self.args.log_interval == 0 or self.step == max_steps:
                        self.log(metrics)
                        progress.print_metrics(self.step, max_steps, metrics)
                        for cb in self.callbacks:
                            cb.on_log(self, metrics)
                        window_time, window_tokens = 0.0, 0
                    improved = False
                    if self.val_loader is not None and (
                        self.step % self.args.eval_interval == 0 or self.step == max_steps
                    ):
                        evaluation = self.evaluate()
                        metrics.update(evaluation)
                        self.log(evaluation)
                        progress.print_metrics(self.step, max_steps, evaluation)
                        improved = self._improved(evaluation)
                        for cb in self.callbacks:
                            cb.on_evaluate(self, evaluation)
                        patience = self.args.early_stopping_patience
                        if patience is not None and self.evals_without_improvement >= patience:
                            stop_reason = "early_stopping"
                            self.should_stop = True
                    path = None
                    if self.step % self.args.save_interval == 0 or self.step == max_steps or self.should_stop:
                        path = self.save_checkpoint()
                    if improved and self.args.save_best:
                        best = self.checkpoint_dir / "checkpoint_best.pt"
                        if path is not None:
                            ckpt.copy_checkpoint(path, best)
                        else:
                            ckpt.save_checkpoint(self.state_dict(), best)
                if self.should_stop and stop_reason == "max_steps":
                    stop_reason = "callback"
        finally:
            for cb in self.callbacks:
                cb.on_train_end(self)
            self._close_loggers()
        return TrainResult(
            step=self.step,
            tokens_seen=self.tokens_seen,
            stop_reason=stop_reason,
            last_checkpoint=self.last_checkpoint,
            best_metric=self.best_metric,
            metrics=metrics,
        )
