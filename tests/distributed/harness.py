"""The one multi-process harness for tests: N Gloo ranks on 127.0.0.1, results back by rank.

Every test that needs a process group goes through :func:`run_distributed` (or
:func:`run_distributed_checks` to run several checks in one spawn); this file is the only place
under ``tests/`` that calls ``init_process_group``.

What it guarantees:

- Loopback only. The parent binds a listening socket to ``127.0.0.1`` port 0 and hands it to the
  rendezvous ``TCPStore`` it hosts (as torchrun's agent does), so there is no pick-a-free-port-then-
  bind race and the store never listens on other interfaces; ``GLOO_SOCKET_IFNAME`` pins Gloo's
  own sockets to the loopback interface.
- Clean teardown. Each rank runs ``dist.barrier()`` before ``dist.destroy_process_group()``, so no
  rank tears Gloo down while a peer is still talking (that race aborted peers with SIGABRT).
- No hangs. One wall-clock ``timeout`` covers the whole run; at the deadline the parent dumps the
  Python stack of every rank still running (``faulthandler`` on SIGUSR1) and kills it.
- Whole reports. On failure one :class:`DistributedRunError` lists every rank: its traceback, the
  signal that killed it, or the stack it was stuck in, plus the tail of its stderr.
- Launcher environment. Each rank sees ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``LOCAL_WORLD_SIZE``, ``GROUP_RANK`` (node index), ``MASTER_ADDR``/``MASTER_PORT`` and
  ``TORCHELASTIC_USE_AGENT_STORE=True``, as under ``torchrun --nnodes W/L --nproc-per-node L``, and
  runs one intra-op thread (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``) so that a few ranks
  share a 2-core machine without oversubscription.

Example::

    def _sum_of_ranks(rank, world_size, scale):
        t = torch.tensor([float(rank)])
        dist.all_reduce(t)
        return t.item() * scale

    assert run_distributed(_sum_of_ranks, world_size=2, args=(10,)) == [10.0, 10.0]

``fn`` and ``args`` are pickled into freshly spawned interpreters, so ``fn`` must be a module-level
function; results travel back with :mod:`pickle` through files (tensors are fine). A rank leaves
with ``os._exit`` once its result is written (interpreter shutdown with torch loaded costs seconds),
so ``atexit`` handlers registered by ``fn`` do not run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import faulthandler
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import wait as wait_for_sentinels
from typing import Any, Callable, Iterator, Sequence

__all__ = ["DistributedRunError", "RankOutcome", "loopback_interface", "loopback_store", "run_distributed",
           "run_distributed_checks"]

# How long the surviving ranks may take to fail by themselves once one rank has failed, before
# they are killed; peers of a dead rank normally error out within a second.
PEER_FAILURE_GRACE_S = 10.0
# Time for a rank to write its stack after SIGUSR1 before it is killed.
STACK_DUMP_WAIT_S = 1.0
STDERR_TAIL_LINES = 30


@dataclasses.dataclass
class RankOutcome:
    """What happened to one rank.

    status: ``ok`` | ``raised`` | ``signal`` (killed by a signal it did not get from us) |
    ``exit`` (nonzero exit code without a Python error) | ``no_result`` (exit 0, nothing reported) |
    ``timeout`` (still running at the deadline, killed) | ``killed`` (still running after a peer
    failed, killed).
    """

    rank: int
    status: str
    exitcode: int | None
    result: Any = None
    detail: str = ""
    stderr_tail: str = ""
    failed_at: float = 0.0  # wall time of the failure (its report, or when its exit was seen)

    def describe(self) -> str:
        head = f"rank {self.rank}: {self.status} (exit code {self.exitcode})"
        if self.status == "signal" and self.exitcode is not None and self.exitcode < 0:
            head += f": killed by {signal.Signals(-self.exitcode).name}"
        parts = [head]
        if self.detail:
            parts.append(_indent(self.detail.rstrip()))
        if self.stderr_tail and self.status != "ok":
            parts.append(_indent("stderr (last lines):\n" + self.stderr_tail.rstrip()))
        return "\n".join(parts)


class DistributedRunError(AssertionError):
    """A multi-process run failed; ``outcomes`` holds every rank's :class:`RankOutcome`."""

    def __init__(self, summary: str, outcomes: list[RankOutcome]) -> None:
        self.outcomes = outcomes
        super().__init__(summary + "\n" + "\n".join(o.describe() for o in outcomes))


