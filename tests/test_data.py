import gzip
import struct

import numpy as np
import pytest
import torch

from mltrain.data import (DataError, ShardLoader, open_dataset, partition, partition_all,
                          steps_per_epoch)

from conftest import SHARED_DATA


@pytest.mark.parametrize("kind", ["contiguous", "strided", "iid"])
@pytest.mark.parametrize("n, parts", [(10, 1), (10, 3), (1797, 4), (7, 7), (5, 8)])
def test_partition_disjoint_complete_balanced(kind, n, parts):
    parts_ = partition_all(n, parts, kind, seed=1)
    allidx = np.concatenate(parts_)
    assert sorted(allidx.tolist()) == list(range(n))  # every sample exactly once
    sizes = [len(p) for p in parts_]
    assert max(sizes) - min(sizes) <= 1
    for p in parts_:
        assert np.all(np.diff(p) > 0)


def test_partition_determinism_and_seed():
    a = partition(100, 4, 2, "iid", seed=1)
    assert np.array_equal(a, partition(100, 4, 2, "iid", seed=1))
    assert not np.array_equal(a, partition(100, 4, 2, "iid", seed=2))
    assert np.array_equal(partition(10, 3, 1, "strided"), [1, 4, 7])
    assert np.array_equal(partition(10, 3, 0, "contiguous"), [0, 1, 2, 3])
    with pytest.raises(ValueError):
        partition(10, 3, 3, "iid")
    with pytest.raises(ValueError):
        partition(10, 3, 0, "nope")


def test_strided_union_is_serial_batch():
    """The exactness argument: rank r's k-th local batch, unioned over r, is batch k."""
    n, P, B = 103, 3, 12
    b = B // P
    spe = steps_per_epoch(n, B)
    for k in range(spe):
        union = sorted(int(i) for r in range(P) for i in partition(n, P, r, "strided")[k*b:(k+1)*b])
        assert union == list(range(k * B, (k + 1) * B))


def test_loader_order_and_shuffle():
    x = torch.arange(20.0).reshape(20, 1)
    y = torch.arange(20)
    plain = ShardLoader(x, y, 4, 5, shuffle=False, seed=0, rank=0)
    assert plain.batch(3, 1)[1].tolist() == [4, 5, 6, 7]
    sh = ShardLoader(x, y, 4, 5, shuffle=True, seed=0, rank=0)
    epoch0 = torch.cat([sh.batch(0, s)[1] for s in range(5)])
    assert sorted(epoch0.tolist()) == list(range(20))
    assert not torch.equal(epoch0, torch.cat([sh.batch(1, s)[1] for s in range(5)]))
    again = ShardLoader(x, y, 4, 5, shuffle=True, seed=0, rank=0)
    assert torch.equal(again.batch(0, 2)[1], sh.batch(0, 2)[1])  # resumable
    with pytest.raises(ValueError):
        ShardLoader(x, y, 8, 3, shuffle=False, seed=0, rank=0)


def test_digits_and_synthetic():
    d = open_dataset("digits")
    assert (d.num_train, d.num_test, d.input_shape, d.num_classes) == (1438, 359, (1, 8, 8), 10)
    x, y = d.read_train(np.array([0, 5]))
    assert x.shape == (2, 1, 8, 8) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    s = open_dataset("synthetic", num_samples=100)
    assert s.num_train == 100 and s.num_test == 25
    assert np.array_equal(s.read_train(np.arange(3))[0],
                          open_dataset("synthetic", num_samples=100).read_train(np.arange(3))[0])


def write_idx(folder, n_train=30, n_test=10, rows=4, cols=5, gz=False):
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        img = rng.integers(0, 256, (n, rows, cols), dtype=np.uint8)
        lab = rng.integers(0, 10, n, dtype=np.uint8)
        lab[0] = 9
        for kind, arr, magic in (("images-idx3-ubyte", img, 0x0803),
                                 ("labels-idx1-ubyte", lab, 0x0801)):
            head = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
            data = head + arr.tobytes()
            name = folder / (f"{prefix}-{kind}" + (".gz" if gz else ""))
            name.write_bytes(gzip.compress(data) if gz else data)
        out[prefix] = (img, lab)
    return out


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reads_exact_samples(tmp_path, gz):
    ref = write_idx(tmp_path, gz=gz)
    d = open_dataset("idx", str(tmp_path))
    assert (d.num_train, d.num_test, d.input_shape, d.num_classes) == (30, 10, (1, 4, 5), 10)
    idx = np.array([7, 2, 29])
    x, y = d.read_train(idx)
    np.testing.assert_array_equal(x[:, 0], ref["train"][0][idx] / np.float32(255))
    np.testing.assert_array_equal(y, ref["train"][1][idx])
    xt, yt = d.read_test(np.array([9]))
    np.testing.assert_array_equal(yt, ref["t10k"][1][[9]])


def test_idx_errors(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        open_dataset("idx", str(tmp_path / "nope"))
    write_idx(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels"):
        open_dataset("idx", str(tmp_path))
    write_idx(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="magic"):
        open_dataset("idx", str(tmp_path))
    write_idx(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(DataError, match="truncated"):
        open_dataset("idx", str(tmp_path)).read_train(np.arange(3))


def test_real_mnist_if_shared_data_present():
    folder = SHARED_DATA / "mnist"
    if not folder.is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    d = open_dataset("idx", str(folder))
    assert (d.num_train, d.num_test, d.input_shape, d.num_classes) == (60000, 10000, (1, 28, 28), 10)
    x, y = d.read_train(np.array([0, 1]))
    assert y.tolist() == [5, 0]  # the first two MNIST training labels


def test_hdf5(tmp_path):
    import h5py

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 1, 3, 3), dtype=np.uint8)
    y = rng.integers(0, 4, 20)
    y[0] = 3
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["x"], f["y"], f["x_test"], f["y_test"] = x, y, x[:5], y[:5]
    d = open_dataset("hdf5", str(tmp_path / "d.h5"))
    assert (d.num_train, d.num_test, d.input_shape, d.num_classes) == (20, 5, (1, 3, 3), 4)
    for idx in (np.array([3, 4, 5]), np.array([9, 1, 17])):
        xr, yr = d.read_train(idx)
        np.testing.assert_array_equal(xr, x[idx] / np.float32(255))
        np.testing.assert_array_equal(yr, y[idx])
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["x"] = x
    with pytest.raises(DataError, match="'y'"):
        open_dataset("hdf5", str(tmp_path / "bad.h5"))
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="not a readable HDF5"):
        open_dataset("hdf5", str(tmp_path / "junk.h5"))
