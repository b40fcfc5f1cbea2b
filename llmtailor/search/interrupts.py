"""Ctrl-C during a sweep ends the running trial, never Optuna's bookkeeping between two trials.

A Ctrl-C (or a SIGTERM, which a sweep takes as one) inside the objective raises at once:
Optuna records that trial as failed ("interrupted") and the same command redoes it. One
that lands in Optuna's own code (asking for the next trial, telling the last one) would
leave a trial RUNNING that nothing fails until its heartbeat goes stale, or break the
tell half-way; so there it is held, the sweep stops at the next trial boundary (the
callback after a tell, or the start of the next objective, whichever comes first), and
the interrupt is raised then. A second Ctrl-C while one is held raises at once: a user
who presses it twice wants out now (the trial left RUNNING is failed by heartbeat).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and a stop request (systemd, Kubernetes, kill), taken as one


@contextlib.contextmanager
def handling(handler: Any) -> Iterator[dict[int, Any]]:
    """``handler`` takes SIGINT and SIGTERM for the block, then the handlers before it come back; yields those. Only
    the main thread receives signals and may set a handler (elsewhere this does nothing); a signal the process was
    started ignoring (SIGINT in the background of a shell script, under nohup) stays ignored."""
    previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    if threading.current_thread() is not threading.main_thread():
        yield previous
        return
    for number, before in previous.items():
        if before != signal.SIG_IGN:
            signal.signal(number, handler)
    try:
        yield previous
    finally:
        for number, before in previous.items():
            signal.signal(number, before)


class TrialBoundary:
    """Where a sweep's interrupts land: at once inside a trial, held between trials."""

    def __init__(self) -> None:
        self.held = False  # an interrupt arrived between trials and waits for the boundary
        self.inside = False  # the objective is running

    def _on_interrupt(self, signum: int, frame: Any) -> None:
        if self.inside or self.held:
            raise KeyboardInterrupt
        self.held = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[TrialBoundary]:
        """This boundary as the process's handler of Ctrl-C and stop requests for the block (see ``handling``)."""
        with handling(self._on_interrupt):
            yield self

    @contextlib.contextmanager
    def trial(self) -> Iterator[None]:
        """The objective's body: an interrupt held since the last trial ends this one before it starts."""
        self.raise_if_held()
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def raise_if_held(self) -> None:
        if self.held:
            raise KeyboardInterrupt
