"""Checkpoint files: atomic writes and loads that never execute code.

A save writes a temporary file beside the target, fsyncs it and renames it over the target, so a
crash mid-save leaves the last good checkpoint untouched. A load uses ``torch.load(weights_only=True)``
(tensors and plain containers only) and turns a truncated, corrupt or foreign file into a
``CheckpointError`` that names the file.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "nexus-checkpoint-v1"
_STEP_FILE = re.compile(r"^checkpoint_step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and the reason."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(file_object)`` on a temporary file, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write ``state`` (tensors and plain containers) atomically to ``path``."""
    state = {"format": FORMAT, **state}
    return atomic_write(path, lambda f: torch.save(state, f))


def copy_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Atomically copy a finished checkpoint (used for ``checkpoint_best.pt``)."""
    with open(src, "rb") as source:
        return atomic_write(dst, lambda f: shutil.copyfileobj(source, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by ``save_checkpoint``; never unpickles arbitrary objects."""
    path = Path(path)
    if path.is_dir():
        path = latest_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated, corrupt or unsafe files
        raise CheckpointError(f"checkpoint {path} is truncated, corrupt or not a weights-only file: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a Nexus checkpoint (format {FORMAT!r} expected)")
    return state


def step_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint_step_N.pt`` in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_FILE.match(p.name))]
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path:
    found = step_checkpoints(directory)
    if not found:
        raise CheckpointError(f"no checkpoint_step_N.pt files in {directory}")
    return found[-1][1]


def prune_checkpoints(directory: str | Path, keep_last: int, *, current_step: int | None = None) -> list[Path]:
    """Keep the newest ``keep_last`` step checkpoints; returns the deleted paths.

    With ``current_step``, files of later steps are deleted first: they belong to a run that was
    resumed from an earlier checkpoint, and ``--resume DIR`` must not pick them up.
    """
    found = step_checkpoints(directory)
    stale = [p for step, p in found if current_step is not None and step > current_step]
    live = [p for step, p in found if current_step is None or step <= current_step]
    doomed = stale + live[: max(len(live) - keep_last, 0)]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def model_signature(model: torch.nn.Module) -> list[list]:
    """Parameter and buffer names with shapes: what a checkpoint must match to load into ``model``."""
    return [[name, list(t.shape)] for name, t in model.state_dict().items()]


def check_signature(saved: list, model: torch.nn.Module, path: str | Path) -> None:
    expected = model_signature(model)
    if [list(x) for x in saved] == expected:
        return
    saved_map = {name: list(shape) for name, shape in saved}
    want_map = {name: shape for name, shape in expected}
    missing = sorted(set(want_map) - set(saved_map))
    extra = sorted(set(saved_map) - set(want_map))
    wrong = sorted(k for k in set(want_map) & set(saved_map) if want_map[k] != saved_map[k])
    detail = []
    if missing:
        detail.append(f"missing {missing[:3]}")
    if extra:
        detail.append(f"unexpected {extra[:3]}")
    if wrong:
        k = wrong[0]
        detail.append(f"{k} has shape {saved_map[k]} in the file but {want_map[k]} in the model")
    raise CheckpointError(f"checkpoint {path} is from another model: {'; '.join(detail)}")


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop draws from, as weights-only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
