"""``mltrain bench kernels``: every C++ kernel against its torch reference, same inputs,
same process, sizes 1e4 .. 1e8 elements. Speedup = reference time / kernel time (best of
several repetitions). Not collective (run it as one process)."""
from __future__ import annotations

import torch

from mltrain import ops
from mltrain.cli.timing import best_alone


def _cases(n: int):
    """(name, kernel, reference) closures on inputs of about n elements."""
    g = torch.Generator().manual_seed(0)
    parts = [n // 10 + (1 if i < n % 10 else 0) for i in range(10)]
    ts = [torch.randn(p, generator=g) for p in parts]
    flat_bf = torch.empty(n, dtype=torch.bfloat16)
    flat_f = torch.empty(n)
    outs = [torch.empty(p) for p in parts]
    layers = 8
    fine = torch.randn(layers, max(1, n // layers), generator=g)
    coarse = fine[::2].contiguous()
    bufs = [torch.randn(n, generator=g) for _ in range(4)]
    out = torch.empty(n)
    C = ops._C
    return [
        ("pack_fp32_to_bf16", lambda: C.pack(ts, flat_bf, 1.0),
         lambda: ops.pack_reference(ts, flat_bf, 1.0)),
        ("unpack_bf16_to_fp32", lambda: C.unpack(flat_bf, outs, 1.0),
         lambda: ops.unpack_reference(flat_bf, outs, 1.0)),
        ("pack_scaled_fp32", lambda: C.pack(ts, flat_f, 0.5),
         lambda: ops.pack_reference(ts, flat_f, 0.5)),
        ("restrict_injection", lambda: C.restrict_depth(fine, 2, "injection"),
         lambda: ops.restrict_reference(fine, 2, "injection")),
        ("restrict_full_weighting", lambda: C.restrict_depth(fine, 2, "full_weighting"),
         lambda: ops.restrict_reference(fine, 2, "full_weighting")),
        ("prolong_constant", lambda: C.prolong_depth(coarse, 2, "constant", 0),
         lambda: ops.prolong_reference(coarse, 2, "constant")),
        ("prolong_linear", lambda: C.prolong_depth(coarse, 2, "linear", 0),
         lambda: ops.prolong_reference(coarse, 2, "linear")),
        ("sum_4_buffers", lambda: C.sum_buffers(out, bufs),
         lambda: ops.sum_buffers_reference(out, bufs)),
        ("axpby", lambda: C.axpby(out, 0.5, bufs[0], 0.5, bufs[1]),
         lambda: ops.axpby_reference(out, 0.5, bufs[0], 0.5, bufs[1])),
    ]


def bench_kernels(sizes=(10**4, 10**5, 10**6, 10**7, 10**8)) -> dict:
    if not ops.has_ext:
        raise RuntimeError(f"bench kernels needs the C++ extension: {ops.ext_status()}")
    rows = []
    for n in sizes:
        for name, kernel, reference in _cases(n):
            t_k, t_r = best_alone(kernel), best_alone(reference)
            rows.append({"kernel": name, "elements": n, "kernel_s": t_k, "reference_s": t_r,
                         "speedup": t_r / t_k})
    largest = max(sizes)
    return {"threads": torch.get_num_threads(), "rows": rows,
            "speedup_at_largest": {r["kernel"]: r["speedup"] for r in rows
                                   if r["elements"] == largest}}
