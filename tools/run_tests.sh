#!/usr/bin/env bash
# The whole suite: serial tests, then the MPI tests at 1, 2, 3 and 4 ranks (3 and 4
# oversubscribe a 2-core machine; each rank then runs one torch thread).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$here/.venv}
[[ $VENV == /* ]] || VENV=$PWD/$VENV
py=$VENV/bin/python
cd "$here"
# The mpiexec that matches mpi4py (MPICH wheel or the site's MPI), see mltrain/launch.py.
launch=("$py" -m mltrain.launch)
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1

echo "== serial tests"
"$py" -m pytest -q -p no:cacheprovider -m "not mpi" tests

for n in ${MLTRAIN_TEST_RANKS:-1 2 3 4}; do
  echo "== MPI tests on $n ranks"
  # `timeout` is the last line of defence against a hang the per-test timeout misses.
  timeout 1800 "${launch[@]}" -n "$n" "$py" -m mpi4py tests/mpi_pytest.py -q -p no:cacheprovider tests
done

# Other CPUs round the last bit differently (AVX2 instead of AVX-512 kernels in torch,
# another OpenBLAS core type under PETSc, MKL's reproducible mode): the exactness tests
# again under each. They compare decision sequences first and refuse a reference with a
# decision within round-off of its threshold, so they must hold under every setting.
variants=${MLTRAIN_CPU_VARIANTS-ATEN_CPU_CAPABILITY=avx2 OPENBLAS_CORETYPE=Haswell MKL_CBWR=COMPATIBLE}
for v in $variants; do
  for n in 2 3; do
    echo "== exactness tests on $n ranks with $v"
    env "$v" timeout 900 "${launch[@]}" -n "$n" "$py" -m mpi4py tests/mpi_pytest.py -q \
      -p no:cacheprovider -m "mpi and exactness" tests
  done
done

# Every axis of the grid at once (data 2 x pipe 2 x layer 2) needs 8 ranks: the tests of
# the layer-parallel pipeline, oversubscribed 4 to a core.
for n in ${MLTRAIN_GRID_RANKS:-8}; do
  echo "== MPI tests of the data x pipe x layer grid on $n ranks"
  timeout 900 "${launch[@]}" -n "$n" "$py" -m mpi4py tests/mpi_pytest.py -q -p no:cacheprovider \
    tests/test_pipeline.py -k layered
done
