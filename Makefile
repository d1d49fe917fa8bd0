# mltrain: `make demo` trains the built-in default on 2 ranks, `make test` runs every test.
# Both first install whatever is missing into .venv (tools/bootstrap.sh; seconds when
# nothing changed). Knobs: VENV=path, NP=ranks for the demo.
VENV ?= .venv
NP ?= 2
PY := $(VENV)/bin/python
# The environment's own mpiexec (MPICH wheel) when it has one, else the system's.
MPIEXEC = $(shell if [ -x $(VENV)/bin/mpiexec ]; then echo $(VENV)/bin/mpiexec; else echo mpiexec; fi)

.PHONY: venv demo test bench info clean

venv:
	@VENV=$(VENV) bash tools/bootstrap.sh

demo: venv
	$(MPIEXEC) -n $(NP) $(PY) -m mltrain

test: venv
	@VENV=$(VENV) bash tools/run_tests.sh

bench: venv
	$(MPIEXEC) -n 2 $(PY) -m mltrain bench dp --json bench-dp.json

info: venv
	$(PY) -m mltrain info

clean:
	rm -rf build mltrain/*.so mltrain.egg-info .test-logs runs
