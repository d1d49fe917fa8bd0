"""The launcher that matches mpi4py (mltrain.launch): the bootstrap's record, Open MPI's
settings, a cleaned environment, and a real launch from inside an MPI process."""
import os
import subprocess
import sys

import pytest

from mltrain import launch
from mltrain.launch import clean_env, mpi_record, mpiexec_argv, mpiexec_path

from conftest import ROOT

# Each rank writes its world size in one write (two ranks' lines may interleave otherwise).
SIZE = ("import sys; from mpi4py import MPI; "
        "sys.stdout.write(f'<{MPI.COMM_WORLD.Get_size()}>\\n'); sys.stdout.flush()")


def test_record_names_this_environments_mpiexec():
    rec = mpi_record()
    if not rec:
        pytest.skip("this environment was not made by tools/bootstrap.sh")
    assert rec["mode"] in ("wheel", "system")
    assert mpiexec_path() == rec["mpiexec"] and os.access(rec["mpiexec"], os.X_OK)
    if rec["mode"] == "wheel":
        assert rec["mpiexec"].startswith(sys.prefix)
    else:  # the site's MPI: nothing of MPI inside the environment
        assert not rec["libmpi"].startswith(os.path.realpath(sys.prefix))


def test_record_parsing(tmp_path):
    (tmp_path / ".mltrain-mpi").write_text("mode=system\nmpiexec=/opt/x=y/bin/mpiexec\nnoise\n")
    assert mpi_record(str(tmp_path)) == {"mode": "system", "mpiexec": "/opt/x=y/bin/mpiexec"}
    (tmp_path / ".mltrain-mpi").write_bytes(b"\xff\xfe")
    assert mpi_record(str(tmp_path)) == {}
    assert mpi_record(str(tmp_path / "none")) == {}


def test_clean_env_drops_wiring_keeps_settings():
    # What ranks of Hydra and Open MPI 4 carry (wiring), and site settings (kept).
    wiring = {"PMI_RANK": "0", "PMI_FD": "5", "HYDI_CONTROL_FD": "4", "MPI_LOCALRANKID": "0",
              "PMIX_NAMESPACE": "x", "PMIX_SERVER_URI4": "u", "OMPI_COMM_WORLD_SIZE": "1",
              "OMPI_MCA_ess": "pmi", "OMPI_MCA_orte_hnp_uri": "u", "OMPI_MCA_pmix": "^s1",
              "OMPI_UNIVERSE_SIZE": "2", "OMPI_FILE_LOCATION": "/tmp/x", "PRTE_LAUNCHED": "1"}
    settings = {"OMPI_MCA_btl": "self,vader", "OMPI_MCA_coll_hcoll_enable": "0",
                "HYDRA_HOST_FILE": "/h", "HYDRA_BOOTSTRAP": "slurm", "PMIX_MCA_gds": "hash",
                "I_MPI_HYDRA_IFACE": "ib0", "OMPI_ALLOW_RUN_AS_ROOT": "1", "PATH": "/bin",
                "SLURM_JOB_ID": "7", "PRTE_MCA_x": "y"}
    assert clean_env({**wiring, **settings}) == settings


@pytest.mark.parametrize("vendor", ["openmpi", "mpich"])
def test_open_mpi_gets_oversubscribe_and_root_consent(monkeypatch, vendor):
    monkeypatch.setattr(launch, "mpi_vendor", lambda exe=None: vendor)
    monkeypatch.setattr(launch, "_cores", lambda: 2)
    monkeypatch.setattr(launch, "mpiexec_path", lambda prefix=None: "/x/mpiexec")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    argv, env = mpiexec_argv(4, {"PATH": "/bin", "PMI_RANK": "3"})
    assert argv[:3] == ["/x/mpiexec", "-n", "4"] and "PMI_RANK" not in env
    if vendor == "openmpi":
        assert "--oversubscribe" in argv and env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"
        assert "--oversubscribe" not in mpiexec_argv(2, {})[0]  # fits the cores
    else:
        assert argv == ["/x/mpiexec", "-n", "4"] and "OMPI_ALLOW_RUN_AS_ROOT" not in env


def test_family_and_vendor(tmp_path):
    from mltrain.launch import mpi_family, vendor_of

    for lib, family in (("/usr/lib/libmpi.so.40.30.4", "openmpi"), ("/v/lib/libmpi.so.12", "mpich"),
                        ("/opt/cray/lib/libmpi_cray.so.12", "mpich"), ("", "unknown"),
                        ("/x/libfoo.so.1", "unknown")):
        (tmp_path / ".mltrain-mpi").write_text(f"mode=system\nlibmpi={lib}\n")
        assert mpi_family(str(tmp_path)) == family, lib
    assert vendor_of("Open MPI v4.1.4, package: Debian OpenMPI\0") == "openmpi"
    assert vendor_of("Intel(R) MPI Library 2021.10") == "intel"
    assert vendor_of("HYDRA build details:") == vendor_of("MPICH Version: 5.0.2") == "mpich"
    assert vendor_of("something else") == "unknown"


def test_override(monkeypatch):
    argv, _ = mpiexec_argv(3, {"MLTRAIN_MPIEXEC": "srun --mpi=pmi2 --cpu-bind=cores"})
    assert argv == ["srun", "--mpi=pmi2", "--cpu-bind=cores", "-n", "3"]


def test_launch_from_inside_an_mpi_process():
    """A process that initialised MPI (a singleton, as `mltrain study` may be) starts a
    2-rank job through mltrain.launch; the job is one job of 2 ranks (with Open MPI the
    singleton's variables used to make the child mpiexec exit 1 with no output)."""
    code = ("from mpi4py import MPI; import subprocess, sys; "
            "from mltrain.launch import mpiexec_argv; "
            "assert MPI.COMM_WORLD.Get_size() == 1; "
            "argv, env = mpiexec_argv(2); "
            "r = subprocess.run(argv + [sys.executable, '-c', SIZE], env=env, "
            "capture_output=True, text=True, timeout=120); "
            "print(r.returncode, r.stdout.count('<2>'), r.stderr[-500:])").replace(
                "SIZE", repr(SIZE))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=180, cwd=ROOT, env=clean_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("0 2 "), r.stdout + r.stderr


def test_module_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mltrain.launch", "--print", "-n", "3"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and " -n 3" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "mltrain.launch", "-n", "2", sys.executable,
                        "-c", SIZE], capture_output=True, text=True, timeout=120,
                       env=clean_env())
    assert r.returncode == 0 and r.stdout.count("<2>") == 2, r.stdout + r.stderr
    bad = subprocess.run([sys.executable, "-m", "mltrain.launch", "-n", "0", "true"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("mltrain: error:")
