"""Gradient compression for synchronous averaging (``sync.compression``).

Each compressor's ``average_grads(params)`` replaces every ``p.grad`` by the (compressed)
average over the communicator, identically on every rank. Collective on that communicator.

* ``fp16`` / ``bf16``: a ring allreduce (reduce-scatter, then allgather) whose messages are
  16-bit; partial sums are kept in float32, and each chunk's owner rounds its final sum to
  the wire type too, so every rank ends with the same bits.
* ``topk``: each rank sends the ``ratio`` fraction of largest-magnitude entries of
  gradient + residual (indices and values); the residual keeps the rest (error feedback).
* ``powersgd`` (Vogels et al. 2019): every gradient matrix M (conv kernels as
  out x rest) is approximated by P Q^T of rank r after one power iteration warm-started from
  the last Q; the residual M - P Q^T is carried to the next step (error feedback). Vectors
  and matrices too small to gain are averaged uncompressed, in one allreduce.
"""
from __future__ import annotations

import math

import torch
from mpi4py import MPI

from mltrain import ops
from mltrain.comm import allgather, allreduce_, irecv, isend

__all__ = ["ring_allreduce_", "HalfPrecision", "TopK", "PowerSGD", "build_compressor"]


def _flat_grads(params) -> torch.Tensor:
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.empty(sum(g.numel() for g in grads), dtype=grads[0].dtype, device=grads[0].device)
    ops.pack(grads, flat)
    return flat


def _set_grads(params, flat: torch.Tensor) -> None:
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    ops.unpack(flat, [p.grad for p in params])


def ring_allreduce_(flat: torch.Tensor, comm: MPI.Comm, wire: torch.dtype) -> torch.Tensor:
    """In-place sum over ``comm`` with messages in ``wire`` precision (see module doc).

    Each rank sends 2 (P-1)/P of the buffer, in ``wire``'s element size.
    Collective on ``comm``.
    """
    P, r = comm.Get_size(), comm.Get_rank()
    if P == 1:
        return flat.copy_(flat.to(wire).to(flat.dtype))
    chunks = list(torch.tensor_split(flat, P))
    right, left = (r + 1) % P, (r - 1) % P
    longest = max(c.numel() for c in chunks)
    # Messages on flat's device; isend/irecv stage them through host memory when needed.
    sbuf = torch.empty(longest, dtype=wire, device=flat.device)
    rbuf = torch.empty(longest, dtype=wire, device=flat.device)
    # Reduce-scatter: after P-1 steps rank r owns the full sum of chunk (r + 1) % P.
    for s in range(P - 1):
        send_c, recv_c = chunks[(r - s) % P], chunks[(r - s - 1) % P]
        sb, rb = sbuf[:send_c.numel()], rbuf[:recv_c.numel()]
        ops.pack([send_c], sb)  # fused cast into the 16-bit message
        reqs = [irecv(rb, left, comm, 741), isend(sb, right, comm, 741)]
        for q in reqs:
            q.wait()
        recv_c.add_(rb.to(flat.dtype))
    own = chunks[(r + 1) % P]
    own.copy_(own.to(wire).to(flat.dtype))  # the owner keeps what the others will get
    # Allgather the owned chunks around the ring.
    for s in range(P - 1):
        send_c, recv_c = chunks[(r + 1 - s) % P], chunks[(r - s) % P]
        sb, rb = sbuf[:send_c.numel()], rbuf[:recv_c.numel()]
        ops.pack([send_c], sb)  # fused cast into the 16-bit message
        reqs = [irecv(rb, left, comm, 742), isend(sb, right, comm, 742)]
        for q in reqs:
            q.wait()
        recv_c.copy_(rb)
    return flat


class HalfPrecision:
    def __init__(self, comm: MPI.Comm, wire: torch.dtype):
        self.comm, self.wire = comm, wire

    def average_grads(self, params) -> None:
        flat = _flat_grads(params).div_(self.comm.Get_size())  # average first: no overflow
        _set_grads(params, ring_allreduce_(flat, self.comm, self.wire))


