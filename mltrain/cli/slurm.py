"""Start-up guards for srun steps: a step whose srun MPI plugin does not match the MPI of
the environment starts each task as its own 1-rank job (MPICH) or aborts inside MPI_Init
(Open MPI). ``mltrain.cli.main`` checks before MPI_Init (``slurm_wiring_guard``) and after
(``slurm_guard``); either prints one ``mltrain: error:`` line naming the right ``--mpi``
flag, and the caller exits 2 on every task. Not collective (each task decides alike from
the same step variables).
"""
from __future__ import annotations

import glob
import os
import sys

__all__ = ["missing_wiring", "slurm_guard", "slurm_mismatch", "slurm_wiring_guard"]


# Set in a process that an MPI launcher started (the size it announced).
_MPI_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


def _int_env(env, name: str) -> int:
    try:
        return int(env.get(name, ""))
    except ValueError:
        return 0


def _srun_tasks(env) -> int:
    """Tasks of the srun step this process is one of; 0 outside a step (the batch script
    itself has SLURM_PROCID but no step id) or when MLTRAIN_SLURM_GUARD=0 (tasks meant to
    train alone, a task farm)."""
    if env.get("MLTRAIN_SLURM_GUARD", "1") == "0" or "SLURM_PROCID" not in env:
        return 0
    if "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
        return 0
    return _int_env(env, "SLURM_STEP_NUM_TASKS") or _int_env(env, "SLURM_NTASKS")


def slurm_mismatch(env, world_size: int) -> int:
    """The number of tasks of the srun step this process is in when MPI sees only
    ``world_size`` = 1 of them (each task a separate 1-rank job: srun's MPI plugin does not
    match the MPI), else 0. Not collective; pure.

    Only when no MPI launcher announced a size equal to the world's: ranks of
    ``mpiexec -n 1`` inside an allocation, or of Hydra's proxies started with srun, are
    what their launcher asked for.
    """
    tasks = _srun_tasks(env)
    if world_size != 1 or tasks <= 1:
        return 0
    if any(_int_env(env, var) == world_size for var in _MPI_LAUNCHER_SIZE_VARS):
        return 0
    return tasks


def _open_mpi_speaks_pmi(libmpi: str) -> bool:
    """Whether the Open MPI of ``libmpi`` has its PMI-1/2 components (built --with-pmi),
    with which it can run under Slurm's own PMI library without any variable of srun."""
    d = os.path.dirname(libmpi)
    return any(glob.glob(os.path.join(d, *parts, "mca_pmix_s[12].so"))
               for parts in (("openmpi",), ("openmpi*",), ("openmpi", "lib", "openmpi*")))


def missing_wiring(env, family: str, mode: str = "system", libmpi: str = "") -> int:
    """The tasks of the srun step when it gives this MPI nothing to wire its ranks with,
    else 0. Not collective; pure but for a look at Open MPI's components; runs before
    MPI_Init, where Open MPI would abort and the MPICH wheel would reject PMIx.

    srun's plugin hands each task PMI-1/PMI-2 variables (``PMI_*``) or PMIx ones
    (``PMIX_*``); a launcher inside the step (mpiexec's ranks) sets them too. Decided only
    where it is certain: Open MPI with neither and no PMI components of its own (5.x and
    Debian's 4.1 speak only PMIx), and the MPICH wheel without PMI-1/2 ones (it has no
    PMIx). A site's MPICH, Intel or Cray MPI may read Slurm's PMI library directly; for
    those the check after MPI_Init (``slurm_mismatch``) decides."""
    tasks = _srun_tasks(env)
    if tasks <= 1:
        return 0
    has_pmi = any(k.startswith("PMI_") for k in env)
    has_pmix = any(k.startswith("PMIX_") and not k.startswith("PMIX_MCA_") for k in env)
    if family == "openmpi":
        ok = has_pmi or has_pmix or _open_mpi_speaks_pmi(libmpi)
    elif family == "mpich" and mode == "wheel":
        ok = has_pmi
    else:
        ok = True
    return 0 if ok else tasks


def slurm_wiring_guard(env) -> bool:
    """The start-up guard before MPI_Init: prints one ``mltrain: error:`` line (from SLURM
    task 0) naming the ``--mpi`` flag this MPI needs and returns True (the caller exits 2)
    when ``missing_wiring``. Not collective."""
    if not _srun_tasks(env) > 1:
        return False
    from mltrain.launch import mpi_family, mpi_record

    family, rec = mpi_family(), mpi_record()
    tasks = missing_wiring(env, family, rec.get("mode", "system"), rec.get("libmpi", ""))
    if tasks:
        _guard_error(env, tasks, family, "srun gave MPI no way to connect them")
    return bool(tasks)


def slurm_guard(world_size: int, library_version: str, env=None) -> bool:
    """The start-up guard after MPI_Init against srun steps whose tasks are each a 1-rank
    MPI job: prints one ``mltrain: error:`` line (from SLURM task 0) naming the ``--mpi``
    flag this MPI needs and returns True (the caller exits 2 on every task). Not
    collective: every task is its own job then, and all decide alike from the same step
    variables."""
    from mltrain.launch import vendor_of

    env = os.environ if env is None else env
    tasks = slurm_mismatch(env, world_size)
    if tasks:
        _guard_error(env, tasks, vendor_of(library_version), "MPI sees 1 rank in each")
    return bool(tasks)


def _guard_error(env, tasks: int, vendor: str, what: str) -> None:
    from mltrain.cli.jobscript import VENDOR_NAMES, srun_mpi_flag

    flag = srun_mpi_flag(vendor)
    fix = (f"{VENDOR_NAMES[vendor]} in this environment needs `srun --mpi={flag}`" if flag
           else "use `srun --mpi=pmi2` for MPICH or Intel MPI, `srun --mpi=pmix` for Open "
           "MPI")
    if env.get("SLURM_PROCID") == "0":
        print(f"mltrain: error: SLURM started {tasks} tasks in this step but {what}, so each "
              f"would train alone: {fix} (or the environment's mpiexec inside the "
              "allocation; `mltrain jobscript` writes the right line; MLTRAIN_SLURM_GUARD=0 "
              "if each task is meant to train alone)", file=sys.stderr, flush=True)
