"""The one module that imports petsc4py.

``init`` must run after mpi4py has initialised MPI, so PETSc joins the same MPI world
instead of initialising its own. Not collective except where said.
"""
from __future__ import annotations

import glob
import importlib.util
import os

__all__ = ["init", "versions", "extension_path", "wrap", "touched", "log_event", "transfer_matrix", "check_options_used",
           "TRSubproblem", "NonFiniteError"]

_initialized = False


def init(options: list[str] | None = None):
    """Initialises PETSc (once) with extra command-line style options; returns the
    ``PETSc`` module. Collective on COMM_WORLD the first time."""
    global _initialized
    from mpi4py import MPI  # noqa: F401  (MPI first: PETSc then attaches to it)
    import petsc4py

    if not _initialized:
        petsc4py.init(["mltrain", *(options or [])])
        _initialized = True
    from petsc4py import PETSc

    return PETSc


def wrap(t, comm=None):
    """A PETSc Vec sharing ``t``'s memory (no copy): sequential when ``comm`` is None,
    else distributed over ``comm`` with ``t`` as this rank's local part (norms and dot
    products then reduce over ``comm``). ``t`` must be a contiguous float64 CPU tensor
    (PETSc's scalar); keep it alive as long as the Vec. After writing to ``t`` from torch,
    call ``touched(vec)``: PETSc caches norms and cannot see writes it did not make.
    Collective on ``comm`` if given.
    """
    import torch

    PETSc = init()
    if t.dtype != torch.float64 or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("wrap: needs a contiguous float64 CPU tensor (PETSc scalars)")
    arr = t.detach().numpy()  # host: checked above; PETSc's Vec shares this memory
    if comm is None:
        return PETSc.Vec().createWithArray(arr, comm=PETSc.COMM_SELF)
    return PETSc.Vec().createWithArray(arr, size=(t.numel(), PETSc.DECIDE), comm=comm)


def touched(vec) -> None:
    """Tells PETSc that ``vec``'s memory changed outside PETSc (drops cached norms)."""
    vec.stateIncrease()


class log_event:
    """``with log_event("mltrain_gradient"):`` times a block as a PETSc log event, shown
    by ``-log_view``. Not collective."""

    _events: dict = {}

    def __init__(self, name: str):
        PETSc = init()
        ev = self._events.get(name)
        if ev is None:
            ev = self._events[name] = PETSc.Log.Event(name)
        self.ev = ev

    def __enter__(self):
        self.ev.begin()
        return self

    def __exit__(self, *exc):
        self.ev.end()


def check_options_used(prefix: str = "mltrain_") -> None:
    """Raises ConfigError naming every option under ``prefix`` that no PETSc object read
    (a misspelt option would otherwise be ignored silently). Call it after the objects
    that read the prefix have called setFromOptions. Not collective."""
    from mltrain.config import ConfigError

    PETSc = init()
    opts = PETSc.Options()
    unused = sorted(k for k in opts.getAll() if k.startswith(prefix) and not opts.used(k))
    if unused:
        raise ConfigError("--petsc: option(s) not used by any mltrain solver (misspelt?): "
                          + ", ".join(f"-{k}" for k in unused))


def versions() -> dict[str, str]:
    """PETSc and petsc4py versions and PETSc's configuration (initialises PETSc)."""
    import petsc4py

    PETSc = init()
    major, minor, sub = PETSc.Sys.getVersion()
    cfg = petsc4py.get_config()
    return {"petsc": f"{major}.{minor}.{sub}", "petsc4py": petsc4py.__version__,
            "petsc_dir": cfg.get("PETSC_DIR", ""), "petsc_arch": cfg.get("PETSC_ARCH", ""),
            # Detected for the report only: mltrain's KSP vectors stay in host memory.
            "petsc_cuda": bool(PETSc.Sys.hasExternalPackage("cuda"))}


def extension_path() -> str | None:
    """Path of petsc4py's compiled PETSc module, found without importing (or initialising)
    it, so that a checker can dlopen it in a clean process."""
    spec = importlib.util.find_spec("petsc4py")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = list(spec.submodule_search_locations)[0]
    hits = sorted(glob.glob(os.path.join(root, "lib", "**", "PETSc*.so"), recursive=True))
    return hits[0] if hits else None


