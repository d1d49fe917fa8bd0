"""Parameter servers over MPI (``sync.name = "ps"``): sharded servers, bounded staleness.

The last ``parallel.servers`` ranks hold the flat parameter vector as S contiguous shards,
and the server-side optimizer's state with it; the other ranks are workers. A worker
computes the gradient of its batch, pushes each shard's part to that shard's server and
pulls the shard's fresh values (one exchange per server and step).

Transport (``sync.transport = "messages"``): two-sided messages and a progress loop on
each server (``PSServer.serve``); the one-sided fast path for asynchronous plain SGD is
``mltrain.sync.ps_rma``. A passive-target ``Accumulate`` progresses only while the
target is inside MPI on libraries without an asynchronous progress thread (MPICH's and
Open MPI's default), so the server must loop in MPI anyway; a loop can also hold replies
back to enforce the staleness bound, apply the optimizer (Adam's state lives with the
shard) and record the staleness of what it applied, none of which ``Accumulate`` can do.
Messages are raw buffers (no pickle) on a communicator of their own; only the rare
checkpoint and report exchanges carry a small pickled header.

Consistency (``staleness = k``), counted in worker steps (clocks): a server's global clock
is the least number of steps its active workers have pushed; the parameters a worker
receives after pushing step t leave only once the global clock is at least t + 1 - k, so
the gradient of its next step misses the updates of at most k steps:

* k = 0, bulk synchronous: the pushes of a step are summed in worker order (the same bits
  at every run, whatever the arrival order) and applied as one update, then every worker
  receives the result: synchronous data parallelism with the same global batch;
* k > 0, stale synchronous parallel (Ho et al., NeurIPS 2013): pushes apply on arrival;
* k = -1, asynchronous: pushes apply on arrival and replies leave at once.

A push carries ``g / W`` (W workers) and the step, a reply the shard and the server's
global clock, each in one buffer of the parameter dtype (a step count is exact up to 2^24
in float32: the Trainer refuses longer float32 runs). ``DONE`` (empty) ends a worker: it
no longer holds the clock back, so workers may run different numbers of steps. The
staleness of a push is its step minus the global clock of the parameters it was computed
on; every server records it for every shard push it applies.
"""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import torch
from mpi4py import MPI

from mltrain.comm import STATS, broadcast_, irecv, isend
from mltrain.comm import waiting
from mltrain.config import ConfigError
from mltrain.comm.collectives import mpi_buffer
from mltrain.ops import pack
from mltrain.sync.base import SyncStrategy

__all__ = ["shard_bounds", "PSServer", "PSClient", "PSSync", "flat_state", "load_flat_state",
           "MAX_FLOAT32_STEPS"]

TAG_PUSH, TAG_PULL, TAG_DONE, TAG_FETCH, TAG_STATE, TAG_REPORT, TAG_INIT = range(7101, 7108)
MAX_FLOAT32_STEPS = 1 << 24  # steps ride in the message's last element
_EMPTY = np.empty(0, dtype=np.uint8)  # requests and DONE carry nothing


