"""How a rank waits for a point-to-point message.

MPI libraries wait by polling, which is the fastest way when every rank has a core. With
more ranks on a node than cores it is the slowest: a rank that polls holds the core its
peer needs to send, so each hand-over costs a scheduler time slice (milliseconds; a
pipeline's 1F1B schedule with 8 micro-batches ran 5x slower than GPipe for this reason).
So when the node is oversubscribed, ranks wait by testing and yielding the core
(``os.sched_yield``) instead. ``MLTRAIN_WAIT=yield`` or ``spin`` overrides the choice.
Not collective.
"""
from __future__ import annotations

import os

from mpi4py import MPI

__all__ = ["oversubscribed", "polite", "wait", "probe"]


def oversubscribed() -> bool:
    """More ranks on this node (as the launcher says: MPICH/Intel MPI's MPI_LOCALNRANKS,
    Open MPI's OMPI_COMM_WORLD_LOCAL_SIZE) than CPUs this process may run on."""
    n = os.environ.get("MPI_LOCALNRANKS") or os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE")
    try:
        ranks = int(n) if n else 1
    except ValueError:
        return False
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    return ranks > cpus


def _choose() -> bool:
    mode = os.environ.get("MLTRAIN_WAIT", "").strip().lower()
    if mode in ("yield", "spin"):
        return mode == "yield"
    return oversubscribed()


polite = _choose()


def wait(req: MPI.Request) -> None:
    """Completes ``req``, yielding the core while it is pending on an oversubscribed
    node."""
    if polite:
        while not req.Test():
            os.sched_yield()
    else:
        req.Wait()


def probe(comm: MPI.Comm, source: int, tag: int) -> None:
    """Returns once a message from ``source`` with ``tag`` can be received (at once when
    not oversubscribed: the receive itself then waits)."""
    if polite:
        while not comm.Iprobe(source=source, tag=tag):
            os.sched_yield()
