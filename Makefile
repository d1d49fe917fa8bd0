# mltrain: `make demo` trains the built-in default on 2 ranks, `make test` runs every test.
# Both first install whatever is missing into .venv (tools/bootstrap.sh; seconds when
# nothing changed). Knobs: VENV=path, NP=ranks for the demo.
VENV ?= .venv
NP ?= 2
# The bootstrap and the test runner make VENV absolute themselves (builds run in temporary
# folders); quoted below, so a path with spaces stays one word.
PY = $(VENV)/bin/python
# The mpiexec of the MPI that mpi4py uses (the MPICH wheel's, or the site's in system-MPI
# mode), with Open MPI's oversubscribe/root settings when needed; MLTRAIN_MPIEXEC overrides.
LAUNCH = "$(PY)" -m mltrain.launch

.PHONY: venv demo test bench info clean

venv:
	@VENV="$(VENV)" bash tools/bootstrap.sh

demo: venv
	$(LAUNCH) -n $(NP) "$(PY)" -m mltrain

test: venv
	@VENV="$(VENV)" bash tools/run_tests.sh

bench: venv
	$(LAUNCH) -n 2 "$(PY)" -m mltrain bench dp --json bench-dp.json

info: venv
	"$(PY)" -m mltrain info

clean:
	rm -rf build mltrain/*.so mltrain.egg-info .test-logs runs
