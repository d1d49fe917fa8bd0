"""Kernels: the C++ extension when it is built, a pure-torch reference otherwise.

``has_ext`` says which one runs. ``MLTRAIN_NO_EXT=1`` forces the references (for tests and
for benchmarks that compare the two). Nothing here communicates.
"""
from __future__ import annotations

import os

_C = None
_ext_error = None
if os.environ.get("MLTRAIN_NO_EXT") != "1":
    try:
        import torch  # noqa: F401  (the extension needs libtorch loaded first)

        from mltrain import _C  # type: ignore[attr-defined]
    except ImportError as e:  # not built: the references run
        _ext_error = str(e)

has_ext: bool = _C is not None


def ext_status() -> str:
    """A one-line description for ``mltrain info``."""
    if has_ext:
        return f"built ({_C.__file__})"
    if os.environ.get("MLTRAIN_NO_EXT") == "1":
        return "disabled by MLTRAIN_NO_EXT=1 (pure-torch references)"
    return f"not built ({_ext_error}); pure-torch references run"


from mltrain.ops.pack import pack, pack_reference, unpack, unpack_reference  # noqa: E402
from mltrain.ops.reduce import (axpby, axpby_reference, sum_buffers,  # noqa: E402
                                sum_buffers_reference)
from mltrain.ops.residual import (residual_mask, residual_masks,  # noqa: E402
                                  residual_masks_reference, residual_step, residual_vjp,
                                  residual_steps, residual_steps_reference,
                                  residual_sweep, residual_sweep_reference,
                                  residual_vjp_sweep, residual_vjp_sweep_reference)
from mltrain.ops.transfer import (PROLONGATIONS, RESTRICTIONS, prolong,  # noqa: E402
                                  prolong_reference, restrict, restrict_reference)

__all__ = ["has_ext", "ext_status", "pack", "unpack", "pack_reference", "unpack_reference",
           "sum_buffers", "sum_buffers_reference", "axpby", "axpby_reference", "restrict",
           "restrict_reference", "prolong", "prolong_reference", "RESTRICTIONS",
           "PROLONGATIONS", "residual_sweep", "residual_sweep_reference", "residual_masks",
           "residual_masks_reference", "residual_steps", "residual_steps_reference",
           "residual_vjp_sweep", "residual_vjp_sweep_reference", "residual_step",
           "residual_mask", "residual_vjp"]
