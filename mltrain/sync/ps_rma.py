"""The one-sided transport of the parameter servers (``sync.transport = "rma"``): for
asynchronous plain SGD only, the one case MPI one-sided communication can do by itself.

Each server exposes its shard in an ``MPI.Win``; a worker's step is, per server, a shared
lock, ``Accumulate`` of -lr g / W (element-wise atomic in MPI), a flush, a ``Get`` of the
shard and the unlock: no server process takes part, which ``bench ps --transport`` measured
7-11x faster than the server loop on one node (MPICH's shared-memory windows). A second
window on the first server holds a push counter and every worker's clock, so the
server loop's staleness figures are kept, by the workers (``report_all`` merges them),
with three approximations: a worker's clock is published just before its shard add, the
clocks and the counter are read before the shards, and a worker that has finished keeps
its last clock (the server loop drops it from the minimum). Reads are ``Get_accumulate``
with ``NO_OP``, atomic per element against the other workers' adds. The servers only
wait, in MPI (passive-target progress), for every worker's DONE. Nothing else of the
server loop applies: no optimizer state, no staleness bound.
"""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import torch
from mpi4py import MPI

from mltrain.comm import waiting
from mltrain.sync.ps import TAG_DONE, PSClient, _EMPTY, staleness_report

__all__ = ["RMAServer", "RMAClient", "read_atomic"]

_I64 = np.dtype(np.int64)
I64 = MPI.INT64_T  # one name on both sides: MPI checks the signatures of RMA datatypes


def read_atomic(win: MPI.Win, buf: np.ndarray, rank: int, disp: int = 0) -> None:
    """Reads ``len(buf)`` elements at ``disp`` of ``rank``'s window into ``buf``, atomically
    per element against concurrent ``Accumulate`` calls (a plain ``Get`` that overlaps one
    is erroneous in MPI). Inside a lock epoch; one-sided."""
    t = I64 if buf.dtype == _I64 else MPI._typedict[buf.dtype.char]
    win.Get_accumulate([None, 0, t], [buf, t], rank, (disp, len(buf), t), op=MPI.NO_OP)


def _windows(comm: MPI.Comm, shard_bytes: int, item: int, counters: int):
    """The shard window and the counter window (``counters`` int64 on this rank). Collective
    on ``comm``."""
    win = MPI.Win.Allocate(shard_bytes, item, comm=comm)
    cwin = MPI.Win.Allocate(counters * _I64.itemsize, _I64.itemsize, comm=comm)
    return win, cwin


class RMAServer:
    """A server of the one-sided transport: its shard lives in a window the workers add
    into and read. ``first``: this server also holds the push counter and the workers'
    clocks (``workers`` of them, starting at ``start``). Construction is collective on
    ``comm`` (with every worker's ``RMAClient.open``); ``serve`` waits for DONE from every
    worker, point to point, then frees the windows (collective on ``comm``)."""

    def __init__(self, comm: MPI.Comm, shard: torch.Tensor, workers: list[int], first: bool,
                 start: int = 0):
        self.comm, self.workers = comm, list(workers)
        dtype = np.dtype(str(shard.dtype).split(".")[-1])
        n = shard.numel()
        self.win, self.cwin = _windows(comm, n * dtype.itemsize, dtype.itemsize,
                                       1 + len(workers) if first else 0)
        me = comm.Get_rank()
        self.mem = np.frombuffer(self.win.tomemory(), dtype=dtype, count=n)
        self.win.Lock(me, MPI.LOCK_EXCLUSIVE)
        self.mem[:] = shard.detach().cpu().numpy()
        self.win.Unlock(me)
        if first:
            c = np.frombuffer(self.cwin.tomemory(), dtype=_I64, count=1 + len(workers))
            self.cwin.Lock(me, MPI.LOCK_EXCLUSIVE)
            c[0], c[1:] = 0, start
            self.cwin.Unlock(me)
        comm.Barrier()  # the shard is in place before any worker adds to it
        self.param = torch.from_numpy(self.mem)  # host: the window's memory

    def serve(self) -> dict:
        """Waits in MPI until every worker has sent DONE, then frees the windows. Returns an
        empty record (the workers keep the staleness figures)."""
        status = MPI.Status()
        left = set(self.workers)
        while left:
            if waiting.polite:
                while not self.comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG, status):
                    os.sched_yield()
            else:
                self.comm.Probe(MPI.ANY_SOURCE, MPI.ANY_TAG, status)
            w = status.Get_source()
            if status.Get_tag() != TAG_DONE:
                raise RuntimeError(f"parameter server (rma): unexpected message tag "
                                   f"{status.Get_tag()} from rank {w}")
            self.comm.Recv(_EMPTY, source=w, tag=TAG_DONE)
            left.discard(w)
        me = self.comm.Get_rank()
        self.win.Lock(me, MPI.LOCK_SHARED)
        self.param = torch.from_numpy(self.mem.copy())  # host: the final shard
        self.win.Unlock(me)
        self.mem = None
        self.win.Free()
        self.cwin.Free()
        return {}


