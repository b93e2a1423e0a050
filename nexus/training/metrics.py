"""Task and system metrics for the Trainer.

Task metrics take an :class:`EvalPrediction` (what ``Trainer.evaluate`` collects over the validation
batches) and return a dict of floats; pass one as ``Trainer(..., compute_metrics=accuracy)``. They are
computed by well-kept libraries, not by hand: accuracy and F1 by ``torchmetrics``, BLEU by
``sacrebleu`` (pip extra ``nexus-train[metrics]``). The Trainer logs them as ``val_<name>``.

Example::
    trainer = Trainer(model, train_ds, val_ds, optimizer, args, loss_fn=torch.nn.functional.cross_entropy,
                      compute_metrics=combine(accuracy, functools.partial(f1, average="macro")))
    trainer.evaluate()   # {"val_loss": ..., "val_accuracy": ..., "val_f1": ...}

System metrics (:func:`system_metrics`): CPU and RAM through ``psutil``, and on a GPU the memory
torch's allocator holds and, where NVML is present, the utilisation.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch

__all__ = ["EvalPrediction", "accuracy", "bleu", "combine", "f1", "system_metrics"]

IGNORE_INDEX = -100  # labels equal to this are left out (the cross-entropy convention)


@dataclasses.dataclass
class EvalPrediction:
    """The model's predictions over the evaluated batches and the matching labels.

    predictions: [N, C] logits / scores or [N] class ids (classification), [N, T, V] logits or [N, T] token
    ids (sequences), or a list of strings; label_ids: [N] or [N, T] ids, or a list of strings.
    """

    predictions: Any
    label_ids: Any


def _import(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{module} is needed for this metric: pip install 'nexus-train[metrics]'") from exc


def _classes(eval_pred: EvalPrediction) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(predicted class ids [N], labels [N], number of classes), without ignored labels."""
    preds, labels = torch.as_tensor(eval_pred.predictions), torch.as_tensor(eval_pred.label_ids)
    if preds.dim() == labels.dim() + 1:  # logits / scores over the classes
        n_classes = preds.shape[-1]
        preds = preds.argmax(-1)
    elif preds.shape == labels.shape:
        n_classes = int(max(preds.max(), labels.max()).item()) + 1 if labels.numel() else 1
    else:
        raise ValueError(f"predictions of shape {tuple(preds.shape)} do not match labels of shape {tuple(labels.shape)}:"
                         " give class ids of the labels' shape or scores with one more (class) dimension")
    keep = labels != IGNORE_INDEX
    return preds[keep].long(), labels[keep].long(), max(n_classes, 2)


def accuracy(eval_pred: EvalPrediction) -> dict[str, float]:
    """Fraction of predictions equal to the label (``torchmetrics`` multiclass accuracy, micro average).

    Example: ``accuracy(EvalPrediction(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0])))``
             ``== {"accuracy": 0.5}``
    """
    from_tm = _import("torchmetrics.functional.classification")
    preds, labels, n = _classes(eval_pred)
    return {"accuracy": float(from_tm.multiclass_accuracy(preds, labels, num_classes=n, average="micro"))}


def f1(eval_pred: EvalPrediction, average: str = "macro") -> dict[str, float]:
    """F1 score over the classes (``torchmetrics`` multiclass F1; ``average`` macro | micro | weighted).

    Example: ``f1(EvalPrediction(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0])))["f1"]``
    """
    from_tm = _import("torchmetrics.functional.classification")
    preds, labels, n = _classes(eval_pred)
    return {"f1": float(from_tm.multiclass_f1_score(preds, labels, num_classes=n, average=average))}


def _texts(values: Any, decode: Callable[[list[int]], str] | None) -> list[str]:
    if isinstance(values, (list, tuple)) and all(isinstance(v, str) for v in values):
        return list(values)
    ids = torch.as_tensor(values)
    if ids.dim() == 3:  # logits [N, T, V]
        ids = ids.argmax(-1)
    if decode is None:
        raise ValueError("bleu needs strings, or token ids with decode= (e.g. tokenizer.decode)")
    return [decode([int(t) for t in row if t != IGNORE_INDEX]) for row in ids]


def bleu(eval_pred: EvalPrediction, decode: Callable[[list[int]], str] | None = None) -> dict[str, float]:
    """Corpus BLEU (0-100) of the predictions against one reference each (``sacrebleu.corpus_bleu``).

    Strings are scored as they are; token ids (or logits, argmax taken) are turned into text by ``decode``.
    Example: ``compute_metrics=functools.partial(bleu, decode=tokenizer.decode)``
    """
    sacrebleu = _import("sacrebleu")
    hyps, refs = _texts(eval_pred.predictions, decode), _texts(eval_pred.label_ids, decode)
    if len(hyps) != len(refs):
        raise ValueError(f"bleu: {len(hyps)} predictions but {len(refs)} references")
    return {"bleu": float(sacrebleu.corpus_bleu(hyps, [refs]).score)}


def combine(*metrics: Callable[[EvalPrediction], dict]) -> Callable[[EvalPrediction], dict]:
    """One ``compute_metrics`` returning the union of ``metrics``' dicts. Example: ``combine(accuracy, f1)``."""
    def compute(eval_pred: EvalPrediction) -> dict:
        out: dict = {}
        for metric in metrics:
            out.update(metric(eval_pred))
        return out

    return compute


def system_metrics(device: torch.device | None = None) -> dict[str, float]:
    """CPU and RAM use of the machine and this process (psutil); on a CUDA ``device`` the memory torch's
    allocator holds and its peak, and the utilisation where NVML (pynvml) is installed. Keys start ``sys/``."""
    psutil = _import("psutil")
    mem = psutil.virtual_memory()
    out = {"sys/cpu_percent": float(psutil.cpu_percent(interval=None)), "sys/ram_percent": float(mem.percent),
           "sys/ram_used_gb": (mem.total - mem.available) / 2**30,
           "sys/process_rss_gb": psutil.Process().memory_info().rss / 2**30}
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        out["sys/gpu_memory_allocated_gb"] = torch.cuda.memory_allocated(device) / 2**30
        out["sys/gpu_memory_reserved_gb"] = torch.cuda.memory_reserved(device) / 2**30
        out["sys/gpu_max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        try:
            out["sys/gpu_utilization_percent"] = float(torch.cuda.utilization(device))
        except Exception:  # torch reads it through NVML (pynvml), which is optional
            pass
    return out


def gather_predictions(predictions: Sequence, labels: Sequence, group=None) -> EvalPrediction:
    """The per-batch predictions and labels of every data-parallel rank, concatenated in rank order."""
    import torch.distributed as dist

    preds = torch.cat(predictions) if predictions else torch.empty(0)
    labs = torch.cat(labels) if labels else torch.empty(0)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        everyone: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, (preds, labs), group=group)
        preds = torch.cat([p for p, _ in everyone])
        labs = torch.cat([l for _, l in everyone])
    return EvalPrediction(preds, labs)
