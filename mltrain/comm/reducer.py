"""Bucketed, overlapped gradient averaging over the data-parallel communicator.

Parameters are grouped into buckets of about ``bucket_bytes`` in reverse registration
order (the order in which backward produces their gradients). A post-accumulate-grad hook
marks each parameter ready; when a bucket is complete its non-blocking allreduce starts,
while autograd goes on computing the earlier layers' gradients.

At most ``max_inflight`` allreduces are in flight at once (default 1); the next ready
bucket starts when the previous one completes, which the hooks check as backward goes on.
MPI libraries without an asynchronous progress thread (the common case) run concurrent
non-blocking collectives far slower than the same ones back to back (measured: five 8 MB
buckets, 16 ms all at once vs 7 ms in sequence), and a cache-sized bucket reduces faster
than one large buffer.

Buckets are always launched in index order, on every rank, whatever order the hooks fire
in: MPI matches collectives by call order, and a rank whose graph skipped a parameter
(unused on this batch) must not reorder its calls. Unused parameters contribute zeros.

Two modes (``grad_as_bucket_view``):

* view (default): each ``param.grad`` is a view into its bucket, so autograd accumulates
  straight into the buffer that MPI sends; no copies.
* copy: gradients are packed into the bucket with the fused pack kernel (scaled by 1/P
  on the way) and unpacked after the allreduce.

Buckets on a GPU (issue 20) are staged unless the MPI is declared CUDA-aware: when a bucket
is complete, a side stream copies it into its pinned host twin (after the kernels that wrote
it, by a stream wait), and the hooks start its allreduce once that copy's event has fired;
the result goes back to the device as soon as the allreduce completes. Copies and
communication overlap the rest of the backward pass. With a CUDA-aware MPI the bucket itself
is reduced, once the event of the kernels that wrote it has fired. ``MLTRAIN_STAGE_HOST=1``
(or ``staged=True``) stages CPU buckets the same way, synchronously, so that the
bookkeeping is tested where there is no GPU.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
from mpi4py import MPI

from mltrain import ops
from mltrain.comm.collectives import Handle, iallreduce_
from mltrain.utils.device import cuda_aware_mpi, stage_host

__all__ = ["GradReducer", "broadcast_parameters"]


class _Stage:
    """Where a bucket's allreduce reads: its pinned host twin (staged) or the bucket itself
    (a CUDA-aware MPI, or a CPU bucket), reachable once ``ready()``. Not collective."""

    def __init__(self, flat: torch.Tensor, staged: bool):
        self.flat, self.event = flat, None
        cuda = flat.is_cuda
        self.buf = (torch.empty(flat.numel(), dtype=flat.dtype, pin_memory=cuda)  # host: MPI reads it
                    if staged else flat)
        self.stream = torch.cuda.Stream(flat.device) if cuda else None

    @property
    def staged(self) -> bool:
        return self.buf is not self.flat

    def start(self) -> None:
        """After the kernels queued so far on the current stream (the bucket's last
        gradients, its scaling): copies it to the host twin on the side stream, or marks
        the point MPI may read it. Not collective."""
        if self.stream is None:
            if self.staged:
                self.buf.copy_(self.flat)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.flat.device))
        with torch.cuda.stream(self.stream):
            if self.staged:
                self.buf.copy_(self.flat, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(self.stream)

    def ready(self, block: bool = False) -> bool:
        """Whether MPI may read ``buf`` now (``block``: wait until it may)."""
        if self.event is None:
            return True
        if block:
            self.event.synchronize()
            return True
        return self.event.query()

    def back(self) -> None:
        """The reduced values into the bucket (queued on the current stream, so every
        later kernel sees them). Not collective."""
        if self.staged:
            self.flat.copy_(self.buf, non_blocking=self.stream is not None)


@dataclass
class _Bucket:
    index: int
    params: list[torch.nn.Parameter]
    offsets: list[int]
    flat: torch.Tensor
    stage: _Stage | None = None
    ready: set[int] = field(default_factory=set)
    primed: bool = False  # scaled (packed) and its stage started: ready for MPI
    handle: Handle | None = None
    ptrs: list[int] = field(default_factory=list)  # address of each slot (flat never moves)

    def __post_init__(self) -> None:
        size = self.flat.element_size()
        self.ptrs = [self.flat.data_ptr() + off * size for off in self.offsets]

    def holds(self, i: int, grad: torch.Tensor | None) -> bool:
        """Whether ``grad`` is (still) the view of slot i."""
        return grad is not None and grad.data_ptr() == self.ptrs[i]

    def view(self, i: int) -> torch.Tensor:
        p = self.params[i]
        return self.flat[self.offsets[i]:self.offsets[i] + p.numel()].view(p.shape)


class GradReducer:
    """Averages the gradients of ``params`` over ``comm`` during backward.

    Use per step: ``prepare()`` before the forward pass, ``loss.backward()``, then
    ``finish()`` before ``optimizer.step()``. Construction broadcasts nothing; call
    ``broadcast_parameters`` once so every rank starts from rank 0's weights.

    Collective on ``comm`` (``finish`` and the allreduces the hooks start).
    """

    def __init__(self, params, comm: MPI.Comm, bucket_bytes: int = 8 << 20,
                 grad_as_bucket_view: bool = True, max_inflight: int = 1,
                 staged: bool | None = None):
        """``staged``: reduce a host copy of each bucket (None: for GPU buckets unless
        ``MLTRAIN_CUDA_AWARE_MPI=1``, and for CPU buckets when ``MLTRAIN_STAGE_HOST=1``)."""
        if max_inflight < 1:
            raise ValueError("GradReducer: max_inflight must be at least 1")
        self.comm = comm
        self.staged = staged
        self.max_inflight = max_inflight
        self._inflight: deque[_Bucket] = deque()
        self.size = comm.Get_size()
        self.scale = 1.0 / self.size
        self.views = grad_as_bucket_view
        params = [p for p in params if p.requires_grad]
        if len({id(p) for p in params}) != len(params):
            raise ValueError("GradReducer: a parameter appears twice")
        self.buckets: list[_Bucket] = []
        self._slot: dict[int, tuple[_Bucket, int]] = {}
        self._build(params, max(1, int(bucket_bytes)))
        self._next = 0           # index of the next bucket to launch
        self._active = False     # between prepare() and finish()
        # On a GPU the hooks run on autograd's device thread: MPI may be called there only
        # at MPI_THREAD_SERIALIZED or above (the main thread waits in backward meanwhile);
        # below it, the hooks only start the copies and finish() posts.
        self._post_in_hooks = (not any(b.flat.is_cuda for b in self.buckets)
                               or MPI.Query_thread() >= MPI.THREAD_SERIALIZED)
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    # -- construction ---------------------------------------------------------------------
    def _build(self, params, bucket_bytes: int) -> None:
        # Group by (dtype, device): a bucket is one contiguous MPI buffer.
        groups: dict[tuple, list] = {}
        for p in reversed(params):
            groups.setdefault((p.dtype, p.device), []).append(p)
        for (dtype, device), plist in groups.items():
            cur: list = []
            nbytes = 0
            for p in plist:
                cur.append(p)
                nbytes += p.numel() * p.element_size()
                if nbytes >= bucket_bytes:
                    self._add_bucket(cur, dtype, device)
                    cur, nbytes = [], 0
            if cur:
                self._add_bucket(cur, dtype, device)

    def _add_bucket(self, plist, dtype, device) -> None:
        offsets, n = [], 0
        for p in plist:
            offsets.append(n)
            n += p.numel()
        flat = torch.zeros(n, dtype=dtype, device=device)
        staged = self.staged if self.staged is not None else (
            (flat.is_cuda and not cuda_aware_mpi()) or (not flat.is_cuda and stage_host()))
        b = _Bucket(len(self.buckets), list(plist), offsets, flat,
                    _Stage(flat, staged and self.size > 1))
        for i, p in enumerate(plist):
            self._slot[id(p)] = (b, i)
        self.buckets.append(b)

    @property
    def num_elements(self) -> int:
        return sum(b.flat.numel() for b in self.buckets)

    # -- per step -------------------------------------------------------------------------
    def prepare(self) -> None:
        """Arms the hooks for one backward pass. Not collective."""
        if self._active:
            raise RuntimeError("GradReducer.prepare() called twice without finish()")
        for b in self.buckets:
            b.ready.clear()
            b.handle = None
            b.primed = False
            if self.views:
                b.flat.zero_()
                for i, p in enumerate(b.params):
                    # No other reference may hold the view, or autograd accumulates
                    # out of place (it checks the grad's use count).
                    p.grad = b.view(i)
            else:
                for p in b.params:
                    p.grad = None  # autograd then writes fresh gradients, no zeroing pass
        self._next = 0
        self._inflight.clear()
        self._active = True

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._active:
            return
        b, i = self._slot[id(p)]
        if self.views and not b.holds(i, p.grad):
            # Autograd replaced the grad (e.g. a user zero_grad(set_to_none=True) or a
            # second reference to it): bring it back into the bucket.
            view = b.view(i)
            view.copy_(p.grad)
            p.grad = view
        b.ready.add(i)
        if len(b.ready) == len(b.params):
            self._prime(b)
        if self._post_in_hooks:
            self._pump()

    def _prime(self, b: _Bucket) -> None:
        """Scales (or packs) a complete bucket and starts its stage at once, whatever is in
        flight: on a GPU its copy to the host queues behind the gradients that filled it."""
        if self.views:
            if self.size > 1:
                b.flat.mul_(self.scale)  # a cache-sized bucket: cheap next to the allreduce
        else:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in b.params]
            ops.pack(grads, b.flat, self.scale)
        b.stage.start()
        b.primed = True

    def _launch(self, b: _Bucket) -> None:
        if not b.primed:
            self._prime(b)
        self._inflight.append(b)
        self._next = b.index + 1
        self._post_in_order()

    def _post_in_order(self) -> None:
        """Starts the launched buckets' allreduces in launch order, up to the first whose
        stage is not readable yet. A later bucket's copy may land first (GPU events fire
        in any order across ranks), but MPI matches collectives by call order: posting it
        ahead would pair different buckets on different ranks. Not collective."""
        for b in self._inflight:
            if not self._post(b, block=False):
                break

    def _post(self, b: _Bucket, block: bool) -> bool:
        """Starts ``b``'s allreduce once its stage is readable (``block``: waits for it);
        whether it is started."""
        if b.handle is None and b.stage.ready(block):
            # fenced: the stage's event says the writers are done (no stream sync needed)
            b.handle = iallreduce_(b.stage.buf, self.comm, fenced=True)
        return b.handle is not None

    def _retire(self, b: _Bucket) -> None:
        b.handle.wait()
        b.stage.back()

    def _pump(self) -> None:
        """Retires completed allreduces (testing also drives MPI's progress) and launches
        ready buckets, in order, while fewer than ``max_inflight`` are in flight."""
        self._post_in_order()
        while self._inflight and self._inflight[0].handle is not None \
                and self._inflight[0].handle.test():
            self._retire(self._inflight.popleft())
        while self._next < len(self.buckets) and len(self._inflight) < self.max_inflight:
            b = self.buckets[self._next]
            if not b.primed:
                break
            self._launch(b)

    def finish(self) -> None:
        """Launches what is left (unused parameters count as zero), waits, and leaves the
        averaged gradient in every ``param.grad``.

        Collective on ``comm``.
        """
        if not self._active:
            raise RuntimeError("GradReducer.finish() without prepare()")
        for b in self.buckets[self._next:]:
            if self.views:
                for i, p in enumerate(b.params):
                    if i not in b.ready:
                        p.grad = b.view(i)  # unused on this rank: its zeros join the sum
            b.ready = set(range(len(b.params)))
            # A GPU bucket's copy is queued before any wait; a CPU bucket is scaled when it
            # is launched, while it is still in cache for the allreduce.
            if not b.primed and b.flat.is_cuda:
                self._prime(b)
        while self._next < len(self.buckets):
            if len(self._inflight) >= self.max_inflight:
                head = self._inflight.popleft()
                self._post(head, block=True)
                self._retire(head)
            self._launch(self.buckets[self._next])
        while self._inflight:
            head = self._inflight.popleft()
            self._post(head, block=True)
            self._retire(head)
        for b in self.buckets:
            if self.views:
                for i, p in enumerate(b.params):
                    if not b.holds(i, p.grad):
                        p.grad = b.view(i)
            else:
                for p in b.params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                ops.unpack(b.flat, [p.grad for p in b.params])
        self._active = False

    def reduce(self) -> None:
        """Averages whatever is in ``param.grad`` now (no hooks: grads already computed).

        Collective on ``comm``.
        """
        if self.views:
            for b in self.buckets:
                for i, p in enumerate(b.params):
                    if p.grad is None:
                        b.view(i).zero_()
                    elif not b.holds(i, p.grad):
                        b.view(i).copy_(p.grad)
        self._active = True
        self._next = 0
        self._inflight.clear()
        for b in self.buckets:
            b.ready = set(range(len(b.params)))
            b.handle = None
            b.primed = False
        self.finish()

    def remove(self) -> None:
        """Removes the autograd hooks. Not collective."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


def broadcast_parameters(module: torch.nn.Module, comm: MPI.Comm, root: int = 0) -> None:
    """Overwrites every parameter and buffer with ``root``'s, one Bcast per dtype.

    Collective on ``comm``.
    """
    from mltrain.comm.collectives import broadcast_

    if comm.Get_size() == 1:
        return
    tensors = list(module.parameters()) + list(module.buffers())
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for (dtype, device), ts in sorted(groups.items(), key=lambda kv: str(kv[0])):
        data = [t.detach() for t in ts]
        flat = torch.empty(sum(t.numel() for t in data), dtype=dtype, device=device)
        with torch.no_grad():
            ops.pack(data, flat)
            broadcast_(flat, comm, root=root)
            ops.unpack(flat, data)
