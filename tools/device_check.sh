#!/usr/bin/env bash
# The device check of issue 20: one run on an NVIDIA GPU node, one report.
#
#   bash tools/device_check.sh [REPORT]          (default REPORT: device-report.md, or
#                                                  $OUT/device-report.md when OUT is set)
#
# For a GPU node as such nodes often are: a Python that already holds a CUDA torch (and
# perhaps mpi4py), no route to any package registry. Whatever else is needed travels as
# wheels in the folder WHEELS names (default: wheelhouse/, filled on a machine with a
# registry by `bash tools/device_check.sh --fetch-wheels`): the MPICH wheel, mpi4py,
# pytest-mpi. They go into a throw-away venv that sees the node's own packages.
#
# Sized to finish in under 8 minutes on one GPU: the GPU test subset at 1, 2 and 4 ranks
# sharing the GPU, then `bench dp --set run.device=cuda` at 1 and 2 ranks (mltrain against
# torch DDP and a plain single-process loop) on the residual MLP of width 4096, depth 16,
# batch 1024, and on the CNN. Every step's time limit comes out of one deadline (DEADLINE,
# default 450 s). Knobs: PYTHON (default python3), WHEELS, BUILD_EXT=1 (compile the C++
# CPU kernels against the node's torch; the GPU paths do not use them), QUICK=1 (a smaller
# model and fewer steps: to try the script itself, also on a CPU-only machine with
# ALLOW_CPU=1), STEPS and REPS (bench dp's, default 30 and 20).
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-$here/wheelhouse}
NEEDED="mpich mpi4py pytest-mpi"                 # always the carried ones
OPTIONAL="numpy h5py pytest pytest-timeout"      # only where the node lacks them
DEADLINE=${DEADLINE:-450}
left() { local r=$((DEADLINE - SECONDS)); ((r > 10)) && echo "$r" || echo 10; }
cap() { local l; l=$(left); ((l < $1)) && echo "$l" || echo "$1"; }

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  # The wheels for the node's Python (3.12 by default; PYVER=3.11 ...), from a machine with
  # a registry.
  mkdir -p "$WHEELS"
  exec "$PYTHON" -m pip download --only-binary=:all: --python-version "${PYVER:-3.12}" \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" $NEEDED $OPTIONAL
fi

report=${1:-${OUT:+$OUT/}device-report.md}
log=${report%.md}.log
: >"$report"
: >"$log"
say() { echo "$*" | tee -a "$report"; }
t_start=$SECONDS

say "# mltrain device check, $(date -u +%Y-%m-%dT%H:%MZ)"
say ""
say '```'
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$report"
else
  say "nvidia-smi: not found"
fi
"$PYTHON" - <<'EOF' 2>&1 | tee -a "$report"
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPUs visible: {torch.cuda.device_count()}")
EOF
say '```'
gpu=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [[ "$gpu" != 1 && "${ALLOW_CPU:-0}" != 1 ]]; then
  say "no GPU is visible to torch: nothing to check (ALLOW_CPU=1 tries the script on CPU)"
  exit 1
fi
device=cuda; [[ "$gpu" == 1 ]] || device=cpu

# A venv whose path also holds the node's packages (a .pth: the node's Python is often a
# venv itself, whose packages --system-site-packages would not see); the wheels fill in
# what the node lacks, ahead of the node's own (an mpi4py there is replaced by the carried
# one, which loads the carried MPICH from the venv).
venv=$(mktemp -d /tmp/mltrain-device-XXXX)/venv
# Without ensurepip (a distribution's Python lacking its venv package) the venv is made
# without pip; the node's pip, seen through the .pth below, then installs into it.
"$PYTHON" -m venv "$venv" >>"$log" 2>&1 || { rm -rf "$venv"; "$PYTHON" -m venv --without-pip "$venv" >>"$log" 2>&1; } ||
  { say "$PYTHON cannot make a venv (see $log): stopping"; exit 1; }
py=$venv/bin/python
"$PYTHON" -c "import site; print('\n'.join(site.getsitepackages()))" \
  >"$("$py" -c "import site; print(site.getsitepackages()[0])")/node-packages.pth"
if [[ -d "$WHEELS" ]]; then
  missing=""
  for m in $OPTIONAL; do
    "$py" -c "import ${m//-/_}" 2>/dev/null || missing="$missing $m"
  done
  "$py" -m pip install -q --no-index --find-links "$WHEELS" --force-reinstall --no-deps \
    $NEEDED >>"$log" 2>&1 || say "installing $NEEDED from $WHEELS failed (see $log)"
  [[ -z "$missing" ]] || "$py" -m pip install -q --no-index --find-links "$WHEELS" $missing \
    >>"$log" 2>&1 || say "installing$missing from $WHEELS failed (see $log)"
