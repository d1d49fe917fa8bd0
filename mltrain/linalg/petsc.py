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
