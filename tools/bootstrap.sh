#!/usr/bin/env bash
# Installs everything mltrain needs into a virtual environment in the checkout (.venv by
# default). Idempotent: a second run checks a stamp and returns in about a second.
#
#   bash tools/bootstrap.sh            # create/complete .venv
#   VENV=/path/to/env bash tools/bootstrap.sh
#
# Environment knobs:
#   VENV                      where the environment lives (default: <checkout>/.venv)
#   PYTHON                    interpreter that creates it (default: python3)
#   MLTRAIN_SYSTEM_MPI=1      use the site's MPI (MPICC, else the first mpicc on PATH outside
#                             the environment) instead of the MPICH wheel; the environment
#                             remembers it, so later runs without the variable keep it
#   MLTRAIN_SYSTEM_MPI=0      go back to the MPICH wheel
#   PETSC_DIR / PETSC_ARCH    use an existing PETSc: only petsc4py is built against it
#   PETSC_CONFIGURE_OPTIONS   extra options for PETSc's configure (pip build)
#   MLTRAIN_WHEEL_CACHE       where PETSc builds are kept (default ~/.cache/mltrain/wheels)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$here/.venv}
# Every path absolute: pip builds PETSc in a temporary folder, where a relative compiler path
# (VENV=.venv from the Makefile) no longer exists.
[[ $VENV == /* ]] || VENV=$PWD/$VENV
PYTHON=${PYTHON:-python3}
PETSC_VERSION=3.26.1
stamp=$VENV/.mltrain-bootstrap
# Which MPI this environment was built for (mode, mpicc, mpiexec); read by the launcher
# (mltrain.launch), the Makefile and the tests, so they start the mpiexec mpi4py matches.
mpifile=$VENV/.mltrain-mpi

say() { printf '[bootstrap] %s\n' "$*" >&2; }
die() { printf '[bootstrap] error: %s\n' "$*" >&2; exit 1; }

# No MLTRAIN_SYSTEM_MPI: keep what the environment was built with (else the MPICH wheel).
if [[ -z ${MLTRAIN_SYSTEM_MPI:-} ]]; then
  MLTRAIN_SYSTEM_MPI=0
  [[ -f $mpifile ]] && grep -qx 'mode=system' "$mpifile" && MLTRAIN_SYSTEM_MPI=1
fi
[[ $MLTRAIN_SYSTEM_MPI == [01] ]] || die "MLTRAIN_SYSTEM_MPI must be 0 or 1, not '$MLTRAIN_SYSTEM_MPI'"

# The stamp records what was installed from which inputs; any change redoes the affected part.
inputs_hash() {
  (cd "$here" && { find tools/bootstrap.sh tools/relocate_petsc.py requirements.txt setup.py pyproject.toml \
     csrc -type f 2>/dev/null || true; } | sort | xargs -r cat) | sha256sum | cut -c1-16
}
# PATH without the environment's own bin: the site's mpicc, never the one an earlier
# MPICH-wheel set-up put in $VENV/bin.
venv_real=$(cd "$VENV" 2>/dev/null && pwd -P || printf '%s' "$VENV")
nopath=$(printf '%s' "$PATH" | tr ':' '\n' |
         { grep -v -x -F -e "$VENV/bin" -e "$venv_real/bin" || true; } | paste -sd: -)
mpicc=
if [[ $MLTRAIN_SYSTEM_MPI == 1 ]]; then
  # Resolved before the stamp check, so that a `module swap` of the MPI redoes the set-up.
  mpicc=${MPICC:-mpicc}
  [[ $mpicc == /* ]] || mpicc=$(PATH=$nopath command -v "$mpicc" || true)
  [[ -n $mpicc ]] || die "MLTRAIN_SYSTEM_MPI=1 but no ${MPICC:-mpicc} on PATH (load the MPI module, or set MPICC)"
fi
# The wheel cache is part of it: CI points it at an empty folder to prove a build from source.
want="$(inputs_hash) $MLTRAIN_SYSTEM_MPI $mpicc ${PETSC_DIR:-}/${PETSC_ARCH:-} ${MLTRAIN_WHEEL_CACHE:-}"
if [[ -f $stamp && "$(cat "$stamp")" == "$want" && -x $VENV/bin/python ]]; then
  exit 0
fi

# ---- BLAS/LAPACK (PETSc's configure needs them when it builds PETSc) ----------------
have_lapack() {
  ldconfig -p 2>/dev/null | grep -q 'liblapack\.so ' ||
    ls /usr/lib/*/liblapack.so /usr/lib64/liblapack.so /usr/lib/liblapack.so >/dev/null 2>&1
}
if [[ -z ${PETSC_DIR:-} ]] && ! have_lapack; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    say "installing libopenblas-dev (BLAS/LAPACK for PETSc)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq libopenblas-dev >/dev/null ||
      die "apt-get install libopenblas-dev failed"
  else
    die "BLAS/LAPACK development files are missing. Install them (Debian/Ubuntu:
  sudo apt-get install libopenblas-dev; RHEL: sudo dnf install openblas-devel) or point
  PETSC_DIR/PETSC_ARCH at an existing PETSc, then run this again."
  fi
