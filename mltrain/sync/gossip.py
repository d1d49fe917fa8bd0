"""Decentralized schemes: each rank talks to a few peers, never to all."""
from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch
from mpi4py import MPI

from mltrain import ops
from mltrain.comm import STATS, irecv, isend
from mltrain.comm.collectives import mpi_buffer
from mltrain.sync.base import SyncStrategy

__all__ = ["PushSum", "AsyncPushSum", "SGP", "DPSGD", "exponential_peers"]


def exponential_peers(size: int) -> list[int]:
    """Offsets of the time-varying directed exponential graph: 1, 2, 4, ... < size."""
    if size <= 1:
        return []
    return [2 ** j for j in range(int(math.floor(math.log2(size - 1))) + 1)]


class PushSum:
    """Push-sum over the directed exponential graph, one peer per round (Assran et al.).

    Round k sends half of (x, w) to rank + 2^(k mod m) and keeps half; the receiver adds
    what arrives. Sums of x and of w over ranks are conserved, and x / w goes to the
    average. With P = 2^m ranks, m rounds give the exact average.

    ``mix`` is collective on ``comm`` (every rank sends once and receives once).
    ``device``: where x lives (the message buffers live there too).
    """

    TAG = 731

    def __init__(self, comm, numel: int, dtype: torch.dtype, device=None):
        self.comm = comm
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        self.offsets = exponential_peers(self.size)
        # x and w travel in one message: w appended in the parameters' dtype.
        self._send = torch.empty(numel + 1, dtype=dtype, device=device)
        self._recv = torch.empty(numel + 1, dtype=dtype, device=device)

    def mix(self, x: torch.Tensor, w: float, round_: int) -> float:
        """Mixes ``x`` in place and returns the new weight."""
        if self.size == 1:
            return w
        off = self.offsets[round_ % len(self.offsets)]
        n = x.numel()
        w *= 0.5
        torch.mul(x, 0.5, out=self._send[:n])
        self._send[n] = w
        rreq = irecv(self._recv, (self.rank - off) % self.size, self.comm, self.TAG)
        sreq = isend(self._send, (self.rank + off) % self.size, self.comm, self.TAG)
        rreq.wait()
        sreq.wait()
        ops.axpby(x, 0.5, x, 1.0, self._recv[:n])  # x/2 + received, one pass
        return w + float(self._recv[n])


class AsyncPushSum:
    """Push-sum that never waits for a peer: each round sends half of (x, w) to the
    scheduled peer (non-blocking) and adds whatever messages have arrived by then.

    ``slots`` receives stay posted (from any source), so a sender's message lands even
    while the receiver computes, and a fast rank is not held back by a slow one. At most
    ``max_pending`` sends may be unfinished; beyond that the oldest is waited for (bounds
    memory). Mass in flight is not lost: ``flush`` (collective) receives every message
    sent so far, after which sum(x) and sum(w) are exactly conserved. The order in which
    messages are added depends on timing, so runs are not bitwise reproducible.

    ``device``: where x lives. Sends go from buffers there (``isend`` stages them); the
    posted receives are host buffers (see ``__init__``).
    """

    TAG = 733

    def __init__(self, comm, numel: int, dtype: torch.dtype, slots: int = 4,
                 max_pending: int = 8, device=None):
        self.comm = comm
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        self.offsets = exponential_peers(self.size)
        self.n = numel
        self.dtype = dtype  # every message, sent or received, is numel + 1 of this type
        self.device = device
        self.max_pending = max_pending
        self.sent = np.zeros(self.size, dtype=np.int64)
        self.received = 0
        self._pending: deque = deque()  # (handle, buffer)
        self._free: list[torch.Tensor] = []
        self._slots = []
        for _ in range(slots if self.size > 1 else 0):
            # Receives stay posted between rounds, so MPI writes host memory (a staged
            # device buffer would cost a copy out at every post); _take moves the message.
            buf = torch.empty(numel + 1, dtype=dtype)  # host: a posted raw MPI receive
            self._slots.append([buf, comm.Irecv(mpi_buffer(buf), MPI.ANY_SOURCE, self.TAG)])

    def _take(self, slot, x: torch.Tensor, w: float) -> float:
        buf = slot[0]
        x.add_(buf[:self.n].to(x.device))
        w += float(buf[self.n])
        self.received += 1
        slot[1] = self.comm.Irecv(mpi_buffer(buf), MPI.ANY_SOURCE, self.TAG)
        return w

    def _retire(self) -> None:
        while self._pending and self._pending[0][0].test():
            self._free.append(self._pending.popleft()[1])

    def _drain(self, x: torch.Tensor, w: float) -> float:
        """Adds every message that has arrived (and reposts its receive)."""
        for slot in self._slots:
            if slot[1].Test():
                w = self._take(slot, x, w)
        return w

    def _wait(self, done, x: torch.Tensor, w: float) -> float:
        """Waits until ``done()`` while receiving: a peer's large send completes only once
        this rank has a receive posted for it, so waiting without draining can deadlock
        two ranks that each wait for their own send to the other."""
        while not done():
            w = self._drain(x, w)
        return w

    def push(self, x: torch.Tensor, w: float, round_: int) -> float:
        """Sends half of (x, w) and adds what has arrived; returns the new weight."""
        if self.size == 1:
            return w
        x.mul_(0.5)
        w *= 0.5
        buf = (self._free.pop() if self._free else
               torch.empty(self.n + 1, dtype=self.dtype, device=self.device))
        buf[:self.n].copy_(x)
        buf[self.n] = w
        dest = (self.rank + self.offsets[round_ % len(self.offsets)]) % self.size
        self._pending.append((isend(buf, dest, self.comm, self.TAG), buf))
        self.sent[dest] += 1
        self._retire()
        while len(self._pending) > self.max_pending:
            h, b = self._pending.popleft()
            w = self._wait(h.test, x, w)
            self._free.append(b)
        return self._drain(x, w)

    def flush(self, x: torch.Tensor, w: float) -> float:
        """Receives every message sent to this rank so far. Collective on ``comm``."""
        if self.size == 1:
            return w
        with STATS.paused():
            expected = np.zeros_like(self.sent)
            counted = self.comm.Iallreduce(self.sent, expected)
        w = self._wait(counted.Test, x, w)
        # Every rank has stopped sending now; take what is still due, then finish sends.
        w = self._wait(lambda: self.received >= expected[self.rank], x, w)
        while self._pending:
            h, b = self._pending.popleft()
            w = self._wait(h.test, x, w)
            self._free.append(b)
        return w

    def close(self) -> None:
        for slot in self._slots:
            slot[1].Cancel()
            slot[1].Wait()
        self._slots = []