class RMAClient(PSClient):
    """A worker's end of the one-sided transport (same interface as ``PSClient``). ``lr``:
    the SGD step the worker applies through ``Accumulate``. ``open`` (collective on the
    servers' communicator, with the servers' ``RMAServer``) must run before the first
    step; ``done`` frees the windows (collective on it too)."""

    def __init__(self, comm: MPI.Comm, servers: list[int], bounds: list[tuple[int, int]],
                 workers: int, lr: float, record: bool = False):
        super().__init__(comm, servers, bounds, workers, record=record)
        self.lr = lr
        self.win = self.cwin = None
        self._hist: Counter = Counter()
        self._missed: Counter = Counter()
        self._seen = 0  # the push counter when this worker last read the parameters
        self._min_clock = 0
        self._one = np.ones(1, dtype=_I64)

    def open(self, start: int = 0) -> None:
        """Joins the servers' windows. Collective on the servers' communicator."""
        self.win, self.cwin = _windows(self.comm, 0, 1, 0)
        self._min_clock = start
        self.comm.Barrier()

    def push_pull(self, grad: torch.Tensor, step: int, out: torch.Tensor) -> int:
        """Adds -lr g / W to every shard and reads the shards into ``out``; records the
        staleness of this push. Returns the staleness of the next one (clocks). One-sided
        (not collective)."""
        g = (grad / self.W).detach()
        if self.pushed is not None:
            self.pushed.append(g.cpu().clone())
        push = (g * -self.lr).cpu().numpy()
        host = np.empty(len(push), dtype=push.dtype)
        first = self.servers[0]
        # The clock record and counter first: what this push missed, what the next read has.
        prev = np.zeros(1, dtype=_I64)
        clocks = np.empty(self.W, dtype=_I64)
        me = self.comm.Get_rank()
        self.cwin.Lock(first, MPI.LOCK_SHARED)
        self.cwin.Fetch_and_op([self._one, I64], [prev, I64], first, 0, MPI.SUM)
        self.cwin.Accumulate([np.array([step + 1], dtype=_I64), I64], first, (1 + me, 1, I64),
                             MPI.REPLACE)
        self.cwin.Flush(first)
        read_atomic(self.cwin, clocks, first, 1)
        self.cwin.Unlock(first)
        self._hist[step - self._min_clock] += 1
        self._missed[int(prev[0]) - self._seen] += 1  # others' pushes since this one's read
        self._seen = int(prev[0]) + 1
        for s, (lo, hi) in zip(self.servers, self.bounds):
            self.win.Lock(s, MPI.LOCK_SHARED)
            self.win.Accumulate(push[lo:hi], s, op=MPI.SUM)
            self.win.Flush(s)  # the add is done at the target before the read
            read_atomic(self.win, host[lo:hi], s)
            self.win.Unlock(s)
        out.copy_(torch.from_numpy(host))  # host: read from the windows, then to out's device
        self._min_clock = int(clocks.min())
        return step + 1 - self._min_clock

    def fetch(self, dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
        """The servers' parameters (flat, host); no optimizer state. One-sided."""
        n = self.bounds[-1][1]
        host = np.empty(n, dtype=np.dtype(str(dtype).split(".")[-1]))
        for s, (lo, hi) in zip(self.servers, self.bounds):
            self.win.Lock(s, MPI.LOCK_SHARED)
            read_atomic(self.win, host[lo:hi], s)  # workers may still be adding (checkpoints)
            self.win.Unlock(s)
        return torch.from_numpy(host), {}  # host: as PSClient.fetch

    def report(self) -> dict:
        """The servers keep no record here: ``report_all`` merges the workers'."""
        raise RuntimeError("sync.transport = 'rma': the workers keep the staleness record "
                           "(report_all)")

    def report_all(self, comm: MPI.Comm) -> dict:
        """Every worker's records merged (each push counts once per server, as the server
        loop counts them). Collective on the workers' communicator ``comm``."""
        S = len(self.servers)
        hists = comm.allgather((dict(self._hist), dict(self._missed)))
        hist, missed = Counter(), Counter()
        for h, m in hists:
            hist.update({k: v * S for k, v in h.items()})
            missed.update({k: v * S for k, v in m.items()})
        return staleness_report(hist, missed, sum(hist.values()) // S)

    def done(self) -> None:
        """Tells every server this worker has finished and frees the windows (collective on
        the servers' communicator, with the servers' ``serve``); once."""
        if self._done:
            return
        super().done()
        if self.win is not None:
            self.win.Free()
            self.cwin.Free()