class NonFiniteError(ValueError):
    """A loss, gradient or curvature product that is not finite; the message names which."""


class _ShellContext:
    """petsc4py Python-matrix context: y = op(x) on float64 arrays. PETSc's vectors are
    host memory: with ``device`` not the CPU, ``op`` runs there and every product copies
    its vector in and out, counted in ``copies`` and ``copy_bytes``."""

    def __init__(self, op):
        self.op = op
        self.bad = False
        self.device = None  # the caller's vectors' device, set per solve
        self.copies = self.copy_bytes = 0

    def count(self, t):
        """Counts the copy of ``t`` between host and device that follows (none when the
        caller's vectors are on the CPU); returns ``t``."""
        if self.device is not None and self.device.type != "cpu":
            self.copies += 1
            self.copy_bytes += t.numel() * t.element_size()
        return t

    def mult(self, mat, x, y):
        import torch

        v = torch.from_numpy(x.getArray(readonly=True).copy())  # host: PETSc's vector
        out = self.op(self.count(v).to(self.device))  # no copy on the CPU
        if not bool(torch.isfinite(out).all()):
            # Raising inside a PETSc callback would unwind through C; flag it instead.
            self.bad = True
            out = torch.zeros_like(out)
        y.getArray()[:] = self.count(out).cpu().numpy()


class TRSubproblem:
    """min_s g.s + 1/2 s.H s subject to ||s|| <= radius, by a PETSc Krylov method
    (``stcg`` Steihaug-Toint CG, ``nash``, ``gltr``) on a shell matrix whose product is the
    caller's function. Options come from the database under ``options_prefix``
    (``-mltrain_tr_ksp_max_it 50``, ``-mltrain_tr_ksp_type gltr``, ...), which win over the
    arguments. Without ``comm`` the vectors are sequential: in data-parallel training every
    rank solves the same problem, its products already averaged. With ``comm`` (the layer
    axis of layer-parallel training) the vectors are distributed, ``n`` being this rank's
    part: the caller's product maps local parts to local parts.

    PETSc's vectors are host memory (petsc4py's CUDA vectors are not used): when the
    gradient lives on a GPU, a solve copies it to the host once, each product copies its
    vector to the device and the result back, and the step returns to the device once;
    ``host_copies`` counts them (zero on the CPU, where nothing is staged).

    Not collective itself (construction and solve are, on ``comm``); collective as far as
    the product function is.
    """

    def __init__(self, n: int, *, ksp_type: str = "stcg", max_it: int = 50,
                 rtol: float = 1e-6, options_prefix: str = "mltrain_tr_",
                 shared_prefix: str | None = None, comm=None):
        PETSc = init()
        self.PETSc = PETSc
        self.n = n
        self.prefix, self.shared = options_prefix, shared_prefix
        self.comm = comm
        self.ctx = _ShellContext(None)
        if comm is None:
            self.mat = PETSc.Mat().createPython([n, n], context=self.ctx, comm=PETSc.COMM_SELF)
        else:
            self.mat = PETSc.Mat().createPython([(n, None), (n, None)], context=self.ctx,
                                                comm=comm)
        self.mat.setUp()
        self.ksp = PETSc.KSP().create(PETSc.COMM_SELF if comm is None else comm)
        self.ksp.setOptionsPrefix(options_prefix)
        self.ksp.setType(ksp_type)
        self.ksp.getPC().setType("none")
        self.ksp.setOperators(self.mat)
        self.ksp.setTolerances(rtol=rtol, max_it=max_it)
        self.max_it = max_it
        self.b = (PETSc.Vec().createSeq(n, comm=PETSc.COMM_SELF) if comm is None else
                  PETSc.Vec().createMPI((n, None), comm=comm))
        self.x = self.b.duplicate()
        self._from_options()
        self.iterations = 0

    @property
    def host_copies(self) -> dict[str, int]:
        """Host<->device copies made so far (number and bytes; 0 on the CPU)."""
        return {"host_copies": self.ctx.copies, "host_copy_bytes": self.ctx.copy_bytes}

    def _from_options(self) -> None:
        from mltrain.config import ConfigError

        prefix = self.prefix
        try:
            if self.shared:  # the options every level shares, then this level's own
                self.ksp.setOptionsPrefix(prefix := self.shared)
                self.ksp.setFromOptions()
                self.ksp.setOptionsPrefix(prefix := self.prefix)
            self.ksp.setFromOptions()
        except self.PETSc.Error as e:  # e.g. -mltrain_tr_ksp_type nonsense
            self.ksp.setOptionsPrefix(self.prefix)
            raise ConfigError(f"--petsc: PETSc rejected the options under -{prefix}: "
                              f"{str(e).strip().splitlines()[-1]}") from None

    def solve(self, g, radius: float, op, max_it: int | None = None):
        """Returns (step s as float64 tensor on ``g``'s device, predicted reduction
        -m(s) >= 0, reason). ``op`` maps vectors on ``g``'s device. ``max_it`` caps this
        solve's iterations below the configured limit (a multilevel smoothing step's
        budget)."""
        import torch

        self.ctx.op = op
        self.ctx.device = g.device
        self.ctx.bad = False
        PETSc = self.PETSc
        PETSc.Options().setValue(f"{self.prefix}ksp_cg_radius", float(radius))
        # The configured limit first (a previous cap must not stick), then the options.
        self.ksp.setTolerances(max_it=self.max_it)
        self._from_options()  # the radius, and whatever the user set under the prefix
        if max_it is not None:
            self.ksp.setTolerances(max_it=min(max_it, self.ksp.getTolerances()[3]))
        self.b.getArray()[:] = -self.ctx.count(g.to(torch.float64)).cpu().numpy()
        self.x.set(0.0)
        self.ksp.solve(self.b, self.x)
        if self.comm is not None:  # a bad product on one rank is a bad solve on all
            from mpi4py import MPI

            self.ctx.bad = self.comm.allreduce(self.ctx.bad, op=MPI.LOR)
        if self.ctx.bad:
            raise NonFiniteError("curvature product is not finite (NaN or Inf)")
        reason = self.ksp.getConvergedReason()
        self.iterations = self.ksp.getIterationNumber()
        if reason < 0 and reason != PETSc.KSP.ConvergedReason.DIVERGED_MAX_IT:
            raise NonFiniteError(f"trust-region subproblem solver failed ({reason})")
        s = torch.from_numpy(self.x.getArray(readonly=True).copy())  # host: PETSc's vector
        return self.ctx.count(s).to(g.device), -float(self.ksp.getCGObjectiveValue()), reason

    def destroy(self) -> None:
        for obj in (self.ksp, self.mat, self.b, self.x):
            obj.destroy()


