"""The one module that imports petsc4py.

``init`` must run after mpi4py has initialised MPI, so PETSc joins the same MPI world
instead of initialising its own. Not collective except where said.
"""
from __future__ import annotations

import glob
import importlib.util
import os

__all__ = ["init", "versions", "extension_path"]

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


def versions() -> dict[str, str]:
    """PETSc and petsc4py versions and PETSc's configuration (initialises PETSc)."""
    import petsc4py

    PETSc = init()
    major, minor, sub = PETSc.Sys.getVersion()
    cfg = petsc4py.get_config()
    return {"petsc": f"{major}.{minor}.{sub}", "petsc4py": petsc4py.__version__,
            "petsc_dir": cfg.get("PETSC_DIR", ""), "petsc_arch": cfg.get("PETSC_ARCH", "")}


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
    """petsc4py Python-matrix context: y = op(x) on float64 arrays."""

    def __init__(self, op):
        self.op = op
        self.bad = False

    def mult(self, mat, x, y):
        import torch

        out = self.op(torch.from_numpy(x.getArray(readonly=True).copy()))
        if not bool(torch.isfinite(out).all()):
            # Raising inside a PETSc callback would unwind through C; flag it instead.
            self.bad = True
            out = torch.zeros_like(out)
        y.getArray()[:] = out.numpy()


class TRSubproblem:
    """min_s g.s + 1/2 s.H s subject to ||s|| <= radius, by a PETSc Krylov method
    (``stcg`` Steihaug-Toint CG, ``nash``, ``gltr``) on a shell matrix whose product is the
    caller's function. Options come from the database under ``options_prefix``
    (``-mltrain_tr_ksp_max_it 50``, ``-mltrain_tr_ksp_type gltr``, ...), which win over the
    arguments. The vectors are sequential: in data-parallel training every rank solves the
    same problem, its products already averaged.

    Not collective itself; collective as far as the product function is.
    """

    def __init__(self, n: int, *, ksp_type: str = "stcg", max_it: int = 50,
                 rtol: float = 1e-6, options_prefix: str = "mltrain_tr_"):
        PETSc = init()
        self.PETSc = PETSc
        self.n = n
        self.prefix = options_prefix
        self.ctx = _ShellContext(None)
        self.mat = PETSc.Mat().createPython([n, n], context=self.ctx, comm=PETSc.COMM_SELF)
        self.mat.setUp()
        self.ksp = PETSc.KSP().create(PETSc.COMM_SELF)
        self.ksp.setOptionsPrefix(options_prefix)
        self.ksp.setType(ksp_type)
        self.ksp.getPC().setType("none")
        self.ksp.setOperators(self.mat)
        self.ksp.setTolerances(rtol=rtol, max_it=max_it)
        self.b = PETSc.Vec().createSeq(n, comm=PETSc.COMM_SELF)
        self.x = self.b.duplicate()
        self.ksp.setFromOptions()
        self.iterations = 0

    def solve(self, g, radius: float, op):
        """Returns (step s as float64 tensor, predicted reduction -m(s) >= 0, reason)."""
        import torch

        self.ctx.op = op
        self.ctx.bad = False
        PETSc = self.PETSc
        PETSc.Options().setValue(f"{self.prefix}ksp_cg_radius", float(radius))
        self.ksp.setFromOptions()  # the radius, and whatever the user set under the prefix
        self.b.getArray()[:] = -g.to(torch.float64).numpy()
        self.x.set(0.0)
        self.ksp.solve(self.b, self.x)
        if self.ctx.bad:
            raise NonFiniteError("curvature product is not finite (NaN or Inf)")
        reason = self.ksp.getConvergedReason()
        self.iterations = self.ksp.getIterationNumber()
        if reason < 0 and reason != PETSc.KSP.ConvergedReason.DIVERGED_MAX_IT:
            raise NonFiniteError(f"trust-region subproblem solver failed ({reason})")
        s = torch.from_numpy(self.x.getArray(readonly=True).copy())
        return s, -float(self.ksp.getCGObjectiveValue()), reason

    def destroy(self) -> None:
        for obj in (self.ksp, self.mat, self.b, self.x):
            obj.destroy()