class SGP(SyncStrategy):
    """Stochastic Gradient Push: local optimizer steps on the de-biased parameters
    z = x / w, then one push-sum round on (x, w) with non-blocking sends.

    Synchronous (default): each round waits for its one incoming message; deterministic.
    ``asynchronous``: never waits (``AsyncPushSum``), so one slow rank does not slow the
    others; the state is flushed before the consensus model is evaluated or saved.
    """

    name = "sgp"
    drifts = True

    def __init__(self, model, comm, asynchronous: bool = False):
        super().__init__(model, comm)
        self.x = self.flat.get()
        self.w = 1.0
        cls = AsyncPushSum if asynchronous else PushSum
        self.pushsum = cls(comm, self.flat.numel, self.flat.dtype, device=self.x.device)
        self._z = torch.empty_like(self.x)

    def before_forward(self, step):
        self.model.zero_grad(set_to_none=True)

    def after_step(self, step):
        # The optimizer moved z = x / w to z'. x takes w (z' - z), i.e. x = w z', so the
        # de-biased parameters take exactly the optimizer's step whatever the weight, and
        # mixing keeps every z a convex combination of stepped ones (w = 1 exactly in
        # synchronous rounds: x = z'). Adding z' - z to x instead moves z by step / w: in
        # asynchronous rounds a rank halves w at every push that meets no incoming message
        # (measured on MNIST at 3 ranks: w from 0.006 to 1.7), and runs diverged.
        torch.mul(self.flat.get(self._z), self.w, out=self.x)
        if isinstance(self.pushsum, AsyncPushSum):
            self.w = self.pushsum.push(self.x, self.w, step)
        else:
            self.w = self.pushsum.mix(self.x, self.w, step)
        self.flat.set(torch.div(self.x, self.w, out=self._z))

    def consensus_params(self):
        if isinstance(self.pushsum, AsyncPushSum):
            self.w = self.pushsum.flush(self.x, self.w)
            self.flat.set(torch.div(self.x, self.w, out=self._z))
        return super().consensus_params()

    def close(self):
        if isinstance(self.pushsum, AsyncPushSum):
            self.w = self.pushsum.flush(self.x, self.w)
            self.pushsum.close()


class DPSGD(SyncStrategy):
    """Decentralized parallel SGD (Lian et al. 2017) on a ring with the symmetric mixing
    matrix W (1/3 to self and each neighbour; 1/2 each with two ranks):
    x_r <- sum_j W_rj x_j - lr * grad f_r(x_r), the gradient taken before mixing."""

    name = "dpsgd"
    drifts = True
    TAG = 732

    def __init__(self, model, comm):
        super().__init__(model, comm)
        self._mine = self.flat.get()  # on the parameters' device, as are the neighbours'
        self._left = torch.empty_like(self._mine)
        self._right = torch.empty_like(self._mine)

    def before_forward(self, step):
        self.model.zero_grad(set_to_none=True)

    def after_backward(self, step):
        if self.size == 1:
            return
        x = self.flat.get(self._mine)
        left, right = (self.rank - 1) % self.size, (self.rank + 1) % self.size
        if self.size == 2:  # one neighbour: W = [[1/2, 1/2], [1/2, 1/2]]
            reqs = [irecv(self._left, left, self.comm, self.TAG),
                    isend(x, left, self.comm, self.TAG)]
            for r in reqs:
                r.wait()
            self.flat.set(x.add_(self._left).mul_(0.5))
            return
        reqs = [irecv(self._left, left, self.comm, self.TAG),
                irecv(self._right, right, self.comm, self.TAG + 1),
                isend(x, right, self.comm, self.TAG),
                isend(x, left, self.comm, self.TAG + 1)]
        for r in reqs:
            r.wait()
        self.flat.set(x.add_(self._left).add_(self._right).div_(3.0))
