"""Decentralized schemes: each rank talks to a few peers, never to all."""
from __future__ import annotations

import math

import torch

from mltrain.comm import irecv, isend
from mltrain.sync.base import SyncStrategy

__all__ = ["PushSum", "SGP", "DPSGD", "exponential_peers"]


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
    """

    TAG = 731

    def __init__(self, comm, numel: int, dtype: torch.dtype):
        self.comm = comm
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        self.offsets = exponential_peers(self.size)
        # x and w travel in one message: w appended in the parameters' dtype.
        self._send = torch.empty(numel + 1, dtype=dtype)
        self._recv = torch.empty(numel + 1, dtype=dtype)

    def mix(self, x: torch.Tensor, w: float, round_: int) -> float:
        """Mixes ``x`` in place and returns the new weight."""
        if self.size == 1:
            return w
        off = self.offsets[round_ % len(self.offsets)]
        n = x.numel()
        x.mul_(0.5)
        w *= 0.5
        self._send[:n].copy_(x)
        self._send[n] = w
        rreq = irecv(self._recv, (self.rank - off) % self.size, self.comm, self.TAG)
        sreq = isend(self._send, (self.rank + off) % self.size, self.comm, self.TAG)
        rreq.wait()
        sreq.wait()
        x.add_(self._recv[:n])
        return w + float(self._recv[n])


class SGP(SyncStrategy):
    """Stochastic Gradient Push: local optimizer steps on the de-biased parameters
    z = x / w, then one push-sum round on (x, w) (non-blocking send and receive)."""

    name = "sgp"
    drifts = True

    def __init__(self, model, comm):
        super().__init__(model, comm)
        self.x = self.flat.get()
        self.w = 1.0
        self.pushsum = PushSum(comm, self.flat.numel, self.flat.dtype)
        self._z = torch.empty_like(self.x)

    def before_forward(self, step):
        self.model.zero_grad(set_to_none=True)

    def after_step(self, step):
        # The optimizer moved z to z'; push-sum applies the same update to x: x += z' - z.
        z_new = self.flat.get(self._z)
        self.x.add_(z_new - self.x / self.w)
        self.w = self.pushsum.mix(self.x, self.w, step)
        self.flat.set(torch.div(self.x, self.w, out=self._z))


class DPSGD(SyncStrategy):
    """Decentralized parallel SGD (Lian et al. 2017) on a ring with the symmetric mixing
    matrix W (1/3 to self and each neighbour; 1/2 each with two ranks):
    x_r <- sum_j W_rj x_j - lr * grad f_r(x_r), the gradient taken before mixing."""

    name = "dpsgd"
    drifts = True
    TAG = 732

    def __init__(self, model, comm):
        super().__init__(model, comm)
        n = self.flat.numel
        self._mine = torch.empty(n, dtype=self.flat.dtype)
        self._left = torch.empty(n, dtype=self.flat.dtype)
        self._right = torch.empty(n, dtype=self.flat.dtype)

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