def run_distributed(fn: Callable[..., Any], world_size: int = 2, args: Sequence[Any] = (), *,
                    timeout: float = 120.0, local_world_size: int | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` Gloo processes; return results by rank.

    Args:
        fn: a module-level function; its return value must be picklable.
        world_size: number of ranks (processes), >= 1.
        args: extra positional arguments for ``fn`` (picklable).
        timeout: wall-clock seconds for the whole run, start-up included; past it every rank
            still running is killed and the run fails.
        local_world_size: ranks per simulated node (sets ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
            ``GROUP_RANK``); must divide ``world_size``. Default: all ranks on one node.

    Returns:
        ``[result of rank 0, result of rank 1, ...]``.

    Raises:
        DistributedRunError: any rank raised, died, or the run passed ``timeout``; the message
            holds every rank's outcome.
    """
    if not callable(fn):
        raise TypeError(f"run_distributed: fn must be callable, got {type(fn).__name__}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"run_distributed: world_size must be an int >= 1, got {world_size!r}")
    local_world_size = world_size if local_world_size is None else local_world_size
    if (isinstance(local_world_size, bool) or not isinstance(local_world_size, int)
            or local_world_size < 1 or world_size % local_world_size):
        raise ValueError(f"run_distributed: local_world_size={local_world_size!r} must be an int >= 1 "
                         f"that divides world_size={world_size}")
    if not timeout > 0:
        raise ValueError(f"run_distributed: timeout must be > 0 seconds, got {timeout!r}")

    import torch.distributed as dist
    import torch.multiprocessing as mp

    # Unpickled inside the rank, so that a failing import of fn's module shows as its traceback.
    work = pickle.dumps((fn, tuple(args)))
    deadline = time.monotonic() + timeout
    store, port = loopback_store(timeout)
    ctx = mp.get_context("spawn")
    workdir = tempfile.mkdtemp(prefix="nexus_dist_")
    procs = []
    try:
        for rank in range(world_size):
            env = _rank_environment(rank, world_size, local_world_size, port)
            proc = ctx.Process(target=_rank_main, name=f"nexus-dist-rank{rank}",
                               args=(rank, world_size, work, workdir, timeout, os.getpid()))
            with _environment(env):  # a spawned child starts from the parent's environment
                proc.start()
            procs.append(proc)
        outcomes, summary = _wait(procs, workdir, deadline, timeout)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
        _relay_output(workdir, world_size)
        del store
        shutil.rmtree(workdir, ignore_errors=True)
    if summary is not None:
        raise DistributedRunError(summary, outcomes)
    return [o.result for o in outcomes]


def run_distributed_checks(checks: Sequence[Callable[[int, int], Any]], world_size: int = 2, *,
                           timeout: float = 120.0, local_world_size: int | None = None) -> dict[str, list]:
    """Run several checks in one spawn (one process group), in order, with a barrier after each.

    Spawning costs seconds per run, so a test module can run all its checks once, e.g. from a
    ``scope="module"`` fixture, and assert on the pieces.

    Args:
        checks: module-level functions ``check(rank, world_size) -> picklable``, distinct names.

    Returns:
        ``{check.__name__: [result of rank 0, result of rank 1, ...]}``.

    Raises:
        DistributedRunError: as :func:`run_distributed`; a failing rank's traceback names the check.
    """
    names = [getattr(c, "__name__", repr(c)) for c in checks]
    if not checks:
        raise ValueError("run_distributed_checks: no checks given")
    if len(set(names)) != len(names):
        raise ValueError(f"run_distributed_checks: check names must be distinct, got {names}")
    per_rank = run_distributed(_run_checks, world_size, (tuple(checks),), timeout=timeout,
                               local_world_size=local_world_size)
    return {name: [results[name] for results in per_rank] for name in names}


class CheckFailed(RuntimeError):
    """Raised in a rank by :func:`run_distributed_checks` to name the check that failed."""


def _run_checks(rank: int, world_size: int, checks: tuple) -> dict[str, Any]:
    import torch.distributed as dist

    results = {}
    for check in checks:
        try:
            results[check.__name__] = check(rank, world_size)
        except Exception as exc:
            raise CheckFailed(f"check {check.__name__} failed on rank {rank}") from exc
        dist.barrier()  # keep ranks in step, so a failure is blamed on the check that caused it
    return results


# ----------------------------------------------------------------------------------------------
# Parent side


def loopback_store(timeout: float):
    """A rendezvous TCPStore served by this process on 127.0.0.1, and its port."""
    import torch.distributed as dist

    # The store owns this socket from the moment the OS picks the port: no free-port race, and
    # it listens on loopback only (given a port alone, TCPStore listens on every interface).
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        port = listener.getsockname()[1]
        store = dist.TCPStore("127.0.0.1", port, None, True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout), master_listen_fd=listener.fileno())
    except BaseException:
        listener.close()
        raise
    listener.detach()  # the store closes it
    return store, port


def loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()]
    for name in ("lo", "lo0"):
        if name in names:
            return name
    raise RuntimeError(f"run_distributed: no loopback interface (lo, lo0) among {names}")


def _rank_environment(rank: int, world_size: int, local_world_size: int, port: int) -> dict[str, str]:
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        # Every rank is a client of the store the parent hosts, as under torchrun.
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank % local_world_size),
        "LOCAL_WORLD_SIZE": str(local_world_size),
        "GROUP_RANK": str(rank // local_world_size),
        "GLOO_SOCKET_IFNAME": loopback_interface(),
        "TP_SOCKET_IFNAME": loopback_interface(),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _wait(procs: list, workdir: str, deadline: float, timeout: float) -> tuple[list[RankOutcome], str | None]:
    """Wait for every rank; kill the rest at the deadline or a grace period after a failure."""
    first_failure = None  # monotonic time the first failed rank was noticed
    seen_failing: dict[int, float] = {}  # rank -> wall time its failed exit was noticed
    summary = None
    while True:
        for r, p in enumerate(procs):
            if p.exitcode is not None and r not in seen_failing and not _succeeded(r, p, workdir):
                seen_failing[r] = time.time()
        alive = [p for p in procs if p.exitcode is None]
        if not alive:
            break
        now = time.monotonic()
        if now >= deadline:
            summary = f"run_distributed: timed out after {timeout:g} s"
            break
        if first_failure is None and seen_failing:
            first_failure = now
        limit = deadline if first_failure is None else min(deadline, first_failure + PEER_FAILURE_GRACE_S)
        if now >= limit:
            break
        wait_for_sentinels([p.sentinel for p in alive], timeout=min(limit - now, 1.0))
    stuck = {r for r, p in enumerate(procs) if p.exitcode is None}
    for r in stuck:
        with contextlib.suppress(ProcessLookupError):
            os.kill(procs[r].pid, signal.SIGUSR1)  # faulthandler writes the rank's stack
    if stuck:
        time.sleep(STACK_DUMP_WAIT_S)
    for r in stuck:
        procs[r].kill()
        procs[r].join()
    outcomes = []
    for rank, proc in enumerate(procs):
        outcome = _outcome(rank, proc, workdir, seen_failing.get(rank, time.time()))
        if rank in stuck:
            outcome.status = "timeout" if summary is not None else "killed"
            outcome.detail = ((f"still running after {timeout:g} s; killed" if summary is not None
                               else "still running after another rank failed; killed")
                              + "\nits stack when killed:\n" + _read(workdir, rank, "stack"))
        outcomes.append(outcome)
    failing = sorted((o for o in outcomes if o.status not in ("ok", "killed", "timeout")), key=lambda o: o.failed_at)
    if summary is None and failing:
        # The first to fail is usually the cause; its peers then fail on the broken connection.
        summary = (f"run_distributed: rank(s) {', '.join(str(o.rank) for o in sorted(failing, key=lambda o: o.rank))}"
                   f" failed, rank {failing[0].rank} first")
    return outcomes, summary


def _succeeded(rank: int, proc, workdir: str) -> bool:
    return proc.exitcode == 0 and os.path.exists(_path(workdir, rank, "result"))


def _outcome(rank: int, proc, workdir: str, seen_at: float) -> RankOutcome:
    code = proc.exitcode
    tail = "\n".join(_read(workdir, rank, "stderr").splitlines()[-STDERR_TAIL_LINES:])
    reported = None
    if os.path.exists(_path(workdir, rank, "result")):
        with open(_path(workdir, rank, "result"), "rb") as f:
            reported = pickle.load(f)
    if reported is not None and reported[0] == "raised":
        return RankOutcome(rank, "raised", code, detail=reported[1], stderr_tail=tail, failed_at=reported[2])
    if code is not None and code < 0:
        fault = _read(workdir, rank, "fault")
        return RankOutcome(rank, "signal", code, stderr_tail=tail, failed_at=seen_at,
                           detail=f"Python stack at the fatal signal:\n{fault}" if fault.strip() else "")
    if code != 0:
        return RankOutcome(rank, "exit", code, stderr_tail=tail, failed_at=seen_at)
    if reported is None:
        return RankOutcome(rank, "no_result", code, stderr_tail=tail, failed_at=seen_at,
                           detail="exited with code 0 without reporting a result")
    return RankOutcome(rank, "ok", code, result=reported[1], stderr_tail=tail)


def _relay_output(workdir: str, world_size: int) -> None:
    # Ranks write to files (for the report); pass them on so pytest shows them with the test.
    for rank in range(world_size):
        for stream, target in (("stdout", sys.stdout), ("stderr", sys.stderr)):
            text = _read(workdir, rank, stream)
            if text:
                target.write("".join(f"[rank {rank}] {line}\n" for line in text.splitlines()))


def _path(workdir: str, rank: int, kind: str) -> str:
    return os.path.join(workdir, f"rank{rank}.{kind}")


def _read(workdir: str, rank: int, kind: str) -> str:
    try:
        with open(_path(workdir, rank, kind), errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


# ----------------------------------------------------------------------------------------------
# Rank side


def _rank_main(rank: int, world_size: int, work: bytes, workdir: str, timeout: float, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    _redirect(1, _path(workdir, rank, "stdout"))
    _redirect(2, _path(workdir, rank, "stderr"))
    fault_file = open(_path(workdir, rank, "fault"), "w")  # noqa: SIM115 (open until exit)
    faulthandler.enable(fault_file, all_threads=True)
    stack_file = open(_path(workdir, rank, "stack"), "w")  # noqa: SIM115
    faulthandler.register(signal.SIGUSR1, stack_file, all_threads=True)

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        fn, args = pickle.loads(work)
        # Collectives may wait longer than the run: the parent's deadline decides, with stacks.
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout + 60))
        result = fn(rank, world_size, *args)
        dist.barrier()  # nobody tears Gloo down while a peer still talks to it
        _report(workdir, rank, ("ok", result))
    except BaseException:
        _report(workdir, rank, ("raised", traceback.format_exc()))
        _flush_and_exit(1)  # no Gloo teardown: peers may be mid-collective with this rank
    dist.destroy_process_group()
    # Interpreter shutdown with torch loaded takes seconds on a busy machine; nothing is left to do.
    _flush_and_exit(0)


def _flush_and_exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _report(workdir: str, rank: int, outcome: tuple) -> None:
    try:
        payload = pickle.dumps((*outcome, time.time()))
    except Exception:
        payload = pickle.dumps(("raised", "the result of fn could not be pickled:\n" + traceback.format_exc(),
                                time.time()))
    tmp = _path(workdir, rank, "result.tmp")
    with open(tmp, "wb") as f:
        f.write(payload)
    os.replace(tmp, _path(workdir, rank, "result"))  # the parent never reads half a file


def _redirect(fd: int, path: str) -> None:
    with open(path, "w") as f:
        os.dup2(f.fileno(), fd)


def _die_with_parent(parent_pid: int) -> None:
    # Linux: a killed test runner must not leave ranks behind, hanging in a collective.
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent_pid:
            os._exit(1)
