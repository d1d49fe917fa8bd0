"""Stopping at a scheduler's signal: SIGTERM at the time limit, SIGUSR1 before it."""
from __future__ import annotations

import signal
import threading

__all__ = ["STOP_SIGNALS", "StopSignals"]

# What SLURM sends: SIGTERM at the time limit (SIGKILL follows after KillWait, 30 s by
# default) and, with `sbatch --signal=USR1@SECONDS`, SIGUSR1 that long before it.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """While active, SIGTERM and SIGUSR1 are recorded instead of ending the process, so the
    training loop finishes its step, writes a checkpoint and exits. Not collective (the
    loop agrees on the flag). Only the main thread can install handlers; elsewhere this
    does nothing."""

    def __init__(self):
        self.received = 0
        self._old: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._record)
        return self

    def _record(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old.clear()