fi

# ---- virtual environment -------------------------------------------------------------
if [[ ! -x $VENV/bin/python ]]; then
  "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' ||
    die "Python >= 3.11 is required (tomllib); set PYTHON=/path/to/python3.11"
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
py=$VENV/bin/python
pip() { "$py" -m pip --disable-pip-version-check -q "$@"; }

# ---- MPI + Python packages -----------------------------------------------------------
# The folder of the libmpi that this environment's mpi4py loads (empty if it cannot load).
mpi4py_libmpi() {
  "$py" -c "from mpi4py import MPI
import os
print(next(os.path.realpath(l.split()[-1]) for l in open('/proc/self/maps') if '/libmpi' in l))" \
    2>/dev/null || true
}
venv_real=$(cd "$VENV" && pwd -P)
mpi4py_req=$(grep -E '^mpi4py\b' "$here/requirements.txt")
if [[ $MLTRAIN_SYSTEM_MPI == 1 ]]; then
  [[ $mpicc != "$VENV"/* && $mpicc != "$venv_real"/* ]] ||
    die "MPICC=$mpicc lies inside the environment; point it at the site's MPI"
  mpibin=$(dirname "$mpicc")
  # Optional: some sites launch only with srun (Cray); mltrain.launch then needs
  # MLTRAIN_MPIEXEC for make demo / make test.
  mpiexec=$mpibin/mpiexec
  [[ -x $mpiexec ]] || mpiexec=$(PATH=$nopath command -v mpiexec || true)
  [[ -n $mpiexec ]] || say "warning: no mpiexec beside $mpicc or on PATH; set MLTRAIN_MPIEXEC (e.g. \"srun --mpi=pmi2\") to launch"
  export PATH=$mpibin:$VENV/bin:$PATH
  # The MPICH wheel would shadow the site's MPI (its libmpi and mpiexec in the environment).
  if "$py" -m pip show -q mpich >/dev/null 2>&1; then
    say "removing the MPICH wheel from $VENV (system MPI mode)"
    pip uninstall -y mpich
  fi
  grep -v -E '^(mpich|mpi4py)\b' "$here/requirements.txt" > "$VENV/.requirements-nompi.txt"
  pip install -r "$VENV/.requirements-nompi.txt"
  lib=$(mpi4py_libmpi)
  # mpi4py 4 does not say which mpicc built it: the record of the last build does.
  built_with=$(grep -s '^mpi4py_mpicc=' "$mpifile" | cut -d= -f2- || true)
  if [[ -z $lib || $lib == "$venv_real"/* || $built_with != "$mpicc" ]]; then
    say "building mpi4py against the system MPI ($mpicc)"
    MPICC=$mpicc pip install --force-reinstall --no-deps --no-binary mpi4py --no-cache-dir \
      "$mpi4py_req"
  fi
  lib=$(mpi4py_libmpi)
  [[ -n $lib ]] || die "mpi4py built against $mpicc does not load"
  [[ $lib != "$venv_real"/* ]] || die "mpi4py loads $lib from inside the environment, not the
  system MPI of $mpicc; remove $VENV and run this again"
else
  export PATH=$VENV/bin:$PATH
  pip install -r "$here/requirements.txt"
  mpicc=$VENV/bin/mpicc
  mpiexec=$VENV/bin/mpiexec
  [[ -x $mpicc && -x $mpiexec ]] || die "the MPICH wheel did not install mpicc/mpiexec into $VENV/bin"
  lib=$(mpi4py_libmpi)
  if [[ $lib != "$venv_real"/* ]]; then
    # Left from system MPI mode: mpi4py was built against the site's MPI.
    say "reinstalling mpi4py for the MPICH wheel"
    pip install --force-reinstall --no-deps --only-binary mpi4py "$mpi4py_req"
    lib=$(mpi4py_libmpi)
    [[ $lib == "$venv_real"/* ]] || die "mpi4py loads '$lib', not the MPICH wheel's libmpi"
  fi
fi
mpicxx=$(dirname "$mpicc")/mpicxx
[[ -x $mpicxx ]] || mpicxx=
mode=wheel; [[ $MLTRAIN_SYSTEM_MPI == 1 ]] && mode=system
printf 'mode=%s\nmpicc=%s\nmpiexec=%s\nlibmpi=%s\n' "$mode" "$mpicc" "$mpiexec" "$lib" > "$mpifile"
if [[ $mode == system ]]; then echo "mpi4py_mpicc=$mpicc" >> "$mpifile"; fi

# ---- PETSc + petsc4py ----------------------------------------------------------------
if [[ -n ${PETSC_DIR:-} ]]; then
  if ! "$py" -c 'import petsc4py' 2>/dev/null; then
    say "building petsc4py against PETSC_DIR=$PETSC_DIR PETSC_ARCH=${PETSC_ARCH:-}"
    pip install --no-build-isolation --no-cache-dir "petsc4py==$PETSC_VERSION"
  fi
else
  # pip's own wheel cache is keyed by the sdist alone: it would hand back a PETSc built with
  # other configure options or another MPI. Keep our own cache, keyed by what the build
  # depends on, so a fresh clone on this machine reuses a matching build and nothing else.
  export MPICC=$mpicc MPICXX=$mpicxx
  # Lean build: no Fortran, no X, no CUDA (a GPU login node's nvcc must not leak in),
  # optimized, BLAS/LAPACK from the system.
  export PETSC_CONFIGURE_OPTIONS="--with-fc=0 --with-x=0 --with-cuda=0 --with-debugging=0 \
COPTFLAGS=-O2 CXXOPTFLAGS=-O2 --with-hwloc=0 --with-ssl=0 ${PETSC_CONFIGURE_OPTIONS:-}"
  # Open MPI's version string ends in a NUL byte; bash would warn and drop it.
  mpi_id=$("$py" -c 'from mpi4py import MPI; print(MPI.Get_library_version().rstrip("\0 \n"))')
  key=$(printf '%s\n' "$PETSC_VERSION" "$PETSC_CONFIGURE_OPTIONS" "$mpi_id" \
        "$("$py" -c 'import sys; print(sys.version)')" "$(cc --version | head -n1)" |
        sha256sum | cut -c1-16)
  cache=${MLTRAIN_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mltrain/wheels}/petsc-$key
  if ! ls "$cache"/petsc-*.whl "$cache"/petsc4py-*.whl >/dev/null 2>&1; then
    say "building PETSc $PETSC_VERSION + petsc4py against $mpicc (once per machine and MPI:"
    say "10-35 min on 2 cores, depending on load; later environments reuse $cache)"
    mkdir -p "${cache%/*}"
    tmp=$(mktemp -d "${cache%/*}/.tmp.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    pip wheel --no-deps --no-cache-dir -w "$tmp" "petsc==$PETSC_VERSION"
    pip install --no-deps --force-reinstall "$tmp"/petsc-*.whl
    # No build isolation: petsc4py must see the PETSc just installed, not build another.
    PETSC_DIR= PETSC_ARCH= pip wheel --no-deps --no-cache-dir --no-build-isolation -w "$tmp" \
      "petsc4py==$PETSC_VERSION"
    rm -rf "$cache" && mv "$tmp" "$cache"  # publish whole builds only
    trap - EXIT
  fi
  # Installed from this build, not merely installed: a switch to the site's MPI leaves the
  # MPICH build of PETSc in place otherwise (it imports, and needs libmpi.so.12).
  if [[ "$(cat "$VENV/.mltrain-petsc" 2>/dev/null)" != "$key" ]] ||
     ! "$py" -c 'import petsc, petsc4py' 2>/dev/null; then
    pip install --no-deps --force-reinstall "$cache"/petsc-*.whl "$cache"/petsc4py-*.whl
    echo "$key" > "$VENV/.mltrain-petsc"
  fi
  # A PETSc or petsc4py wheel taken from pip's cache carries the absolute paths of the
  # environment it was first built in; point them at this environment's MPI and PETSc.
  "$py" "$here/tools/relocate_petsc.py" --venv "$VENV"
fi

# ---- mltrain itself (editable, builds the C++ extension in place) ---------------------
say "building mltrain and its C++ extension"
pip install --no-build-isolation --no-deps -e "$here"

# Checks that both MPI users load the same library; fails loudly otherwise.
"$py" -m mltrain info --check-mpi >/dev/null || die "MPI/PETSc consistency check failed:
  run '$py -m mltrain info' to see which MPI libraries mpi4py and PETSc load"

echo "$want" > "$stamp"
say "ready: $VENV"
