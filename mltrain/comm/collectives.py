"""Zero-copy collectives on torch tensors.

Contiguous CPU tensors are handed to mpi4py's buffer (upper-case) methods as NumPy views
of the same memory: no pickling and no copies. Tensors on a GPU are staged through host
memory unless ``MLTRAIN_CUDA_AWARE_MPI=1`` says the MPI library reads device memory, in
which case mpi4py receives the tensor itself (it understands ``__cuda_array_interface__``),
once the kernels that wrote it have finished. ``MLTRAIN_STAGE_HOST=1`` stages CPU tensors
too, so the staged path is exercised where there is no GPU.

Every call counts its payload in ``STATS`` (bytes this rank handed to collectives, and the
number of calls), which the trainer reports as ``comm_bytes`` / ``comm_calls``.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from mpi4py import MPI

from mltrain.comm import waiting
from mltrain.comm.errors import collective
from mltrain.utils.device import cuda_aware_mpi, stage_host

__all__ = ["STATS", "CommStats", "allreduce_", "mean_", "iallreduce_", "broadcast_", "allgather",
           "reduce_", "allreduce_scalar", "allgatherv", "isend", "irecv", "Handle", "mpi_buffer", "node_rank"]


@dataclass
class CommStats:
    """Payload bytes this rank passed to collectives, and how many calls it made.

    Payload, not wire bytes: an allreduce of n bytes counts n whatever algorithm the MPI
    library picks (a ring sends about 2n(P-1)/P). Single-rank communicators count nothing.
    """

    bytes: int = 0
    calls: int = 0
    _paused: int = 0

    def add(self, comm: MPI.Comm, nbytes: int) -> None:
        if comm.Get_size() > 1 and not self._paused:
            self.bytes += int(nbytes)
            self.calls += 1

    def snapshot(self) -> tuple[int, int]:
        return self.bytes, self.calls

    @contextmanager
    def paused(self):
        """Traffic inside is not counted (monitoring, e.g. the consensus distance, is not
        part of what a synchronization scheme costs)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1


STATS = CommStats()

_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "prod": MPI.PROD}
_REDUCIBLE = {torch.float32, torch.float64, torch.int32, torch.int64, torch.uint8, torch.int8,
              torch.int16, torch.bool}


def _op(op: str):
    try:
        return _OPS[op]
    except KeyError:
        raise ValueError(f"unknown reduction {op!r} (one of {', '.join(_OPS)})") from None


def mpi_buffer(t: torch.Tensor, *, reduce: bool = False):
    """The object mpi4py should read/write for ``t`` (a NumPy view sharing its memory).

    Types without a NumPy or MPI counterpart (bfloat16, float16) travel as raw bytes,
    which is right for broadcasts and gathers and refused for reductions.
    """
    if not t.is_contiguous():
        raise ValueError("collectives need contiguous tensors (call .contiguous() first)")
    if reduce and t.dtype not in _REDUCIBLE:
        raise TypeError(f"MPI reductions on {t.dtype} are not supported; reduce in float32")
    if t.is_cuda:  # only reached when the MPI is CUDA-aware
        return t.detach() if t.dtype in _REDUCIBLE else t.detach().view(torch.uint8)
    t = t.detach()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.uint8)
    return t.numpy()  # host: CUDA tensors returned above


class _Staged:
    """What MPI reads and writes for ``t``: ``t`` itself (a CPU tensor; a device tensor with
    a CUDA-aware MPI; any tensor on a one-rank ``comm``, where nothing crosses), or a host
    copy written back after the operation. ``recv``: the host side is only written, so
    nothing is copied in; ``send_only``: nothing is written back; ``fenced``: the caller
    has waited for the kernels that wrote ``t``."""

    def __init__(self, t: torch.Tensor, comm: MPI.Comm | None = None, *,
                 send_only: bool = False, recv: bool = False, fenced: bool = False):
        self.device_tensor, self.send_only = t, send_only
        if comm is not None and comm.Get_size() == 1:
            self.host = t
        elif t.is_cuda and cuda_aware_mpi():
            if not fenced:  # MPI reads device memory outside torch's streams
                torch.cuda.current_stream(t.device).synchronize()
            self.host = t
        elif t.is_cuda or stage_host():
            self.host = (torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)  # host: MPI writes it
                         if recv else t.detach().to("cpu", copy=True))  # host: MPI reads it
        else:
            self.host = t

    def writeback(self) -> None:
        if self.host is not self.device_tensor and not self.send_only:
            self.device_tensor.copy_(self.host)


class Handle:
    """A pending non-blocking collective; ``wait()`` completes it (and writes back)."""

    def __init__(self, req: MPI.Request, staged: _Staged):
        self.req = req
        self._staged = staged

    def test(self) -> bool:
        """True once complete; drives MPI progress. Not collective."""
        return self.req.Test()

    def wait(self) -> torch.Tensor:
        waiting.wait(self.req)
        self._staged.writeback()
        return self._staged.device_tensor


@collective("any")
def allreduce_(t: torch.Tensor, comm: MPI.Comm, op: str = "sum") -> torch.Tensor:
    """In-place allreduce of ``t``. Collective on ``comm``."""
    mpi_op = _op(op)
    s = _Staged(t, comm)
    buf = mpi_buffer(s.host, reduce=True)
    STATS.add(comm, s.host.nbytes)
    if comm.Get_size() > 1:
        comm.Allreduce(MPI.IN_PLACE, buf, op=mpi_op)
    s.writeback()
    return t


