"""What SIGTERM, SIGUSR1 (what Slurm sends before it ends a job) and SIGINT (Ctrl-C) do to a command that writes
into a run: it stops cleanly and exits with 128 + the signal's number (SIGTERM 143, SIGUSR1 138, SIGINT 130).

    with stop_on_signals():          # graft run, prepare, train, ...: the whole command
        ...                          # a signal here raises Stopped at once
        with graceful():             # training
            ...                      # the first signal is only noted (`requested()`): the trainer finishes its
                                     # step, writes a checkpoint and raises Stopped; a second one raises at once

Outside `graceful`, unwinding is enough: every output is written under a temporary name and renamed when complete
(graftlm.runs.atomic_dir), so the exception removes what was half-written and keeps what was complete, and the same
command continues from there. A process the command forked (a datatrove worker) does not keep these handlers: it
takes the signal's default action.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Stopped(BaseException):
    """The command was stopped by a signal; what it completed is kept. Exit code 128 + the signal's number.

    Like KeyboardInterrupt it is not an `Exception`: code that turns errors into bad records (`except Exception`
    while reading a file) must not take it for one and carry on."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class _State:
    depth = 0
    """Nesting of `stop_on_signals` (compare runs the stages of several runs)."""
    graceful = 0
    requested = 0
    """The first signal that arrived inside `graceful`, 0 before."""
    pending = 0
    """A signal noted inside `graceful` that nothing acted on."""
    pid = 0
    previous: dict = {}


def _handle(signum: int, frame) -> None:
    if os.getpid() != _State.pid:  # a forked process that inherited the handler: what the signal does by default
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    name = signal_name(signum)
    if _State.graceful and not _State.requested:
        _State.requested = signum
        return
    if _State.graceful:
        raise Stopped(signum, f"stopped at once by a second signal ({name}); the same command resumes training from "
                              f"its last checkpoint")
    raise Stopped(signum, f"stopped by {name}; what was complete is kept, what was being written is removed; the "
                          f"same command continues from there")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM, SIGUSR1 and SIGINT raise `Stopped` (in the main thread; elsewhere nothing
    changes). The handlers that were there before are put back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _State.depth == 0:
        _State.pid = os.getpid()
        _State.previous = {s: signal.signal(s, _handle) for s in STOP_SIGNALS}
    _State.depth += 1
    try:
        yield
    finally:
        _State.depth -= 1
        if _State.depth == 0:
            _State.pending = 0
            for s, handler in _State.previous.items():
                signal.signal(s, handler)


@contextlib.contextmanager
def graceful() -> Iterator[None]:
    """Within the block, the first signal only sets `requested()`; whoever polls it stops at a safe point. A signal
    noted but not acted on (it came during the last evaluation or the export) stops the command before its next
    stage (`stop_if_requested`)."""
    with stop_on_signals():
        _State.graceful += 1
        try:
            yield
        except BaseException:  # Stopped among others: nothing is left pending
            _State.graceful -= 1
            if _State.graceful == 0:
                _State.requested = 0
            raise
        _State.graceful -= 1
        if _State.graceful == 0:
            _State.pending, _State.requested = _State.requested, 0


def requested() -> int:
    """The signal that asked the block of `graceful` to stop, or 0."""
    return _State.requested


def stop_if_requested() -> None:
    """Raise `Stopped` for a signal that arrived when training could not stop any more (its last evaluation, its
    export): the command ends before it starts anything else."""
    if _State.pending:
        signum, _State.pending = _State.pending, 0
        raise Stopped(signum, f"stopped by {signal_name(signum)} after training ended (its model is exported); the "
                              f"same command runs the stages after it")
