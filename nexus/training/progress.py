"""Console progress for the training loop: a rich progress bar plus one line per log interval."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainingProgress:
    """A progress bar with loss, tokens/s and ETA; ``enabled=False`` prints only the metric lines."""

    def __init__(self, *, total: int, start: int = 0, enabled: bool = True, silent: bool = False):
        # soft_wrap: piped output (CI logs, `| tee`) keeps each metric line whole instead of wrapping at 80 columns
        self.console = Console(soft_wrap=True, highlight=False)
        self.enabled = enabled
        self.silent = silent  # ranks other than 0 print nothing
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("lm_loss {task.fields[loss]:.4f}"),  # next-token loss, the quantity val_loss measures
            TextColumn("{task.fields[tps]:,.0f} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
        )
        self._task = self._progress.add_task("train", total=total, completed=start, loss=float("nan"), tps=0.0)

    def __enter__(self):
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)

    def update(self, step: int, *, loss: float, tokens_per_s: float) -> None:
        self._progress.update(self._task, completed=step, loss=loss, tps=tokens_per_s)

    def print(self, message: str, *, markup: bool = True) -> None:
        if not self.silent:
            self._progress.console.print(message, markup=markup)

    def print_metrics(self, step: int, total: int, metrics: dict) -> None:
        """One line; ``lm_loss`` (next token, comparable with ``val_loss``) first, the training objective
        (all heads plus auxiliary losses) as ``objective``."""
        shown = {"lm_loss": metrics["lm_loss"]} if "lm_loss" in metrics else {}
        for k, v in metrics.items():
            if not k.startswith("mtp_loss_") and k != "lm_loss":
                shown["objective" if k == "loss" else k] = v
        body = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
        self.print(f"step {step}/{total} | {body}", markup=False)
