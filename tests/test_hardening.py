"""Untrusted input without MPI: dataset files, config and hardware files, rank counts,
memory, signals. Each case asserts the error names the culprit."""
import os
import signal

import h5py
import numpy as np
import pytest

from mltrain.config import ConfigError, check_ranks, load_config, read_text, writable_folder
from mltrain.data import DataError, open_dataset


def _h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            if isinstance(value, str):
                f.create_group(name)
            else:
                f.create_dataset(name, data=value)
    return str(path)


GOOD_X = np.random.default_rng(0).random((20, 1, 4, 4)).astype(np.float32)
GOOD_Y = np.arange(20) % 5

BAD_HDF5 = [
    ("negative-labels", dict(x=GOOD_X, y=GOOD_Y - 1), "negative label -1"),
    ("float-labels", dict(x=GOOD_X, y=GOOD_Y + 0.5), "labels must be integers"),
    ("1-d-inputs", dict(x=np.arange(20.0), y=GOOD_Y), "at least one feature"),
    ("string-inputs", dict(x=np.array([b"a"] * 20), y=GOOD_Y), "/x has type |S1, expected numbers"),
    ("zero-samples", dict(x=np.zeros((0, 3), np.float32), y=np.zeros(0, np.int64)),
     "/x has no samples"),
    ("y-group", dict(x=GOOD_X, y="group"), "/y is a group"),
    ("0x0-images", dict(x=np.zeros((20, 1, 0, 0), np.float32), y=GOOD_Y), "holds nothing"),
    ("label-count", dict(x=GOOD_X, y=GOOD_Y[:10]), "/y has shape (10,), expected (20,)"),
    ("test-shape", dict(x=GOOD_X, y=GOOD_Y, x_test=GOOD_X[:, :, :3], y_test=GOOD_Y),
     "x_test samples have shape (1, 3, 4), x samples (1, 4, 4)"),
    ("test-labels", dict(x=GOOD_X, y=GOOD_Y, x_test=GOOD_X, y_test=GOOD_Y + 5),
     "y_test has label 9, but y has only classes 0..4"),
    ("test-half", dict(x=GOOD_X, y=GOOD_Y, x_test=GOOD_X), "only one of x_test and y_test"),
]


@pytest.mark.parametrize("data, message", [c[1:] for c in BAD_HDF5],
                         ids=[c[0] for c in BAD_HDF5])
def test_bad_hdf5_data_is_refused_at_open(tmp_path, data, message):
    path = _h5(tmp_path / "d.h5", **data)
    with pytest.raises(DataError) as err:
        open_dataset("hdf5", path)
    assert message in str(err.value) and "d.h5" in str(err.value)


