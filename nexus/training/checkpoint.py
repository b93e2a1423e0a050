"""Checkpoint files: atomic writes and loads that never execute code.

A save writes a temporary file beside the target, fsyncs it and renames it over the target, so a
crash mid-save leaves the last good checkpoint untouched. A load uses ``torch.load(weights_only=True)``
(tensors and plain containers only) and turns a truncated, corrupt or foreign file into a
``CheckpointError`` that names the file.
"""
from __future__ import annotations

import dataclasses
import enum
import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "nexus-checkpoint-v1"
# a single file (.pt), or a directory of shards written by torch.distributed.checkpoint (.dcp)
_STEP_FILE = re.compile(r"^checkpoint_step_(\d+)\.(pt|dcp)$")
_TMP_FILE = re.compile(r"^\..+\.tmp-(\d+)$")
_TMP_DIR = re.compile(r"^\..+\.dcp\.(saving|replaced)$")
# what torch.load(weights_only=True) reads back: anything else in a state is refused at save time
_LOADABLE_LEAVES = (torch.Tensor, int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and the reason."""


def plain_data(obj: Any) -> Any:
    """``obj`` as weights-only-loadable values: dataclasses as dicts, enums as their values, paths as strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return plain_data(obj.value)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {k: plain_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        return [plain_data(v) for v in obj]
    return obj


def check_loadable(state: Any, where: str = "state") -> None:
    """Raise ``CheckpointError`` naming the first key whose value weights-only loading would refuse."""
    if isinstance(state, dict):
        for key, value in state.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"{where} has a key of type {type(key).__name__} ({key!r}): "
                                      "a checkpoint could not load it")
            check_loadable(value, f"{where}.{key}")
    elif isinstance(state, (list, tuple)) and not isinstance(state, torch.Size):
        for i, value in enumerate(state):
            check_loadable(value, f"{where}[{i}]")
    elif not isinstance(state, _LOADABLE_LEAVES):
        raise CheckpointError(f"{where} holds a {type(state).__module__}.{type(state).__qualname__}, which "
                              "weights-only loading refuses: convert it to plain data before saving")


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
    """Write ``state`` (tensors and plain containers) atomically to ``path``.

    A state that ``load_checkpoint`` could not read back is refused here, naming the key, before any byte is written.
    """
    state = {"format": FORMAT, **state}
    check_loadable(state)
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
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {exc}") from exc
        first_line = str(exc).split("\n")[0]
        reason = next((line.strip() for line in str(exc).splitlines() if "Unsupported" in line), first_line)
        raise CheckpointError(f"checkpoint {path} holds objects that weights-only loading refuses "
                              f"(written by another program or an older Nexus): {reason}") from exc
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


def prune_checkpoints(directory: str | Path, keep_last: int) -> list[Path]:
    """Keep the newest ``keep_last`` step checkpoints; returns the deleted paths."""
    found = step_checkpoints(directory)
    doomed = [p for _, p in found[: max(len(found) - keep_last, 0)]]
    for p in doomed:
        remove(p)
    return doomed


def remove(path: Path) -> None:
    """Delete a checkpoint file or directory of shards."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def saved_step(path: Path) -> int:
    """The step a checkpoint file (or directory of shards) holds, reading as little as possible."""
    if path.is_dir():
        from nexus.training.distributed.checkpointing import EXTRA_FILE

        return torch.load(path / EXTRA_FILE, map_location="cpu", weights_only=True)["step"]
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files that a killed save left in ``directory``; returns them.

    A temporary file is named ``.<target>.tmp-<pid>``; one whose writer is still alive is left alone.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = []
    for p in sorted(directory.iterdir()):
        m = _TMP_FILE.match(p.name)
        if m and p.is_file() and (int(m.group(1)) == os.getpid() or not _pid_alive(int(m.group(1)))):
            p.unlink(missing_ok=True)
            stale.append(p)
        elif _TMP_DIR.match(p.name) and p.is_dir():  # shards of a killed sharded save (called before any save)
            shutil.rmtree(p, ignore_errors=True)
            stale.append(p)
    return stale


def set_aside_later_checkpoints(directory: str | Path, step: int) -> Path | None:
    """Move the step checkpoints after ``step`` (and a best checkpoint from after it) into
    ``abandoned-<time>/`` inside ``directory``: they belong to the trajectory a resumed run branched
    from, so they are kept, but ``--resume DIR`` must not pick them up. Returns that folder, or None.
    """
    directory = Path(directory)
    later = [p for s, p in step_checkpoints(directory) if s > step]
    for best in (directory / "checkpoint_best.pt", directory / "checkpoint_best.dcp"):
        if not best.exists():
            continue
        try:
            best_step = saved_step(best)
        except Exception:  # unreadable: not ours to judge, leave it where it is
            best_step = step
        if best_step > step:
            later.append(best)
    if not later:
        return None
    target = directory / time.strftime("abandoned-%Y%m%d-%H%M%S")
    n = 1
    while target.exists():
        n += 1
        target = directory / time.strftime(f"abandoned-%Y%m%d-%H%M%S-{n}")
    target.mkdir()
    for p in later:
        os.replace(p, target / p.name)
    _fsync_dir(directory)
    return target


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
    # an empty buffer takes its shape on first use (QAT observer ranges) and adopts the saved one on load
    wrong = sorted(k for k in set(want_map) & set(saved_map) if want_map[k] != saved_map[k] and 0 not in want_map[k])
    if not (missing or extra or wrong):
        return
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