def transfer_matrix(kind: str, n_fine: int, cf: int, mode: str, width: int, comm=None):
    """The depth transfer as an assembled AIJ matrix acting on stacked layers flattened
    layer-major (``[N, width]`` -> a vector of N*width): restriction (``kind="R"``,
    (N/cf * width) x (N * width)) or prolongation (``kind="P"``, the other shape). Its
    depth weights are the reference kernels applied to the identity, so matrix and kernel
    agree to rounding. Rows are distributed over ``comm`` (PETSc's default layout), so it
    applies to distributed Vecs. Collective on ``comm`` if given.
    """
    import torch

    from mltrain.ops import prolong_reference, restrict_reference

    PETSc = init()
    if n_fine % cf:
        raise ValueError(f"transfer_matrix: {n_fine} layers are not divisible by cf = {cf}")
    nc = n_fine // cf
    # The weights of a PETSc matrix, which is assembled from host memory.
    if kind == "R":
        W = restrict_reference(torch.eye(n_fine, dtype=torch.float64), cf, mode)  # host: nc x N
    elif kind == "P":
        W = prolong_reference(torch.eye(nc, dtype=torch.float64), cf, mode)  # host: N x nc
    else:
        raise ValueError(f"transfer_matrix: kind must be 'R' or 'P', not {kind!r}")
    rows, cols = W.shape
    pcomm = PETSc.COMM_SELF if comm is None else comm
    A = PETSc.Mat().createAIJ([rows * width, cols * width], comm=pcomm)
    nnz_row = int((W != 0).sum(1).max())
    A.setPreallocationNNZ(nnz_row)
    lo, hi = A.getOwnershipRange()
    for r in range(lo, hi):
        i, m = divmod(r, width)
        js = torch.nonzero(W[i]).flatten().tolist()
        A.setValues([r], [j * width + m for j in js], [float(W[i, j]) for j in js])
    A.assemble()
    return A
