"""Which device a rank trains on (``run.device``), and what the node offers.

One rank per GPU is the layout supercomputers are run with: rank r of a node takes visible
GPU ``r mod (number visible)``. Schedulers restrict what is visible with
``CUDA_VISIBLE_DEVICES`` (SLURM's ``--gpus-per-task``, ``--gpu-bind``); the CUDA runtime
applies it before torch counts devices, so a rank that sees one GPU always takes that one.
"""
from __future__ import annotations

import os

import torch

__all__ = ["select_device", "cuda_aware_mpi", "device_report", "stage_host"]


def cuda_aware_mpi() -> bool:
    """Whether the user declared the MPI library able to read device memory
    (``MLTRAIN_CUDA_AWARE_MPI=1``); there is no portable run-time query, and guessing
    wrong crashes inside MPI, so staging through host memory is the default."""
    return os.environ.get("MLTRAIN_CUDA_AWARE_MPI") == "1"


def stage_host() -> bool:
    """``MLTRAIN_STAGE_HOST=1``: CPU tensors are staged through a separate host buffer as
    device tensors are, so the staged path's bookkeeping runs (and is tested) on machines
    without a GPU."""
    return os.environ.get("MLTRAIN_STAGE_HOST") == "1"


def select_device(want: str, local_rank: int) -> torch.device:
    """The device of a rank that is ``local_rank`` on its node, for ``run.device = want``
    (cpu, cuda, auto), made the current CUDA device. ValueError naming ``run.device``
    when cuda is asked for and none is visible. Not collective."""
    if want not in ("cpu", "cuda", "auto"):
        raise ValueError(f"run.device: {want!r} is not one of cpu, cuda, auto")
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = ("torch was built without CUDA" if torch.version.cuda is None else
               f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}, "
               "no driver or no GPU on this node")
        raise ValueError(f"run.device = cuda: no GPU is visible ({why}); use run.device = "
                         "auto or cpu")
    dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    return dev


def device_report() -> dict:
    """What this process sees: torch and CUDA versions, the visible GPUs and whether the
    MPI is declared CUDA-aware (for ``mltrain info``). Not collective."""
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2 ** 30, 1),
                         "capability": f"{p.major}.{p.minor}"})
    return {"torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
            "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpus": gpus, "cuda_aware_mpi": cuda_aware_mpi()}
