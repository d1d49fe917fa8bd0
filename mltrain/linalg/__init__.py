"""Layer 2: parameter vectors and operators. ``petsc.py`` is the only module that imports
petsc4py; ``has_petsc`` says whether it can. The PETSc-backed vectors, curvature operators
and solvers arrive with the trust-region issue."""
from __future__ import annotations

import importlib.util

has_petsc: bool = importlib.util.find_spec("petsc4py") is not None

__all__ = ["has_petsc"]
