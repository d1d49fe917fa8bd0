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
#   MLTRAIN_SYSTEM_MPI=1      use the MPI found on PATH (mpicc) instead of the MPICH wheel
#   PETSC_DIR / PETSC_ARCH    use an existing PETSc: only petsc4py is built against it
#   PETSC_CONFIGURE_OPTIONS   extra options for PETSc's configure (pip build)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$here/.venv}
PYTHON=${PYTHON:-python3}
PETSC_VERSION=3.26.1
stamp=$VENV/.mltrain-bootstrap

say() { printf '[bootstrap] %s\n' "$*" >&2; }
die() { printf '[bootstrap] error: %s\n' "$*" >&2; exit 1; }

# The stamp records what was installed from which inputs; any change redoes the affected part.
inputs_hash() {
  (cd "$here" && { find tools/bootstrap.sh tools/relocate_petsc.py requirements.txt setup.py pyproject.toml \
     csrc -type f 2>/dev/null || true; } | sort | xargs -r cat) | sha256sum | cut -c1-16
}
want="$(inputs_hash) ${MLTRAIN_SYSTEM_MPI:-0} ${PETSC_DIR:-}/${PETSC_ARCH:-}"
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
export PATH=$VENV/bin:$PATH

# ---- MPI + Python packages -----------------------------------------------------------
if [[ ${MLTRAIN_SYSTEM_MPI:-0} == 1 ]]; then
  command -v mpicc >/dev/null || die "MLTRAIN_SYSTEM_MPI=1 but no mpicc on PATH"
  say "building mpi4py against the system MPI ($(command -v mpicc))"
  grep -v -E '^(mpich|mpi4py)\b' "$here/requirements.txt" > "$VENV/.requirements-nompi.txt"
  pip install -r "$VENV/.requirements-nompi.txt"
  MPICC=$(command -v mpicc) pip install --no-binary mpi4py --no-cache-dir mpi4py
else
  pip install -r "$here/requirements.txt"
fi
mpicc=$(command -v mpicc) || die "no mpicc found after installing MPI"
mpicxx=$(command -v mpicxx || true)

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
  export MPICC=$mpicc MPICXX=${mpicxx:-}
  # Lean build: no Fortran, no X, optimized, BLAS/LAPACK from the system.
  export PETSC_CONFIGURE_OPTIONS="--with-fc=0 --with-x=0 --with-debugging=0 \
COPTFLAGS=-O2 CXXOPTFLAGS=-O2 --with-hwloc=0 --with-ssl=0 ${PETSC_CONFIGURE_OPTIONS:-}"
  mpi_id=$("$py" -c 'from mpi4py import MPI; print(MPI.Get_library_version())')
  key=$(printf '%s\n' "$PETSC_VERSION" "$PETSC_CONFIGURE_OPTIONS" "$mpi_id" \
        "$("$py" -c 'import sys; print(sys.version)')" "$(cc --version | head -n1)" |
        sha256sum | cut -c1-16)
  cache=${MLTRAIN_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mltrain/wheels}/petsc-$key
  if ! ls "$cache"/petsc-*.whl "$cache"/petsc4py-*.whl >/dev/null 2>&1; then
    say "building PETSc $PETSC_VERSION + petsc4py against $mpicc (once per machine: about"
    say "15-25 min on 2 cores; later environments reuse $cache)"
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
  if ! "$py" -c 'import petsc, petsc4py' 2>/dev/null; then
    pip install --no-deps --force-reinstall "$cache"/petsc-*.whl "$cache"/petsc4py-*.whl
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