def shard_bounds(n: int, servers: int) -> list[tuple[int, int]]:
    """[lo, hi) of each of ``servers`` contiguous shards of ``n`` elements (sizes differ by
    at most one). Raises ConfigError naming parallel.servers when a shard would be empty.
    Not collective."""
    if servers < 1 or n < servers:
        raise ConfigError(f"parallel.servers: {n} parameters cannot be split into {servers} "
                         "non-empty server shards")
    edges = np.linspace(0, n, servers + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


# -- optimizer state as flat vectors --------------------------------------------------------
def flat_state(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> dict:
    """``opt``'s per-parameter state as {key: flat vector over ``params``} (entries shaped
    like their parameter) and {key: 0-d tensor} (scalars such as Adam's step, taken from
    the first parameter that has them); a parameter without a key's state contributes
    zeros. A key's kind is read off parameters of more than one element (on a one-element
    parameter a moment and a step look alike; with none, only ``step`` is a scalar). Not
    collective."""
    keys: dict[str, str] = {}
    for p in sorted(params, key=lambda q: q.numel() <= 1):  # telling ones first
        for k, v in opt.state.get(p, {}).items():
            if not torch.is_tensor(v) or k in keys:
                continue
            if p.numel() > 1:
                if v.shape == p.shape:
                    keys[k] = "vec"
                elif v.numel() == 1:
                    keys[k] = "scalar"
            elif v.numel() == 1:
                keys[k] = "scalar" if k == "step" else "vec"
    out: dict[str, torch.Tensor] = {}
    for k, kind in keys.items():
        if kind == "scalar":
            out[k] = next(opt.state[p][k] for p in params if k in opt.state.get(p, {})).clone()
            continue
        parts = [opt.state[p][k].detach().reshape(-1) if k in opt.state.get(p, {}) else
                 torch.zeros(p.numel(), dtype=p.dtype, device=p.device) for p in params]
        out[k] = torch.cat(parts)
    return out


def load_flat_state(opt: torch.optim.Optimizer, params: list[torch.Tensor],
                    state: dict) -> None:
    """Inverse of ``flat_state``: every parameter gets its slice of each vector and a copy
    of each scalar. Not collective."""
    if not state:
        return
    off = 0
    for p in params:
        n = p.numel()
        st = opt.state[p]
        for k, v in state.items():
            st[k] = v.clone() if v.dim() == 0 else \
                v[off:off + n].reshape(p.shape).to(p.device, v.dtype).clone()
        off += n


def _send_shard(comm: MPI.Comm, dest: int, tag: int, shard: torch.Tensor,
                state: dict) -> None:
    """Sends a shard and its optimizer state (flat vectors, scalars) to ``dest``: a small
    pickled header, then raw buffers in order. Point to point."""
    head = [(k, "scalar", float(v)) if v.dim() == 0 else (k, "vec", str(v.dtype).split(".")[-1])
            for k, v in state.items()]
    comm.send(head, dest=dest, tag=tag)
    comm.Send(mpi_buffer(shard.detach().cpu().contiguous()), dest=dest, tag=tag)
    for k, v in state.items():
        if v.dim() > 0:
            comm.Send(mpi_buffer(v.detach().cpu().contiguous()), dest=dest, tag=tag)


def _recv_shard(comm: MPI.Comm, source: int, tag: int, n: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    """The other end of ``_send_shard`` for a shard of ``n`` elements. Point to point."""
    head = comm.recv(source=source, tag=tag)
    shard = torch.empty(n, dtype=dtype)  # host: a message buffer
    comm.Recv(mpi_buffer(shard), source=source, tag=tag)
    state: dict[str, torch.Tensor] = {}
    for k, kind, extra in head:
        if kind == "scalar":
            state[k] = torch.tensor(extra, dtype=torch.float32)  # host: torch keeps steps so
            continue
        v = torch.empty(n, dtype=getattr(torch, extra))  # host: a message buffer
        comm.Recv(mpi_buffer(v), source=source, tag=tag)
        state[k] = v
    return shard, state


# -- the server ------------------------------------------------------------------------------
class PSServer:
    """One shard of the parameters, served to ``workers`` (their ranks in ``comm``).

    ``optimizer(params)`` builds the shard's torch optimizer; ``state`` (flat, this
    shard's) restores its state and ``start`` the step the workers resume at (their
    clocks). The shard lives in host memory. Not collective; ``serve`` exchanges messages
    with the workers.
    """

    def __init__(self, comm: MPI.Comm, shard: torch.Tensor, workers: list[int],
                 staleness: int, optimizer, state: dict | None = None, start: int = 0):
        if staleness < -1:
            raise ValueError(f"sync.staleness: {staleness} (use -1, 0 or a positive bound)")
        self.comm, self.workers, self.k = comm, list(workers), staleness
        self.param = torch.nn.Parameter(shard.detach().cpu().clone())
        self.opt = optimizer([self.param])
        if state:
            load_flat_state(self.opt, [self.param], state)
        self.n = shard.numel()
        self.clock = {w: start for w in workers}  # steps each worker has pushed
        self.served = {w: start for w in workers}  # global clock of the parameters it holds
        self.active = set(workers)
        self.staleness: Counter = Counter()       # clock staleness -> applied shard pushes
        self.missed: Counter = Counter()          # updates missed -> applied shard pushes
        self.applied = 0                          # optimizer updates
        self.read = {w: 0 for w in workers}       # updates in the parameters it holds
        self._waiting: list[tuple[int, int]] = []  # (worker, the step it goes on to)
        self._slots: dict[int, torch.Tensor] = {}  # k = 0: this round's pushes by worker
        self._sends: list = []                     # replies in flight, with their buffers

    def global_clock(self) -> int:
        """The least step count of the active workers (a finished one holds nothing
        back). Not collective."""
        return min((self.clock[w] for w in self.active), default=max(self.clock.values()))

    def _apply(self, g: torch.Tensor) -> None:
        self.param.grad = g
        self.opt.step()
        self.param.grad = None
        self.applied += 1

    def _close_round(self) -> None:
        """k = 0: once every active worker pushed this step, one update with the sum in
        worker order (reproducible whatever the arrival order)."""
        if self._slots and set(self._slots) >= self.active:
            total = None
            for w in sorted(self._slots):
                total = self._slots[w] if total is None else total.add_(self._slots[w])
            self._slots.clear()
            self._apply(total)

    def _release(self) -> None:
        """Replies to every waiting worker the bound lets go on. One buffer serves all the
        replies of one release (MPI allows concurrent sends from a buffer)."""
        c = self.global_clock()
        go = [w for w, nxt in self._waiting if self.k < 0 or c >= nxt - self.k]
        if not go:
            return
        self._waiting = [(w, nxt) for w, nxt in self._waiting if w not in go]
        msg = torch.empty(self.n + 1, dtype=self.param.dtype)  # host: the reply
        msg[:self.n] = self.param.detach()
        msg[self.n] = c
        for w in go:
            self.served[w], self.read[w] = c, self.applied
            self._sends.append((self.comm.Isend(mpi_buffer(msg), dest=w, tag=TAG_PULL), msg))
        # Completed replies free their buffers; the rest progress while we wait for pushes.
        self._sends = [(r, m) for r, m in self._sends if not r.Test()]

    def _on_push(self, w: int, buf: torch.Tensor) -> None:
        """Records and applies (k != 0) or collects (k = 0) worker ``w``'s push ``buf``
        (shard gradient, then the step), then replies to whoever may go on."""
        step = int(buf[self.n].item())
        self.staleness[step - self.served[w]] += 1
        self.missed[self.applied - self.read[w]] += 1
        self.clock[w] = step + 1
        self._waiting.append((w, step + 1))
        if self.k == 0:
            self._slots[w] = buf[:self.n].clone()
            self._close_round()
        else:
            self._apply(buf[:self.n].clone())
        self._release()

    def serve(self) -> dict:
        """Answers pushes, fetches and report requests until every worker has sent DONE;
        returns ``report()``. Point to point with every worker (not collective)."""
        buf = torch.empty(self.n + 1, dtype=self.param.dtype)  # host: the posted receive
        status = MPI.Status()
        while self.active:
            if waiting.polite:  # oversubscribed: a polling server would hold a worker's core
                while not self.comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG, status):
                    os.sched_yield()
            else:
                self.comm.Probe(MPI.ANY_SOURCE, MPI.ANY_TAG, status)
            w, tag = status.Get_source(), status.Get_tag()
            if tag == TAG_PUSH:
                self.comm.Recv(mpi_buffer(buf), source=w, tag=TAG_PUSH)
                self._on_push(w, buf)
            elif tag == TAG_DONE:
                self.comm.Recv(_EMPTY, source=w, tag=TAG_DONE)
                self.active.discard(w)
                self._waiting = [(v, nxt) for v, nxt in self._waiting if v != w]
                if self.k == 0:
                    self._slots.pop(w, None)
                    self._close_round()  # the others' round closes without it
                self._release()
            elif tag == TAG_FETCH:
                self.comm.Recv(_EMPTY, source=w, tag=TAG_FETCH)
                _send_shard(self.comm, w, TAG_STATE, self.param.detach(),
                            flat_state(self.opt, [self.param]))
            elif tag == TAG_REPORT:
                self.comm.Recv(_EMPTY, source=w, tag=TAG_REPORT)
                self.comm.send(self.report(), dest=w, tag=TAG_REPORT)
            else:
                raise RuntimeError(f"parameter server: unexpected message tag {tag} from "
                                   f"rank {w}")
        MPI.Request.Waitall([r for r, _ in self._sends])
        self._sends.clear()
        return self.report()

    def report(self) -> dict:
        """Staleness of every applied shard push: count, mean, max and histogram; the
        number of optimizer updates. Not collective."""
        return staleness_report(self.staleness, self.missed, self.applied)


def staleness_report(hist: Counter, missed: Counter, updates: int) -> dict:
    """The summary figures of the staleness histograms: in clocks (a push's step minus the
    slowest worker's step count when its parameters left: what k bounds) and in updates
    (optimizer updates applied between the parameters' read and the push: what the
    gradient missed). Not collective."""
    total = sum(hist.values())

    def mean(h):
        return sum(s * c for s, c in h.items()) / max(sum(h.values()), 1)
    return {"pushes": total, "updates": updates,
            "staleness_mean": mean(hist), "staleness_max": max(hist, default=0),
            "staleness_histogram": {int(s): int(c) for s, c in sorted(hist.items())},
            "missed_updates_mean": mean(missed), "missed_updates_max": max(missed, default=0),
            "missed_updates_histogram": {int(s): int(c) for s, c in sorted(missed.items())}}


# -- the worker's side ---------------------------------------------------------------------
class PSClient:
    """A worker's end: pushes ``g / W`` of every shard to its server and pulls the shards.
    ``record``: keep every pushed vector (a test checks that none is lost). Point to point
    with the servers (not collective)."""

    def __init__(self, comm: MPI.Comm, servers: list[int], bounds: list[tuple[int, int]],
                 workers: int, record: bool = False):
        self.comm, self.servers, self.bounds, self.W = comm, servers, bounds, workers
        self.pushed: list[torch.Tensor] | None = [] if record else None
        self.clock = 0  # the global clock of the parameters last received
        self._bufs: dict = {}  # per server: (push, reply) buffers, reused every step
        self._done = False

    def _buffers(self, g: torch.Tensor):
        key = (g.dtype, g.device)
        if key not in self._bufs:
            self._bufs = {key: [(torch.empty(hi - lo + 1, dtype=g.dtype, device=g.device),
                                 torch.empty(hi - lo + 1, dtype=g.dtype, device=g.device))
                                for lo, hi in self.bounds]}
        return self._bufs[key]

    def push_pull(self, grad: torch.Tensor, step: int, out: torch.Tensor) -> int:
        """Pushes the flat gradient of ``step`` (scaled by 1/W here) and writes the
        servers' fresh parameters into ``out``; returns the staleness the next gradient
        will have (its step minus the clock of these parameters). Point to point."""
        if self.pushed is not None:
            self.pushed.append((grad / self.W).detach().cpu().clone())
        sends, recvs = [], []
        for s, (lo, hi), (m, r) in zip(self.servers, self.bounds, self._buffers(grad)):
            torch.div(grad[lo:hi], self.W, out=m[:hi - lo])
            m[hi - lo] = step
            recvs.append(irecv(r, s, self.comm, TAG_PULL))  # posted first: no unexpected
            sends.append(isend(m, s, self.comm, TAG_PUSH))
        clocks = []
        for (lo, hi), (_, r), h in zip(self.bounds, self._buffers(grad), recvs):
            h.wait()
            out[lo:hi] = r[:hi - lo]
            clocks.append(int(r[hi - lo].item()))
        for h in sends:
            h.wait()
        self.clock = min(clocks)
        return step + 1 - self.clock

    def fetch(self, dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
        """The servers' current parameters (flat, host) and optimizer state (flat vectors
        and scalars). Point to point."""
        n = self.bounds[-1][1]
        for s in self.servers:
            self.comm.Send(_EMPTY, dest=s, tag=TAG_FETCH)
        flat = torch.empty(n, dtype=dtype)  # host: assembled from the shards
        state: dict[str, torch.Tensor] = {}
        for s, (lo, hi) in zip(self.servers, self.bounds):
            shard, st = _recv_shard(self.comm, s, TAG_STATE, hi - lo, dtype)
            flat[lo:hi] = shard
            for k, v in st.items():
                if v.dim() == 0:
                    state.setdefault(k, v)
                else:
                    state.setdefault(k, torch.zeros(n, dtype=v.dtype))[lo:hi] = v  # host:
        return flat, state

    def send_initial(self, flat: torch.Tensor, state: dict) -> None:
        """Gives every server its shard of ``flat`` and of the optimizer ``state``
        (``flat_state``'s form; empty for a fresh run). Point to point."""
        for s, (lo, hi) in zip(self.servers, self.bounds):
            _send_shard(self.comm, s, TAG_INIT, flat[lo:hi],
                        {k: v if v.dim() == 0 else v[lo:hi] for k, v in state.items()})

    def report_all(self, comm: MPI.Comm) -> dict:
        """``report()`` asked by worker 0 and handed to every worker. Collective on the
        workers' communicator ``comm``."""
        return comm.bcast(self.report() if comm.Get_rank() == 0 else None, root=0)

    def report(self) -> dict:
        """Every server's staleness record merged (each shard push counts). Point to
        point."""
        hist: Counter = Counter()
        missed: Counter = Counter()
        updates = 0
        for s in self.servers:
            self.comm.Send(_EMPTY, dest=s, tag=TAG_REPORT)
        for s in self.servers:
            r = self.comm.recv(source=s, tag=TAG_REPORT)
            hist.update({int(k): int(v) for k, v in r["staleness_histogram"].items()})
            missed.update({int(k): int(v) for k, v in r["missed_updates_histogram"].items()})
            updates = max(updates, r["updates"])
        return staleness_report(hist, missed, updates)

    def done(self) -> None:
        """Tells every server this worker has finished (once). Point to point."""
        if not self._done:
            self._done = True
            for s in self.servers:
                self.comm.Send(_EMPTY, dest=s, tag=TAG_DONE)


def receive_initial(comm: MPI.Comm, source: int, n: int,
                    dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    """A server's end of ``PSClient.send_initial``. Point to point."""
    return _recv_shard(comm, source, TAG_INIT, n, dtype)


class PSSync(SyncStrategy):
    """The workers' view of the servers for the Trainer: replicas drift (each worker holds
    the parameters it last pulled); the consensus is the servers' parameters, fetched by
    worker 0 and broadcast. ``state`` is the latest fetched optimizer state (checkpoints).

    Hooks and ``consensus`` are collective on the workers' communicator ``comm``.
    """

    name = "ps"
    drifts = True

    def __init__(self, model, comm: MPI.Comm, client: PSClient):
        super().__init__(model, comm)
        self.client = client
        self.state: dict = {}

    def consensus_params(self) -> torch.Tensor:
        with STATS.paused():
            if self.rank == 0:
                flat, self.state = self.client.fetch(self.flat.dtype)
                flat = flat.to(self.flat.device)
            else:
                flat = torch.empty(self.flat.numel, dtype=self.flat.dtype,
                                   device=self.flat.device)
            return broadcast_(flat, self.comm)

    def close(self) -> None:
        """Tells every server this worker is done (point to point, not collective)."""
        self.client.done()


def flat_grads(params: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """The parameters' gradients packed into ``out`` (zeros where a parameter has none).
    Not collective."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    pack([p.grad for p in params], out)
    return out
