import gzip
import struct

import numpy as np
import pytest
import torch

from mltrain.config import ConfigError
from mltrain.data import (DataError, ShardLoader, open_dataset, partition, partition_all,
                          partition_stats, steps_per_epoch)

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


def _labels(n=1000, k=10, seed=3):
    return np.random.default_rng(seed).integers(0, k, n)


@pytest.mark.parametrize("kind, opts", [
    ("shards", {"shards_per_rank": 2}), ("shards", {"shards_per_rank": 5}),
    ("dirichlet", {"alpha": 0.3, "min_size": 5}), ("dirichlet", {"alpha": 50.0}),
    ("classes", {"classes_per_rank": 4}), ("classes", {"classes_per_rank": 10}),
    ("quantity", {"alpha": 1.0, "min_size": 5}),
])
@pytest.mark.parametrize("parts", [1, 3, 4])
def test_label_partitions_disjoint_complete_deterministic(kind, opts, parts):
    y = _labels()
    if kind == "classes" and opts["classes_per_rank"] * parts < 10:
        with pytest.raises(ConfigError, match="cannot cover all 10 classes"):
            partition_all(len(y), parts, kind, 7, y, **opts)
        return
    groups = partition_all(len(y), parts, kind, 7, y, **opts)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(y)))
    again = partition_all(len(y), parts, kind, 7, y, **opts)
    assert all(np.array_equal(a, b) for a, b in zip(groups, again))
    if parts > 1:
        other = partition_all(len(y), parts, kind, 8, y, **opts)
        assert not all(np.array_equal(a, b) for a, b in zip(groups, other))
    assert all(np.array_equal(partition(len(y), parts, r, kind, 7, y, **opts), groups[r])
               for r in range(parts))
    if kind in ("dirichlet", "quantity"):
        assert min(map(len, groups)) >= opts.get("min_size", 1)
    if kind == "classes":
        assert all(len(np.unique(y[g])) <= opts["classes_per_rank"] for g in groups)


def test_dirichlet_skew_follows_alpha():
    y = _labels(3000)
    skew = {a: np.mean([partition_stats(partition_all(len(y), 5, "dirichlet", s, y, alpha=a),
                                        y, 10)["skew"] for s in range(4)])
            for a in (0.01, 0.1, 1.0, 10.0, 1000.0)}
    values = list(skew.values())
    assert all(a > b for a, b in zip(values, values[1:])), skew
    assert skew[1000.0] < 0.05   # toward the global mix
    # toward pathological: each class on about one rank, so a rank's mix is far from global
    assert skew[0.01] > 0.7, skew
    iid = partition_stats(partition_all(len(y), 5, "iid", 0), y, 10)
    one_class = partition_stats(partition_all(len(y), 10, "classes", 0, y,
                                              classes_per_rank=1), y, 10)
    assert iid["skew"] < 0.05 and one_class["skew"] > 0.89


def test_partition_option_errors():
    y = _labels(100)
    with pytest.raises(ConfigError, match="data.min_size"):
        partition_all(100, 8, "dirichlet", 0, y, alpha=0.01, min_size=12)
    with pytest.raises(ConfigError, match="data.classes_per_rank"):
        partition_all(100, 4, "classes", 0, y, classes_per_rank=2)
    with pytest.raises(ConfigError, match="data.shards_per_rank"):
        partition_all(100, 4, "shards", 0, y, shards_per_rank=30)
    with pytest.raises(ValueError, match="labels"):
        partition_all(100, 4, "shards", 0, None)


def test_partition_stats():
    y = np.array([0, 0, 1, 1])
    s = partition_stats([np.array([0, 1]), np.array([2, 3])], y, 2)
    assert s["sizes"] == [2, 2] and s["label_histograms"] == [[2, 0], [0, 2]]
    assert s["skew"] == pytest.approx(0.5)


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
        ShardLoader(x[:0], y[:0], 8, 3, shuffle=False, seed=0, rank=0)


@pytest.mark.parametrize("shuffle", [False, True])
def test_small_partition_is_cycled(shuffle):
    """A skewed partition smaller than an epoch's batches: every sample is used, evenly."""
    x, y = torch.arange(6.0).reshape(6, 1), torch.arange(6)
    ld = ShardLoader(x, y, 4, 3, shuffle=shuffle, seed=1, rank=2)
    seen = torch.cat([ld.batch(0, s)[1] for s in range(3)])
    counts = torch.bincount(seen, minlength=6)
    assert counts.tolist() == [2] * 6
    if not shuffle:
        assert seen.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]


def test_digits_and_synthetic():
    d = open_dataset("digits")
    assert (d.num_train, d.num_test, d.input_shape, d.num_classes) == (1438, 359, (1, 8, 8), 10)
    x, y = d.read_train(np.array([0, 5]))
    assert x.shape == (2, 1, 8, 8) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    s = open_dataset("synthetic", num_samples=100)
    assert s.num_train == 100 and s.num_test == 25
    assert np.array_equal(s.read_train(np.arange(3))[0],
                          open_dataset("synthetic", num_samples=100).read_train(np.arange(3))[0])


def test_digits_read_directly_equal_scikit_learns():
    """The bundled file read without scikit-learn gives scikit-learn's arrays exactly, in
    the same order (the fixed test split depends on it), and mltrain does not import it."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from mltrain.data.datasets import read_digits

    ref = load_digits()
    pixels, labels = read_digits()
    assert np.array_equal(pixels, ref.data) and np.array_equal(labels, ref.target)
    probe = ("import sys; from mltrain.data import open_dataset; open_dataset('digits'); "
             "print('sklearn' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr


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