def mean_(t: torch.Tensor, comm: MPI.Comm) -> torch.Tensor:
    """In-place mean of ``t`` over ``comm`` (the sum, then divided by the size; one rank
    leaves it as it is). Collective on ``comm``."""
    allreduce_(t, comm)
    return t.div_(comm.Get_size()) if comm.Get_size() > 1 else t


@collective("any")
def iallreduce_(t: torch.Tensor, comm: MPI.Comm, op: str = "sum", *,
                fenced: bool = False) -> Handle:
    """Starts an in-place non-blocking allreduce; call ``.wait()`` on the result.

    ``t`` must not be read or written until then; ``fenced``: the caller has waited for
    the device kernels that wrote it. Collective on ``comm``.
    """
    mpi_op = _op(op)
    s = _Staged(t, comm, fenced=fenced)
    buf = mpi_buffer(s.host, reduce=True)
    STATS.add(comm, s.host.nbytes)
    req = comm.Iallreduce(MPI.IN_PLACE, buf, op=mpi_op) if comm.Get_size() > 1 else MPI.REQUEST_NULL
    return Handle(req, s)


@collective("any")
def broadcast_(t: torch.Tensor, comm: MPI.Comm, root: int = 0) -> torch.Tensor:
    """In-place broadcast of ``t`` from ``root``. Collective on ``comm``."""
    s = _Staged(t, comm)
    STATS.add(comm, s.host.nbytes)
    if comm.Get_size() > 1:
        if waiting.polite:  # an oversubscribed node: wait without holding the core
            waiting.wait(comm.Ibcast(mpi_buffer(s.host), root=root))
        else:
            comm.Bcast(mpi_buffer(s.host), root=root)
    s.writeback()
    return t


@collective("any")
def allgather(t: torch.Tensor, comm: MPI.Comm) -> torch.Tensor:
    """Returns a new tensor of shape ``[P, *t.shape]`` with every rank's ``t``.

    Collective on ``comm``.
    """
    s = _Staged(t, comm)
    out = torch.empty((comm.Get_size(), *t.shape), dtype=t.dtype)  # host: MPI writes it
    STATS.add(comm, s.host.nbytes)
    if comm.Get_size() > 1:
        comm.Allgather(mpi_buffer(s.host), mpi_buffer(out))
    else:
        out[0].copy_(s.host)
    return out.to(t.device)


@collective("any")
def allgatherv(t: torch.Tensor, counts: list[int], comm: MPI.Comm) -> torch.Tensor:
    """Concatenation of every rank's 1-D ``t`` (rank r contributes ``counts[r]`` elements).

    Collective on ``comm``.
    """
    s = _Staged(t, comm)
    out = torch.empty(sum(counts), dtype=t.dtype)  # host: MPI writes it
    STATS.add(comm, s.host.nbytes)
    if comm.Get_size() > 1:
        comm.Allgatherv(mpi_buffer(s.host), [mpi_buffer(out), counts])
    else:
        out.copy_(s.host)
    return out.to(t.device)


@collective("any")
def reduce_(t: torch.Tensor, comm: MPI.Comm, root: int = 0, op: str = "sum") -> torch.Tensor:
    """In-place reduction onto ``root``; other ranks' ``t`` is left unchanged.

    Collective on ``comm``.
    """
    mpi_op = _op(op)
    s = _Staged(t, comm)
    buf = mpi_buffer(s.host, reduce=True)
    STATS.add(comm, s.host.nbytes)
    if comm.Get_size() > 1:
        if comm.Get_rank() == root:
            comm.Reduce(MPI.IN_PLACE, buf, op=mpi_op, root=root)
        else:
            comm.Reduce(buf, None, op=mpi_op, root=root)
    if comm.Get_rank() == root:
        s.writeback()
    return t


@collective("any")
def local_cpu_masks(comm: MPI.Comm) -> list[list[int]]:
    """The CPU affinity masks of the ranks of ``comm`` on this node (this rank's
    included), for ``mltrain.utils.set_threads``. Collective on ``comm``."""
    from mltrain.utils import cpu_mask

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return local.allgather(cpu_mask())
    finally:
        local.Free()


@collective("any")
def node_rank(comm: MPI.Comm) -> tuple[int, int]:
    """(this rank's index among the ranks of ``comm`` on its node, how many there are):
    the MPI shared-memory split, which GPU mapping and thread counts follow. Collective
    on ``comm``."""
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return local.Get_rank(), local.Get_size()
    finally:
        local.Free()


@collective("any")
def allreduce_scalar(x: float, comm: MPI.Comm, op: str = "sum") -> float:
    """Allreduce of one Python number, in float64. Collective on ``comm``."""
    mpi_op = _op(op)
    buf = np.array([x], dtype=np.float64)
    STATS.add(comm, buf.nbytes)
    if comm.Get_size() > 1:
        comm.Allreduce(MPI.IN_PLACE, buf, op=mpi_op)
    return float(buf[0])


def isend(t: torch.Tensor, dest: int, comm: MPI.Comm, tag: int = 0) -> Handle:
    """Starts sending ``t`` to ``dest``; keep ``t`` unchanged until ``.wait()``.

    Point to point (not collective); counted in STATS as bytes sent.
    """
    s = _Staged(t, comm, send_only=True)
    STATS.add(comm, s.host.nbytes)
    return Handle(comm.Isend(mpi_buffer(s.host), dest=dest, tag=tag), s)


def irecv(t: torch.Tensor, source: int, comm: MPI.Comm, tag: int = 0) -> Handle:
    """Starts receiving into ``t`` from ``source``; valid after ``.wait()``.

    Point to point (not collective); receiving is not counted (the sender counts).
    """
    s = _Staged(t, comm, recv=True)
    return Handle(comm.Irecv(mpi_buffer(s.host), source=source, tag=tag), s)
