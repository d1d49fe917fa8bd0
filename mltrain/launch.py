"""The MPI launcher that matches this environment, and how to start it.

mpi4py, PETSc and the launcher must all be the same MPI: an MPICH-wheel ``mpiexec``
starting an Open MPI build of mpi4py gives N separate one-rank jobs that each exit 0.
``tools/bootstrap.sh`` records which MPI the environment was built for in
``<venv>/.mltrain-mpi`` (mode, mpicc, mpiexec, libmpi); everything that starts ranks (the
Makefile, ``tools/run_tests.sh``, the tests, ``mltrain study``, ``mltrain jobscript``)
asks this module. Layer 0: no torch, no mpi4py import (it runs before either is needed).

    python -m mltrain.launch -n 4 python -m mltrain     # runs it
    python -m mltrain.launch --print -n 4              # prints the launch prefix
    python -m mltrain.launch --vendor                  # mpich | openmpi | intel | unknown

``MLTRAIN_MPIEXEC`` (a command line, e.g. ``"srun --mpi=pmi2"``) overrides the launcher;
``-n N`` is appended to it.
"""
from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
import sys

__all__ = ["clean_env", "mpi_family", "mpi_record", "mpiexec_argv", "mpiexec_path",
           "mpi_vendor", "vendor_of"]

# Variables through which a launcher wires its ranks (seen on ranks of Hydra and of Open
# MPI 4; PRTE for Open MPI 5). A launcher started from inside an MPI process must not
# inherit them: Hydra would join the outer job, Open MPI's mpiexec exits 1 with no output.
# Everything else, the site's settings included (OMPI_MCA_btl, HYDRA_HOST_FILE,
# PMIX_MCA_gds, I_MPI_*), is kept.
_WIRING_PREFIXES = ("PMI_", "PMIX_", "HYDI_", "PRTE_", "OMPI_COMM_WORLD_", "OMPI_MCA_ess",
                    "OMPI_MCA_orte_", "OMPI_MCA_pmix", "OMPI_MCA_initial_wdir",
                    "OMPI_MCA_shmem_RUNTIME_QUERY_hint", "OMPI_APP_CTX_", "OMPI_ARGV",
                    "OMPI_COMMAND", "OMPI_FILE_LOCATION", "OMPI_FIRST_RANKS",
                    "OMPI_NUM_APP_CTX", "OMPI_UNIVERSE_SIZE", "MPI_LOCALNRANKS",
                    "MPI_LOCALRANKID")
_KEEP_PREFIXES = ("PMIX_MCA_", "PRTE_MCA_")


def mpi_record(prefix: str | None = None) -> dict[str, str]:
    """What tools/bootstrap.sh recorded about the environment's MPI ({} if nothing).
    Not collective."""
    path = os.path.join(prefix or sys.prefix, ".mltrain-mpi")
    rec: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                key, sep, value = line.rstrip("\n").partition("=")
                if sep:
                    rec[key] = value
    except (OSError, UnicodeDecodeError):
        pass
    return rec


def mpiexec_path(prefix: str | None = None) -> str:
    """The mpiexec of the MPI that mpi4py in this environment uses. Not collective.

    The bootstrap's record first; then the environment's own (the MPICH wheel's); then the
    first on PATH.
    """
    prefix = prefix or sys.prefix
    rec = mpi_record(prefix)
    for cand in (rec.get("mpiexec", ""), os.path.join(prefix, "bin", "mpiexec")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return shutil.which("mpiexec") or "mpiexec"


def vendor_of(text: str) -> str:
    """``openmpi``, ``mpich``, ``intel`` or ``unknown`` from an MPI's own words (its
    library version string or ``mpiexec --version``). Not collective; pure."""
    if "Open MPI" in text or "OpenRTE" in text or "open-mpi" in text:
        return "openmpi"
    if "Intel(R) MPI" in text:
        return "intel"
    if "HYDRA" in text or "MPICH" in text:
        return "mpich"
    return "unknown"


@functools.lru_cache(maxsize=None)
def mpi_vendor(mpiexec: str | None = None) -> str:
    """The vendor of this environment's MPI from ``mpiexec --version`` (``vendor_of``).
    Starts a process: not for every rank of a job. Not collective."""
    exe = mpiexec or mpiexec_path()
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30,
                             env=clean_env(), stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return vendor_of(out.stdout + out.stderr)


def mpi_family(prefix: str | None = None) -> str:
    """``openmpi``, ``mpich`` (the MPICH ABI: MPICH, Intel MPI, Cray MPICH) or ``unknown``,
    from the soname of the libmpi the bootstrap recorded. Starts nothing, so every rank of
    a large job may ask. Not collective."""
    lib = os.path.basename(mpi_record(prefix).get("libmpi", ""))
    m = re.match(r"libmpi\w*\.so\.(\d+)", lib)
    return {"12": "mpich", "40": "openmpi"}.get(m.group(1), "unknown") if m else "unknown"


def clean_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) without the launcher wiring of an outer MPI job.
    Not collective."""
    env = dict(os.environ if env is None else env)
    for k in list(env):
        if k.startswith(_WIRING_PREFIXES) and not k.startswith(_KEEP_PREFIXES):
            del env[k]
    return env


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def mpiexec_argv(n: int, env: dict[str, str] | None = None,
                 prefix: str | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv prefix that starts ``n`` ranks, the environment to start it with).

    Not collective. The environment is cleaned of an outer job's wiring. With Open MPI,
    more ranks than cores need ``--oversubscribe`` and root needs its explicit consent
    (CI and containers run as root); MPICH's Hydra needs neither.
    """
    env = clean_env(env)
    override = env.get("MLTRAIN_MPIEXEC", "").strip()
    if override:
        return [*shlex.split(override), "-n", str(n)], env
    exe = mpiexec_path(prefix)
    argv = [exe, "-n", str(n)]
    if mpi_vendor(exe) == "openmpi":
        if n > _cores():
            argv.append("--oversubscribe")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return argv, env


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mltrain.launch", description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=1, help="number of ranks")
    ap.add_argument("--print", action="store_true", help="print the launch prefix and exit")
    ap.add_argument("--vendor", action="store_true", help="print the MPI vendor and exit")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="what to run on every rank")
    args = ap.parse_args(argv)
    if args.vendor:
        print(mpi_vendor())
        return 0
    if args.n < 1:
        print("mltrain: error: -n must be at least 1", file=sys.stderr)
        return 2
    prefix, env = mpiexec_argv(args.n)
    if args.print:
        print(shlex.join(prefix))
        return 0
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        print("mltrain: error: no command to launch", file=sys.stderr)
        return 2
    os.execvpe(prefix[0], [*prefix, *cmd], env)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
