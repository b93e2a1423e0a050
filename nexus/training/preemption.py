"""Stopping on SIGTERM / Ctrl-C without losing work.

Cluster schedulers preempt with SIGTERM, people with Ctrl-C. Inside :class:`StopSignals` the first
SIGTERM or SIGINT only records a request: the training loop finishes its optimizer step, saves a
checkpoint and returns. A second SIGINT raises ``KeyboardInterrupt`` at once, except inside
``critical()`` (an atomic checkpoint write), where it waits until the block ends, so no file is torn.

Example::
    with StopSignals() as stops:
        while not stops.requested:
            train_one_step()
            with stops.critical():
                save()
"""
from __future__ import annotations

import contextlib
import signal
import threading

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager that turns SIGTERM and the first SIGINT into ``requested`` (the signal number)."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._critical = 0
        self._interrupt_pending = False
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str | None:
        return signal.Signals(self.requested).name if self.requested is not None else None

    @property
    def exit_code(self) -> int | None:
        """128 + the signal number, as a shell reports a process killed by that signal."""
        return 128 + self.requested if self.requested is not None else None

    def _handle(self, signum: int, frame) -> None:
        if self.requested is None:
            self.requested = signum
            return
        if signum == signal.SIGINT:  # a second Ctrl-C: the user wants out now
            if self._critical:
                self._interrupt_pending = True
                return
            raise KeyboardInterrupt

    def __enter__(self) -> StopSignals:
        # Python delivers signals to the main thread only; elsewhere (a notebook worker thread) do nothing.
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def critical(self):
        """A block that a second Ctrl-C does not interrupt; the interrupt is raised when it ends."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if not self._critical and self._interrupt_pending:
            self._interrupt_pending = False
            raise KeyboardInterrupt