def _top_indices(mag: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of ``mag``, exact ties broken towards the lower index.

    ``torch.topk`` breaks ties as its kernel happens to (the CPU and a GPU differ), and exact
    ties occur in real gradients (mirror-symmetric weights): every device must send the same
    entries. Not collective."""
    kth = torch.topk(mag, k, sorted=False).values.min()
    above = torch.nonzero(mag > kth).squeeze(1)
    tied = torch.nonzero(mag == kth).squeeze(1)[:k - above.numel()]
    idx = torch.cat([above, tied])
    # NaN compares false: keep topk's own choice so every rank still sends exactly k.
    return idx if idx.numel() == k else torch.topk(mag, k, sorted=False).indices


class TopK:
    """Top-k sparsification with error feedback. ``residual`` after a step holds exactly
    what was accumulated but not sent: sent + residual = gradient + previous residual."""

    def __init__(self, comm: MPI.Comm, ratio: float):
        self.comm, self.ratio = comm, ratio
        self.residual: torch.Tensor | None = None
        self.last_sent: torch.Tensor | None = None  # dense view of what this rank sent

    def average_grads(self, params) -> None:
        acc = _flat_grads(params)
        if self.residual is not None:
            acc.add_(self.residual)
        n = acc.numel()
        k = min(n, max(1, math.ceil(self.ratio * n)))
        idx = _top_indices(acc.abs(), k)
        vals = acc[idx]
        self.residual = acc.clone()
        self.residual[idx] = 0
        self.last_sent = torch.zeros_like(acc).index_put_((idx,), vals)
        all_idx = allgather(idx.to(torch.int64), self.comm)  # [P, k]
        all_vals = allgather(vals, self.comm)
        dense = torch.zeros_like(acc)
        # Rank by rank, so no call sees an index twice: a GPU's atomic adds cannot then
        # reorder the sums, and every rank gets the same bits (those of the CPU's order).
        for i, v in zip(all_idx, all_vals):
            dense.index_add_(0, i, v)
        _set_grads(params, dense.div_(self.comm.Get_size()))


class PowerSGD:
    def __init__(self, comm: MPI.Comm, rank: int, seed: int = 0):
        self.comm, self.rank, self.seed = comm, rank, seed
        self.state: dict[int, dict] = {}

    def _shape(self, p) -> tuple[int, int] | None:
        if p.ndim < 2:
            return None
        n, m = p.shape[0], p[0].numel()
        r = min(self.rank, n, m)
        return (n, m) if r * (n + m) < n * m or r == min(n, m) else None

    def average_grads(self, params) -> None:
        P = self.comm.Get_size()
        mats, rest = [], []
        for i, p in enumerate(params):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            (mats if self._shape(p) else rest).append((i, p))
        if rest:
            flat = _flat_grads([p for _, p in rest])
            allreduce_(flat, self.comm)
            _set_grads([p for _, p in rest], flat.div_(P))
        if not mats:
            return
        ms, ps = [], []
        for i, p in mats:
            n, m = self._shape(p)
            r = min(self.rank, n, m)
            st = self.state.get(i)
            if st is None:  # the same Q on every rank: a generator seeded alike everywhere
                # (a CPU one, so that a GPU run starts from the same Q as a CPU run)
                g = torch.Generator().manual_seed(self.seed * 100003 + i)
                q = torch.randn(m, r, generator=g, dtype=p.dtype).to(p.device)
                st = self.state[i] = {"q": q,
                                      "err": torch.zeros(n, m, dtype=p.dtype, device=p.device)}
            M = p.grad.reshape(n, m) + st["err"]
            ms.append(M)
            ps.append(M @ st["q"])
        # One allreduce for all P factors, one for all Q factors.
        pflat = allreduce_(torch.cat([x.reshape(-1) for x in ps]), self.comm).div_(P)
        off, qs = 0, []
        for (i, p), M in zip(mats, ms):
            st = self.state[i]
            n, r = M.shape[0], st["q"].shape[1]
            Pm = torch.linalg.qr(pflat[off:off + n * r].reshape(n, r)).Q
            off += n * r
            st["p"] = Pm
            qs.append(M.T @ Pm)
        qflat = allreduce_(torch.cat([x.reshape(-1) for x in qs]), self.comm).div_(P)
        off = 0
        for (i, p), M in zip(mats, ms):
            st = self.state[i]
            m, r = st["q"].shape
            st["q"] = qflat[off:off + m * r].reshape(m, r).clone()
            off += m * r
            approx = st["p"] @ st["q"].T
            st["err"] = M - approx
            p.grad.copy_(approx.reshape(p.shape))


def build_compressor(name: str, comm: MPI.Comm, *, topk_ratio: float, rank: int, seed: int):
    """The compressor named by ``sync.compression`` (None for "none"). Not collective."""
    if name == "none":
        return None
    if name in ("fp16", "bf16"):
        return HalfPrecision(comm, torch.float16 if name == "fp16" else torch.bfloat16)
    if name == "topk":
        return TopK(comm, topk_ratio)
    if name == "powersgd":
        return PowerSGD(comm, rank, seed)
    raise ValueError(f"sync.compression: unknown compression {name!r}")

