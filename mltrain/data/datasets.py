"""Datasets that read only what a rank asks for.

``open_dataset`` returns a handle that knows the sizes and shapes (from headers only);
``read_train(indices)`` / ``read_test(indices)`` return float features scaled to [0, 1]
and int64 labels for exactly those samples. Not collective.
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DataError", "Dataset", "open_dataset", "IdxFile"]


class DataError(ValueError):
    """A dataset that cannot be read as configured; the message names the file."""


@dataclass
class Dataset:
    name: str
    num_train: int
    num_test: int
    input_shape: tuple[int, ...]
    num_classes: int

    def read_train(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def train_labels(self) -> np.ndarray:
        """All training labels (int64; small: what label-based partitions need)."""
        raise NotImplementedError

    def read_test(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class ArrayDataset(Dataset):
    """A dataset held in memory (digits, synthetic)."""

    def __init__(self, name, x_train, y_train, x_test, y_test, input_shape, num_classes):
        super().__init__(name, len(x_train), len(x_test), tuple(input_shape), num_classes)
        self._train = (x_train, y_train)
        self._test = (x_test, y_test)

    def read_train(self, indices):
        x, y = self._train
        return x[indices], y[indices]

    def train_labels(self):
        return self._train[1]

    def read_test(self, indices):
        x, y = self._test
        return x[indices], y[indices]


# -- digits (scikit-learn's bundled copy of the UCI 8x8 digits; no download) ---------------
def digits_file() -> Path:
    """scikit-learn's bundled ``digits.csv.gz``, found without importing scikit-learn
    (importing ``sklearn.datasets`` costs each rank about 0.8 s and 90 MB, which at 32 ranks
    on a node is most of mltrain's own start-up). Not collective."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.name = digits: scikit-learn, which ships the data, is not "
                        "installed (pip install scikit-learn)")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DataError(f"data.name = digits: {path} is missing from scikit-learn")
    return path


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits in the file's order: pixels (0-16, float64) and labels. Not
    collective."""
    path = digits_file()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)  # 64 pixels, then the label
    if table.ndim != 2 or table.shape[1] != 65:
        raise DataError(f"data.name = digits: {path} is not 65 columns wide")
    return table[:, :64], table[:, 64].astype(np.int64)


def _digits() -> ArrayDataset:
    pixels, y = read_digits()
    x = (pixels.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    # A fixed split (seed independent of run.seed) so every run is scored on the same 360.
    perm = np.random.default_rng(20240611).permutation(len(x))
    n_test = len(x) // 5
    test, train = perm[:n_test], np.sort(perm[n_test:])
    return ArrayDataset("digits", x[train], y[train], x[np.sort(test)], y[np.sort(test)],
                        (1, 8, 8), 10)


# -- synthetic (Gaussian class clusters; the same data for every run) ----------------------
def _synthetic(num_samples: int) -> ArrayDataset:
    rng = np.random.default_rng(7)
    k, shape = 10, (1, 8, 8)
    d = int(np.prod(shape))
    from mltrain.utils import check_memory

    # float64 draws of the training and test samples, then their float32 copies.
    check_memory((num_samples + max(k, num_samples // 4)) * d * 12,
                 f"data.num_samples = {num_samples}", error=DataError)
    centres = rng.normal(0.0, 1.0, (k, d))
    n_test = max(k, num_samples // 4)

    def make(n):
        y = rng.integers(0, k, n)
        x = centres[y] + rng.normal(0.0, 1.2, (n, d))
        return x.astype(np.float32).reshape(n, *shape), y.astype(np.int64)

    xtr, ytr = make(num_samples)
    xte, yte = make(n_test)
    return ArrayDataset("synthetic", xtr, ytr, xte, yte, shape, k)


# -- IDX (MNIST layout) ---------------------------------------------------------------------
_IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}


class IdxFile:
    """One IDX file (optionally gzip-compressed). Uncompressed files are memory-mapped, so
    a rank pages in only the samples it reads; compressed ones must be inflated whole
    (gzip streams cannot be entered in the middle)."""

    def __init__(self, path: Path, expect_magic: int):
        self.path = path
        try:
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rb") as f:
                head = f.read(4)
                if len(head) < 4:
                    raise DataError(f"{path}: too short to be an IDX file")
                zero, dtype_code, ndim = struct.unpack(">HBB", head)
                magic = (dtype_code << 8) | ndim
                if zero != 0 or magic != expect_magic:
                    raise DataError(f"{path}: not an IDX file with magic {expect_magic} "
                                    f"(found {struct.unpack('>I', head)[0]})")
                if dtype_code != 0x08:
                    raise DataError(f"{path}: only unsigned-byte IDX data is supported")
                dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
        except (OSError, EOFError, struct.error) as e:
            raise DataError(f"{path}: cannot read IDX header ({e})") from None
        self.dims = dims
        self.offset = 4 + 4 * ndim
        self._data: np.ndarray | None = None

    @property
    def count(self) -> int:
        return self.dims[0]

    def array(self) -> np.ndarray:
        if self._data is None:
            n_bytes = int(np.prod(self.dims))
            if self.path.suffix == ".gz":
                try:
                    with gzip.open(self.path, "rb") as f:
                        raw = f.read()
                except (OSError, EOFError) as e:
                    raise DataError(f"{self.path}: corrupt gzip stream ({e})") from None
                if len(raw) < self.offset + n_bytes:
                    raise DataError(f"{self.path}: truncated ({len(raw) - self.offset} of "
                                    f"{n_bytes} data bytes)")
                data = np.frombuffer(raw, np.uint8, n_bytes, self.offset)
            else:
                if os.path.getsize(self.path) < self.offset + n_bytes:
                    raise DataError(f"{self.path}: truncated")
                data = np.memmap(self.path, np.uint8, "r", self.offset, (n_bytes,))
            self._data = data.reshape(self.dims)
        return self._data


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        if (folder / name).exists():
            return folder / name
    raise DataError(f"data.path: {folder} has no {stem} (or {stem}.gz)")


class IdxDataset(Dataset):
    def __init__(self, folder: Path):
        if not folder.is_dir():
            raise DataError(f"data.path: {folder} is not a folder of IDX files")
        f = {k: _find_idx(folder, v) for k, v in _IDX_NAMES.items()}
        self._tri = IdxFile(f["train_images"], 0x0803)
        self._trl = IdxFile(f["train_labels"], 0x0801)
        self._tei = IdxFile(f["test_images"], 0x0803)
        self._tel = IdxFile(f["test_labels"], 0x0801)
        for img, lab in ((self._tri, self._trl), (self._tei, self._tel)):
            if img.count != lab.count:
                raise DataError(f"{img.path}: {img.count} images but {lab.path} has "
                                f"{lab.count} labels")
        rows, cols = self._tri.dims[1:]
        if self._tei.dims[1:] != (rows, cols):
            raise DataError(f"{self._tei.path}: test images are {self._tei.dims[1:]}, "
                            f"training images {(rows, cols)}")
        if self._tri.count == 0 or rows * cols == 0:
            raise DataError(f"{self._tri.path}: no training images, or images of 0 pixels")
        # Labels are small (one byte per sample): read whole for the class count.
        classes = int(self._trl.array().max()) + 1
        if self._tel.count and int(self._tel.array().max()) >= classes:
            raise DataError(f"{self._tel.path}: test label {int(self._tel.array().max())}, "
                            f"but training labels are 0..{classes - 1}")
        super().__init__("idx", self._tri.count, self._tei.count, (1, rows, cols), classes)

    @staticmethod
    def _read(img: IdxFile, lab: IdxFile, indices: np.ndarray):
        order = np.argsort(indices, kind="stable")  # sorted reads page in sequentially
        x = np.empty((len(indices), 1, *img.dims[1:]), np.float32)
        x[order] = img.array()[indices[order]][:, None].astype(np.float32) / np.float32(255)
        return x, lab.array()[indices].astype(np.int64)

    def read_train(self, indices):
        return self._read(self._tri, self._trl, np.asarray(indices))

    def train_labels(self):
        return self._trl.array().astype(np.int64)

    def read_test(self, indices):
        return self._read(self._tei, self._tel, np.asarray(indices))


# -- HDF5 ----------------------------------------------------------------------------------
class Hdf5Dataset(Dataset):
    """Datasets ``x`` (N, ...) and ``y`` (N,), and optionally ``x_test``/``y_test``.
    Integer features are scaled by 1/255; float features are used as they are. Labels are
    integers from 0. Everything is checked from the file's metadata and labels at open,
    before training: shapes, types, label range, the test split against the training
    split, and that no dataset reads from outside the file."""

    def __init__(self, path: Path):
        import h5py

        from mltrain.utils.h5safe import check_dataset, walk

        self.path = path
        try:
            with h5py.File(path, "r") as f:
                objects = walk(f, path, DataError)
                if ("x_test" in objects) != ("y_test" in objects):
                    raise DataError(f"{path}: has only one of x_test and y_test")
                names = ("x", "y", "x_test", "y_test") if "x_test" in objects else ("x", "y")
                for k in names:
                    if k not in objects:
                        raise DataError(f"data.path: {path} has no dataset {k!r}")
                    if not isinstance(objects[k], h5py.Dataset):
                        raise DataError(f"{path}: /{k} is a group, expected a dataset")
                    check_dataset(objects[k], f"{path}: /{k}", DataError, filters=True)
                x, y = objects["x"], objects["y"]
                n, shape = self._check_pair(path, x, y, "x", "y")
                labels = y[...]
                k = int(labels.max()) + 1
                n_test = 0
                if "x_test" in objects:
                    xt, yt = objects["x_test"], objects["y_test"]
                    n_test, test_shape = self._check_pair(path, xt, yt, "x_test", "y_test",
                                                          allow_empty=True)
                    if test_shape != shape:
                        raise DataError(f"{path}: x_test samples have shape {test_shape}, "
                                        f"x samples {shape}")
                    if n_test:
                        lt = yt[...]
                        if lt.max() >= k:
                            raise DataError(f"{path}: y_test has label {int(lt.max())}, but "
                                            f"y has only classes 0..{k - 1}")
        except OSError as e:
            raise DataError(f"data.path: {path} is not a readable HDF5 file ({e})") from None
        super().__init__("hdf5", n, n_test, shape, k)

    @staticmethod
    def _check_pair(path: Path, x, y, xk: str, yk: str, allow_empty: bool = False):
        """(samples, sample shape) of features ``x`` and labels ``y``, or DataError naming
        what is wrong."""
        if x.ndim < 2:
            raise DataError(f"{path}: /{xk} has shape {x.shape}; expected (samples, "
                            "features...) with at least one feature")
        n, shape = x.shape[0], tuple(x.shape[1:])
        if n == 0 and not allow_empty:
            raise DataError(f"{path}: /{xk} has no samples")
        if min(shape) == 0:
            raise DataError(f"{path}: /{xk} samples have shape {shape}, which holds nothing")
        if x.dtype.kind not in "iuf":
            raise DataError(f"{path}: /{xk} is {x.dtype}; expected integers or floats")
        if y.shape != (n,):
            raise DataError(f"{path}: /{yk} has shape {y.shape}, expected ({n},)")
        if y.dtype.kind not in "iu":
            raise DataError(f"{path}: /{yk} is {y.dtype}; class labels must be integers")
        from mltrain.utils import check_memory

        # The labels are read whole (and indexed by the partitions): a count declared far
        # beyond what the file holds must not be allocated.
        check_memory(n * 8 * 4, f"{path}: /{yk} declares {n} samples", error=DataError)
        if n:
            lo = y[...].min()
            if lo < 0:
                raise DataError(f"{path}: /{yk} has the negative label {int(lo)}; labels "
                                "count classes from 0")
        return n, shape

    def _read(self, xk: str, yk: str, indices: np.ndarray):
        import h5py

        indices = np.asarray(indices)
        order = np.argsort(indices, kind="stable")
        with h5py.File(self.path, "r") as f:
            xs, ys = f[xk], f[yk]
            srt = indices[order]
            # h5py wants increasing indices; a contiguous run is read as one slice.
            if len(srt) and srt[-1] - srt[0] + 1 == len(srt):
                xr, yr = xs[srt[0]:srt[-1] + 1], ys[srt[0]:srt[-1] + 1]
            else:
                xr, yr = xs[srt], ys[srt]
        x = np.empty((len(indices), *xr.shape[1:]), np.float32)
        y = np.empty(len(indices), np.int64)
        with np.errstate(over="ignore"):  # too large for float32: found just below
            x[order] = xr.astype(np.float32)
        if np.issubdtype(xr.dtype, np.integer):
            x /= np.float32(255)
        elif len(x) and not np.isfinite(x).all():  # the rank's own samples: a cheap check
            bad = int(indices[np.argwhere(~np.isfinite(x.reshape(len(x), -1)))[0, 0]])
            raise DataError(f"{self.path}: /{xk} sample {bad} is not finite (NaN or inf, "
                            "or too large for float32)")
        y[order] = yr
        return x, y

    def read_train(self, indices):
        return self._read("x", "y", indices)

    def train_labels(self):
        import h5py

        with h5py.File(self.path, "r") as f:
            return f["y"][...].astype(np.int64)

    def read_test(self, indices):
        return self._read("x_test", "y_test", indices)


def open_dataset(name: str, path: str = "", num_samples: int = 4096) -> Dataset:
    """The dataset named by ``data.name``; raises DataError naming the file on bad input."""
    if name == "digits":
        return _digits()
    if name == "synthetic":
        return _synthetic(num_samples)
    if name == "idx":
        return IdxDataset(Path(path))
    if name == "hdf5":
        p = Path(path)
        if not p.is_file():
            raise DataError(f"data.path: {p} does not exist")
        return Hdf5Dataset(p)
    raise DataError(f"data.name: unknown dataset {name!r}")
