"""Inspecting an untrusted HDF5 file before reading any of its data.

HDF5 can make a small file read other files (external links, external raw storage,
virtual datasets), and a dataset can declare far more elements than the file holds
(unallocated or chunked storage reads back as fill values). These checks look only at
metadata: a hostile file is refused before it can reach outside itself, and (checkpoints,
``filters=False``) before it can cost memory; data files may be compressed, so their
declared sizes are bounded against free memory by the reader. Not collective.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["walk", "check_dataset", "read_attr", "LIMIT_OBJECTS"]

# A checkpoint of a very deep network has a few thousand objects; a million is not a
# model, it is an attack on the walk itself.
LIMIT_OBJECTS = 1_000_000


def walk(f, path: Path, error) -> dict[str, object]:
    """Every object below the file's root by its full name ("model/0.weight"), following
    hard links only. Raises ``error(message)`` on a soft or external link, or beyond
    LIMIT_OBJECTS objects."""
    import h5py

    out: dict[str, object] = {}
    stack = [("", f)]
    while stack:
        prefix, group = stack.pop()
        for name in group:
            full = f"{prefix}{name}"
            link = group.get(name, getlink=True)
            if not isinstance(link, h5py.HardLink):
                kind = "an external link" if isinstance(link, h5py.ExternalLink) else "a soft link"
                raise error(f"{path}: /{full} is {kind}; mltrain reads no object it did not "
                            "write in the file itself")
            obj = group[name]
            out[full] = obj
            if len(out) > LIMIT_OBJECTS:
                raise error(f"{path}: more than {LIMIT_OBJECTS} objects")
            if isinstance(obj, h5py.Group):
                stack.append((full + "/", obj))
    return out


def check_dataset(ds, where: str, error, *, filters: bool) -> None:
    """Refuses a dataset whose data lives outside the file (external raw storage, virtual
    dataset), whose declared size is more than the bytes it has in the file, or (with
    ``filters=False``) that is chunked or filtered. ``where`` names it in the message."""
    import h5py

    dcpl = ds.id.get_create_plist()
    layout = dcpl.get_layout()
    if layout == h5py.h5d.VIRTUAL:
        raise error(f"{where} is a virtual dataset (its data lives in other files)")
    if dcpl.get_external_count():
        raise error(f"{where} keeps its data in an external file")
    if ds.dtype.kind not in "biuf":
        raise error(f"{where} has type {ds.dtype}, expected numbers")
    if not filters:
        if layout not in (h5py.h5d.CONTIGUOUS, h5py.h5d.COMPACT) or dcpl.get_nfilters():
            raise error(f"{where} is chunked or filtered; mltrain writes plain datasets")
        # Storage that was never written reads back as fill values: a declared size with
        # no bytes behind it is how a small file asks for gigabytes.
        need = int(np.prod(ds.shape, dtype=np.int64)) * ds.dtype.itemsize
        if ds.id.get_storage_size() != need:
            raise error(f"{where} declares {need} bytes but holds "
                        f"{ds.id.get_storage_size()}")


def read_attr(obj, name: str, where: str, error, *, kind: str, limit: int = 1 << 20):
    """One scalar attribute, checked before it is read: ``kind`` "int" (an integer) or
    "str" (text of at most ``limit`` bytes). Missing gives None."""
    import h5py

    if name not in obj.attrs:
        return None
    aid = obj.attrs.get_id(name)
    if aid.shape not in ((), (1,)):
        raise error(f"{where}: attribute {name!r} has shape {aid.shape}, expected a scalar")
    dt = aid.dtype
    if kind == "int":
        if dt.kind not in "iu":
            raise error(f"{where}: attribute {name!r} is {dt}, expected an integer")
        return int(np.asarray(obj.attrs[name]).reshape(-1)[0])
    vlen = h5py.check_string_dtype(dt)
    if vlen is None:
        raise error(f"{where}: attribute {name!r} is {dt}, expected text")
    if vlen.length is not None and vlen.length > limit:
        raise error(f"{where}: attribute {name!r} is over {limit} bytes")
    # A variable-length string's bytes are in the file's heap, so reading it allocates
    # at most what the file holds; the cap applies after.
    value = obj.attrs[name]
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if len(value) > limit:
        raise error(f"{where}: attribute {name!r} is over {limit} bytes")
    return str(value)
