"""``mltrain info``: versions, the MPI library each component loads, threads and ranks."""
from __future__ import annotations

import os
import subprocess
import sys

# Run in a clean interpreter: load petsc4py's compiled module (and so libpetsc and the MPI
# it links) WITHOUT mpi4py loaded first, which would otherwise satisfy libpetsc's libmpi
# dependency by soname and hide a PETSc bound to another MPI. dlopen runs no init code.
_PROBE = r"""
import ctypes, sys
ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)
seen = []
for line in open("/proc/self/maps"):
    p = line.split()[-1]
    if ("libmpi" in p or "libpetsc" in p) and p not in seen:
        seen.append(p)
print("\n".join(seen))
"""


def mapped_libraries(*needles: str) -> list[str]:
    """Shared objects of this process whose path contains one of ``needles``."""
    out: list[str] = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                p = line.split()[-1]
                if any(n in p for n in needles) and p.startswith("/") and p not in out:
                    out.append(p)
    except OSError:
        pass
    return out


def cpu_model() -> str:
    """This machine's CPU model ("AMD EPYC 7B13", "Intel(R) Xeon(R) ..."): benchmark
    figures of chaotic trajectories differ between CPUs that round differently, so a result
    names the one it came from. From /proc/cpuinfo (its first ``model name``), else the
    platform's word for it. Not collective."""
    import platform

    try:
        with open("/proc/cpuinfo", errors="replace") as f:
            for _, line in zip(range(200), f):  # the first processor's block
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return " ".join(value.split())[:200]
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _mpi_of(paths: list[str]) -> str | None:
    for p in paths:
        if os.path.basename(p).startswith("libmpi"):
            return os.path.realpath(p)
    return None


def petsc_mpi_libraries() -> tuple[list[str], str]:
    """(libraries that loading petsc4py maps, error text). Not collective."""
    from mltrain.linalg.petsc import extension_path

    ext = extension_path()
    if ext is None:
        return [], "petsc4py is not installed"
    from mltrain.launch import clean_env

    # Launcher variables must not leak into the probe (it must not look like a rank).
    r = subprocess.run([sys.executable, "-c", _PROBE, ext], capture_output=True, text=True,
                       env=clean_env(), timeout=60)
    if r.returncode != 0:
        return [], r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "probe failed"
    return r.stdout.split(), ""


def gather_info() -> dict:
    """Everything ``mltrain info`` prints, as a dict. Not collective."""
    import h5py
    import mpi4py
    import numpy
    import torch
    from mpi4py import MPI

    from mltrain import __version__, ops
    from mltrain.linalg import has_petsc

    from mltrain.launch import mpi_record, mpiexec_path
    from mltrain.utils.device import device_report

    comm = MPI.COMM_WORLD
    info = {
        "mltrain": __version__,
        "python": sys.version.split()[0],
        "cpu": cpu_model(),
        # Open MPI's version string ends in a NUL byte.
        "mpi_library": MPI.Get_library_version().strip("\0 \n").splitlines()[0],
        "mpi_mode": mpi_record().get("mode", "unknown"),
        "mpiexec": mpiexec_path(),
        "mpi_standard": "{}.{}".format(*MPI.Get_version()),
        "mpi4py": mpi4py.__version__,
        "mpi4py_libmpi": _mpi_of(mapped_libraries("libmpi")),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "cxx_extension": ops.ext_status(),
        "ranks": comm.Get_size(),
        "torch_threads": torch.get_num_threads(),
        "petsc": None, "petsc4py": None, "petsc_libmpi": None, "same_mpi": None,
    }
    dev = device_report()
    info["torch_cuda"] = dev["cuda"]
    info["gpus"] = ", ".join(f"{g['index']}: {g['name']} ({g['memory_gib']} GiB, sm "
                             f"{g['capability']})" for g in dev["gpus"]) or "none visible"
    info["cuda_visible_devices"] = dev["visible_devices"]
    info["cuda-aware MPI"] = ("declared (MLTRAIN_CUDA_AWARE_MPI=1)" if dev["cuda_aware_mpi"]
                              else "not declared: device buffers are staged through host memory")
    if has_petsc:
        from mltrain.linalg.petsc import versions

        libs, err = petsc_mpi_libraries()
        info["petsc_libmpi"] = _mpi_of(libs) or (f"(not found: {err})" if err else None)
        info["same_mpi"] = info["petsc_libmpi"] == info["mpi4py_libmpi"]
        v = versions()
        info["petsc"] = v["petsc"]
        info["petsc4py"] = v["petsc4py"]
        info["petsc_dir"] = v["petsc_dir"]
        info["petsc_cuda"] = (("built with CUDA" if v["petsc_cuda"] else "built without CUDA")
                              + "; trust-region solves copy GPU vectors through host memory")
    return info


def run_info(check_mpi: bool = False) -> int:
    """Prints the report on rank 0. With ``check_mpi``, exits 1 unless mpi4py and PETSc
    load the same MPI library."""
    from mpi4py import MPI

    from mltrain.comm import node_rank
    from mltrain.utils.device import select_device

    info = gather_info()
    # The run.device = auto mapping: node-local rank modulo the GPUs this rank sees.
    comm = MPI.COMM_WORLD
    local, _ = node_rank(comm)
    mapping = comm.gather((MPI.Get_processor_name(), local, str(select_device("auto", local))))
    if comm.Get_rank() == 0:
        for r, (host, lr, dev) in enumerate(mapping):
            info[f"device of rank {r}"] = f"{dev} (node {host}, local rank {lr})"
        width = max(map(len, info))
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    if check_mpi and not info["same_mpi"]:
        if MPI.COMM_WORLD.Get_rank() == 0:
            print("error: mpi4py and PETSc load different MPI libraries (or PETSc is "
                  "missing); see mpi4py_libmpi and petsc_libmpi above", file=sys.stderr)
        return 1
    return 0