def test_hdf5_data_reading_other_files_is_refused(tmp_path):
    path = tmp_path / "d.h5"
    _h5(path, y=GOOD_Y)
    with h5py.File(path, "a") as f:
        f["x"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/x")
    with pytest.raises(DataError, match="external link"):
        open_dataset("hdf5", str(path))
    with h5py.File(path, "a") as f:
        del f["x"]
        f.create_dataset("x", shape=(20, 4), dtype="f4", external=[("/etc/passwd", 0, 320)])
    with pytest.raises(DataError, match="external file"):
        open_dataset("hdf5", str(path))


def test_non_finite_inputs_are_found_in_the_ranks_partition(tmp_path):
    x = GOOD_X.copy()
    x[7, 0, 1, 1] = np.nan
    ds = open_dataset("hdf5", _h5(tmp_path / "d.h5", x=x, y=GOOD_Y))
    ds.read_train(np.arange(0, 7))  # the rank that does not hold sample 7 trains on
    with pytest.raises(DataError, match="sample 7 is not finite"):
        ds.read_train(np.array([9, 7, 3]))
    big = GOOD_X.astype(np.float64)
    big[2, 0, 0, 0] = 1e300  # finite in the file, infinite in float32
    ds = open_dataset("hdf5", _h5(tmp_path / "e.h5", x=big, y=GOOD_Y))
    with pytest.raises(DataError, match="sample 2 is not finite"):
        ds.read_train(np.arange(20))


def test_compressed_hdf5_data_is_accepted(tmp_path):
    """Data files may be chunked and compressed (checkpoints may not)."""
    path = tmp_path / "z.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=GOOD_X, compression="gzip", chunks=(5, 1, 4, 4))
        f.create_dataset("y", data=GOOD_Y)
    ds = open_dataset("hdf5", str(path))
    x, y = ds.read_train(np.arange(20))
    assert ds.num_classes == 5 and np.array_equal(x, GOOD_X) and np.array_equal(y, GOOD_Y)


def _idx(path, magic, dims, data):
    import struct

    path.write_bytes(struct.pack(">HBB", 0, 8, len(dims)) + struct.pack(f">{len(dims)}I", *dims)
                     + bytes(data))


def test_idx_test_split_must_match_training(tmp_path):
    _idx(tmp_path / "train-images-idx3-ubyte", 0x0803, (4, 3, 3), [1] * 36)
    _idx(tmp_path / "train-labels-idx1-ubyte", 0x0801, (4,), [0, 1, 2, 1])
    _idx(tmp_path / "t10k-images-idx3-ubyte", 0x0803, (2, 3, 2), [1] * 12)
    _idx(tmp_path / "t10k-labels-idx1-ubyte", 0x0801, (2,), [0, 1])
    with pytest.raises(DataError, match=r"test images are \(3, 2\), training images \(3, 3\)"):
        open_dataset("idx", str(tmp_path))
    _idx(tmp_path / "t10k-images-idx3-ubyte", 0x0803, (2, 3, 3), [1] * 18)
    _idx(tmp_path / "t10k-labels-idx1-ubyte", 0x0801, (2,), [0, 7])
    with pytest.raises(DataError, match="test label 7, but training labels are 0..2"):
        open_dataset("idx", str(tmp_path))
    _idx(tmp_path / "t10k-labels-idx1-ubyte", 0x0801, (2,), [0, 2])
    assert open_dataset("idx", str(tmp_path)).num_classes == 3


def test_config_files_must_be_regular_utf8_text(tmp_path):
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(fifo)  # would block forever if it were opened
    (tmp_path / "bin.toml").write_bytes(b"\x7fELF\x00\x01")
    with pytest.raises(ConfigError, match="a binary file"):
        load_config(tmp_path / "bin.toml")
    (tmp_path / "latin.toml").write_bytes(b'[run]\nout_dir = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(tmp_path / "latin.toml")
    with pytest.raises(ConfigError, match="--hardware .*: not a regular file"):
        read_text(fifo, "--hardware")
    with pytest.raises(ConfigError, match="--config .*: not a regular file"):
        load_config(tmp_path)  # a folder


@pytest.mark.parametrize("value, ok", [(1, True), (1 << 24, True), (0, False),
                                       ((1 << 24) + 1, False), (99999999999, False)])
def test_rank_counts_are_bounded(value, ok):
    if ok:
        assert check_ranks(value) == value
    else:
        with pytest.raises(ConfigError, match="--ranks: rank count"):
            check_ranks(value)


def test_divisors_of_large_rank_counts():
    from mltrain.planner.search import _divisors

    assert _divisors(1) == [1] and _divisors(12) == [1, 2, 3, 4, 6, 12]
    assert _divisors(49) == [1, 7, 49]
    big = 2 ** 12 * 3 ** 5
    assert _divisors(big) == [d for d in range(1, big + 1) if big % d == 0]


@pytest.mark.parametrize("override, message", [
    ("run.seed=18446744073709551616", "run.seed: 18446744073709551616 is above the maximum"),
    ("comm.bucket_mb=0", "comm.bucket_mb: 0.0 is below the minimum"),
    ("optim.lr=1e300", "optim.lr: 1e+300 is beyond float32"),
    ("run.threads=100000", "run.threads: 100000 is above the maximum 1024"),
])
def test_values_no_run_can_use_are_refused(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_float64_runs_may_use_large_scalars():
    assert load_config(None, ["run.dtype=float64", "optim.lr=1e300"]).optim.lr == 1e300


def test_memory_check_names_need_and_availability(monkeypatch):
    import mltrain.utils as u

    monkeypatch.setattr(u, "available_memory", lambda: 8 * 2 ** 30)
    u.check_memory(2 * 2 ** 30, "x", share=4)  # 2 GiB of 8 for 4 ranks: fits
    with pytest.raises(MemoryError, match=r"model: needs about 3.00 GiB per rank, but this "
                       r"node has 8.00 GiB available for 4 rank\(s\) \(2.00 GiB each\)"):
        u.check_memory(3 * 2 ** 30, "model", share=4)
    assert u.available_memory.__name__ == "<lambda>"
    monkeypatch.undo()
    free = u.available_memory()
    assert free is None or free > 0


def test_writable_folder_probe(tmp_path):
    assert writable_folder(tmp_path / "a" / "b", "--out").is_dir()
    assert os.listdir(tmp_path / "a" / "b") == []  # the probe is gone
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="--out: .* exists and is not a folder"):
        writable_folder(tmp_path / "f", "--out")
    with pytest.raises(ConfigError, match="not a writable folder"):
        writable_folder("/proc/mltrain-no", "--out")


def test_stop_signals_are_recorded_and_restored():
    from mltrain.train.trainer import StopSignals

    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as s:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert s.received == signal.SIGUSR1  # recorded, the process lives on
        os.kill(os.getpid(), signal.SIGTERM)
        assert s.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before
