"""Preemption: SIGTERM/SIGINT ask a long command to stop at the next safe point, save, and exit 75.

Rented GPU nodes are reclaimed with a SIGTERM and about 30 s of notice (torchrun, Slurm and Kubernetes
all send SIGTERM to every rank). `StopSignals` turns the first SIGTERM or SIGINT into a flag that the
loop reads at its safe points (after an optimizer step in `train-student`, after a written unit in
`cache-teacher`); the command then saves and exits with `EXIT_PREEMPTED`. A second signal more than
REPEAT_WINDOW_S after the first acts as if no handler were installed (a hung run can still be stopped);
one sooner is taken for the same stop delivered twice (scheduler and launcher both send it) and ignored.

Data-loader workers must not die of a SIGTERM sent to the whole process group (as Slurm sends it): torch
installs a C handler for SIGTERM in each worker that prints and dies, and the main process then raises
"DataLoader worker ... is killed by signal: Terminated" instead of saving. Our loaders pass
`worker_init_fn=ignore_stop_signals` (it runs after torch's handler setup): a worker ignores SIGTERM and
SIGINT, and leaves when the main process shuts it down or dies (torch's workers watch their parent).
"""

from __future__ import annotations

import signal
import threading
import time

EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): "try again later", here: resume with the same command (--resume)
SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW_S = 2.0  # a second signal within this time of the first is the same stop, delivered twice


class Preempted(SystemExit):
    """Raised after the state is saved: the process exits with EXIT_PREEMPTED."""

    def __init__(self, what: str):
        super().__init__(EXIT_PREEMPTED)
        self.what = what


class StopSignals:
    """Context manager: while active, the first SIGTERM/SIGINT sets `requested` (and `signal_time`).

    Outside the main thread (signal handlers cannot be set there) it does nothing and `requested` stays
    False. The previous handlers come back on exit."""

    def __init__(self):
        self.requested = False
        self.signal_time: float | None = None
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        now = time.monotonic()
        if not self.requested:
            self.requested, self.signum, self.signal_time = True, signum, now
        elif now - self.signal_time > REPEAT_WINDOW_S:  # a real second signal: act as if we were not here
            for s in SIGNALS:
                signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
            signal.raise_signal(signum)
        # else the same stop sent twice (Slurm signals every process of a job, and torchrun forwards its own
        # SIGTERM to the ranks it launched): ignored, or the copy would kill the rank mid-save

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a stop signal"


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """DataLoader worker_init_fn: the stop is the main process's to handle (see the module docstring)."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


# The active StopSignals of this process (None outside a command): tests/support/probe_cli.py reads it to
# end a stall when the signal arrives.
current: StopSignals | None = None


class active:
    """`with active() as stop:` a StopSignals that is also `pipeline.preempt.current`."""

    def __enter__(self) -> StopSignals:
        global current
        self.stop = current = StopSignals().__enter__()
        return self.stop

    def __exit__(self, *exc):
        global current
        self.stop.__exit__(*exc)
        current = None