fi
for m in numpy h5py pytest pytest_timeout pytest_mpi; do
  "$py" -c "import $m" 2>/dev/null || { say "missing Python package $m (carry its wheel in $WHEELS): stopping"; exit 1; }
done
if ! "$py" -c "from mpi4py import MPI; MPI.Get_library_version()" >>"$log" 2>&1; then
  say "mpi4py cannot load an MPI library, and $WHEELS does not supply one: stopping"
  exit 1
fi
# The C++ kernels are CPU kernels: the GPU paths run the pure-torch references, so they are
# compiled against the node's torch only when asked (a failed build leaves the references).
export MLTRAIN_NO_EXT=1
if [[ "${BUILD_EXT:-0}" == 1 ]]; then
  if MAX_JOBS=8 timeout "$(cap 120)" "$py" setup.py build_ext --inplace >>"$log" 2>&1; then
    export MLTRAIN_NO_EXT=0
  else
    say "C++ extension: build failed, running without it (see $log)"
  fi
fi
export OMP_NUM_THREADS=1 PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
launch() { "$py" -m mltrain.launch "$@"; }

say ""
say "## GPU tests (tests/test_device.py, test_reducer.py, test_collectives.py: $device variants; the GPU shared by every rank)"
say ""
say "| ranks | result | seconds |"
say "|---|---|---|"
status=0
for n in 1 2 4; do
  t0=$SECONDS
  out=$(timeout "$(cap 120)" "$py" -m mltrain.launch -n "$n" "$py" -m mpi4py tests/mpi_pytest.py \
        -q -p no:cacheprovider tests/test_device.py tests/test_reducer.py tests/test_collectives.py \
        -k "$device" 2>&1)
  rc=$?
  echo "$out" >>"$log"
  line=$(echo "$out" | grep -E "passed|failed|error" | tail -1)
  [[ $rc == 0 ]] || status=1
  say "| $n | ${line:-exit $rc} | $((SECONDS - t0)) |"
done
serial=$(timeout "$(cap 60)" "$py" -m pytest -q -p no:cacheprovider -m "not mpi" tests/test_device.py \
         tests/test_device_audit.py 2>&1 | tail -1)
say ""
say "serial device tests: $serial"

say ""
say "## bench dp --set run.device=$device (mltrain vs torch DDP vs a plain PyTorch loop)"
say ""
if [[ "${QUICK:-0}" == 1 ]]; then
  shapes=("resnet 256 4 128" "cnn 32 2 128"); steps=6; reps=6
else
  shapes=("resnet 4096 16 1024" "cnn 32 2 1024"); steps=${STEPS:-30}; reps=${REPS:-20}
fi
say "| model | ranks | mltrain ms | DDP ms (backend) | plain ms | vs DDP | vs plain | reducer GB/s | raw host Allreduce GB/s | bandwidth ratio |"
say "|---|---|---|---|---|---|---|---|---|---|"
for shape in "${shapes[@]}"; do
  read -r model width depth batch <<<"$shape"
  for n in 1 2; do
    json=$(mktemp /tmp/bench-dp-XXXX.json)
    timeout "$(cap 150)" "$py" -m mltrain.launch -n "$n" "$py" -m mltrain bench dp --set run.device=$device \
      --set model.name=$model --set model.width=$width --set model.depth=$depth \
      --set data.batch_size=$batch --set run.threads=1 --steps $steps --reps $reps \
      --json "$json" >>"$log" 2>&1 || { say "| $model | $n | failed (see $log) |"; status=1; continue; }
    "$py" - "$json" "$model" <<'EOF' | tee -a "$report"
import json, sys
r = json.load(open(sys.argv[1]))
f = lambda v, d=2: "n/a (1 rank)" if v is None else f"{v:.{d}f}"
print(f"| {sys.argv[2]} {r['width']}x{r['depth']}, batch {r['global_batch']} | {r['ranks']} "
      f"| {r['mltrain_step_s'] * 1e3:.2f} | {r['ddp_step_s'] * 1e3:.2f} ({r['ddp_backend']}) "
      f"| {r['plain_step_s'] * 1e3:.2f} | {r['step_ratio_vs_ddp']:.3f} "
      f"| {r['step_ratio_vs_plain']:.3f} | {f(r['reducer_bandwidth_GBps'])} "
      f"| {f(r['raw_bandwidth_GBps'])} | {f(r['bandwidth_ratio_vs_raw'], 3)} |")
EOF
  done
done
say ""
say "Targets (issue 20): one-rank step within 1.05x of the plain loop; staged reducer's"
say "bandwidth at least 0.8x of the raw host-buffer Allreduce. Total $((SECONDS - t_start)) s."
exit $status
