"""Collective failure: one rank's error becomes every rank's error, never a hang.

Two mechanisms, as in ``python -m mpi4py``:

* ``agree``: run a check on every rank and share the outcome, so a config or file error
  found on any rank is raised, with the same message, on all of them (then the CLI exits
  cleanly with a non-zero code everywhere).
* ``install_abort_hook``: an uncaught exception on one rank prints its traceback and
  aborts the whole job (``MPI_Abort``), because the other ranks may be blocked in a
  collective that the failed rank will never enter.
"""
from __future__ import annotations

import functools
import os
import sys
import time
import traceback
from typing import Callable, TypeVar

from mpi4py import MPI

T = TypeVar("T")

__all__ = ["CollectiveError", "agree", "install_abort_hook", "collective"]


class CollectiveError(RuntimeError):
    """Raised on every rank when a check failed on at least one rank.

    ``kind`` is the failed exception's class name (ConfigError, CheckpointError, ...), so
    callers can tell user errors (clean exit) from bugs.
    """

    def __init__(self, message: str, kind: str, ranks: list[int]):
        super().__init__(message)
        self.kind = kind
        self.ranks = ranks


def agree(comm: MPI.Comm, fn: Callable[[], T], *, what: str = "") -> T:
    """Runs ``fn`` on every rank; if it raised anywhere, raises CollectiveError everywhere.

    The message is the lowest failing rank's (the same text on every rank). Exceptions
    that are not ``Exception`` (KeyboardInterrupt, SystemExit) propagate unchanged.

    Collective on ``comm``.
    """
    result, failure = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - everything must be shared, or peers hang
        failure = (type(e).__name__, str(e) or type(e).__name__)
    failures = comm.allgather(failure) if comm.Get_size() > 1 else [failure]
    bad = [r for r, f in enumerate(failures) if f is not None]
    if bad:
        kind, msg = failures[bad[0]]
        where = "" if comm.Get_size() == 1 else (
            f" (on rank {bad[0]}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "") + ")")
        raise CollectiveError(f"{what}{': ' if what else ''}{msg}{where}", kind, bad)
    return result


_hook_installed = False
ABORT_GRACE_S = 1.0  # seconds between printing the traceback and MPI_Abort


def install_abort_hook(comm: MPI.Comm = MPI.COMM_WORLD) -> None:
    """Makes an uncaught exception on any rank abort the whole job instead of hanging it.

    Not collective (each rank installs its own hook).
    """
    global _hook_installed
    if _hook_installed or comm.Get_size() == 1:
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        rank = comm.Get_rank()
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        sys.stderr.write(f"[mltrain {rank}] uncaught exception, aborting the job:\n{text}")
        sys.stderr.flush()
        # The launcher forwards our stderr asynchronously; aborting at once can kill the
        # job before it has passed on the one message that explains the failure.
        time.sleep(ABORT_GRACE_S)
        try:
            comm.Abort(1)
        finally:
            previous(exc_type, exc, tb)

    sys.excepthook = hook
    _hook_installed = True


def collective(axis: str):
    """Marks a function as collective on ``axis``.

    With ``MLTRAIN_CHECK_COLLECTIVES=1`` every call first checks that all ranks of the
    communicator (the function's ``comm`` argument) entered the same collective; a rank
    that called a different one fails everywhere with both names, instead of deadlocking
    or silently mixing buffers. Off by default: it costs one allgather per call.
    """

    def deco(fn):
        fn.__collective__ = axis
        if os.environ.get("MLTRAIN_CHECK_COLLECTIVES") != "1":
            return fn

        @functools.wraps(fn)
        def checked(*args, **kwargs):
            comm = kwargs.get("comm")
            if comm is None:
                comm = next((a for a in args if isinstance(a, MPI.Comm)), None)
            if comm is not None and comm.Get_size() > 1:
                names = comm.allgather(fn.__qualname__)
                if len(set(names)) > 1:
                    raise RuntimeError(f"collective mismatch on {axis}: ranks called {names}")
            return fn(*args, **kwargs)

        return checked

    return deco
