"""How the benchmarks time things, in one place. Every figure is a wall-clock time of the
slowest rank where ranks take part (a collective step is as slow as its slowest rank)."""
from __future__ import annotations

import time

from mpi4py import MPI

from mltrain.comm.waiting import wait

__all__ = ["best_alone", "best_of_slowest", "mean_of_slowest", "interleaved_medians"]


def best_alone(fn, budget_s: float = 0.3, min_reps: int = 3, max_reps: int = 50) -> float:
    """The fastest of repeated calls of ``fn`` in this process (after a warm-up that first
    touches its output pages): at least ``min_reps``, more while ``budget_s`` lasts. Not
    collective."""
    fn()
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def best_of_slowest(fn, reps: int, comm: MPI.Comm, setup=None) -> float:
    """The best of ``reps`` calls, each timed on the slowest rank from a common start
    (``setup`` untimed before each). Collective on ``comm``."""
    best = float("inf")
    for _ in range(reps):
        if setup is not None:
            setup()
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        best = min(best, comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    return best


def mean_of_slowest(comm: MPI.Comm, fn, reps: int) -> float:
    """Seconds per call over ``reps`` back-to-back calls, the slowest rank's. Collective on
    ``comm``."""
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    comm.Barrier()
    return comm.allreduce((time.perf_counter() - t0) / reps, op=MPI.MAX)


def interleaved_medians(comm: MPI.Comm, steps_by_key: dict, steps: int, rounds: int) -> dict:
    """The median (over ``rounds`` rounds of ``steps`` timed calls after a warm-up) of each
    step function's time on the slowest rank. The rounds go over all functions in turn, so
    that a slow phase of the machine (the scheduler, with more ranks than cores) falls on
    all of them rather than on one. Collective on ``comm``."""
    times: dict = {k: [] for k in steps_by_key}
    for _ in range(rounds):
        for k, step in steps_by_key.items():
            step()  # warm-up (and the first round's allocations)
            for _ in range(steps):
                wait(comm.Ibarrier())
                t0 = time.perf_counter()
                step()
                times[k].append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    return {k: sorted(t)[len(t) // 2] for k, t in times.items()}
