"""HDF5 checkpoints: parameters, optimizer state, position in the data, RNG states, config.

Layout (format ``mltrain-checkpoint``, version 1)::

    /                   attrs: format, version, step, epoch, position, world_size,
                               optimizer, config (TOML text)
    /model/<name>       one dataset per entry of named_parameters()
    /optim/<index>/<key>  optimizer state tensors (momentum, Adam moments, step)
    /rng/torch          (world_size, n) uint8: each rank's torch RNG state

No pickle anywhere: reading a checkpoint cannot run code. Rank 0 writes to a temporary
file in the same folder, flushes it to disk and renames it over the final name, so a crash
mid-write leaves the previous checkpoint intact. Rank 0 reads and validates; every rank
gets the same error or the same data (broadcast).
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from mltrain.comm import agree, broadcast_

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "list_checkpoints",
           "latest_checkpoint", "FORMAT", "VERSION"]

FORMAT = "mltrain-checkpoint"
VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{8,})\.h5$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, foreign, or not matching the model."""


def checkpoint_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"ckpt-{step:08d}.h5"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoints in ``folder``, oldest first (by step in the name). Not collective."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def _optim_arrays(optimizer: torch.optim.Optimizer) -> dict[str, np.ndarray]:
    out = {}
    for idx, st in optimizer.state_dict()["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                out[f"{idx}/{key}"] = val.detach().cpu().numpy()
            elif val is not None:
                out[f"{idx}/{key}"] = np.asarray(val)
    return out


def save_checkpoint(folder: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, *, step: int, epoch: int, position: int,
                    config_text: str, comm: MPI.Comm, keep: int = 0) -> Path:
    """Writes ``ckpt-<step>.h5`` atomically and returns its path.

    Parameters and optimizer state are taken from rank 0 (data-parallel replicas agree);
    RNG states from every rank. ``keep > 0`` deletes all but the newest ``keep``.

    Collective on ``comm``.
    """
    import h5py

    rng = torch.get_rng_state().numpy()
    rngs = comm.gather(rng, root=0)
    path = checkpoint_path(folder, step)

    def write() -> None:
        if comm.Get_rank() != 0:
            return
        Path(folder).mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            with h5py.File(tmp, "w") as f:
                f.attrs.update(format=FORMAT, version=VERSION, step=step, epoch=epoch,
                               position=position, world_size=comm.Get_size(),
                               optimizer=type(optimizer).__name__, config=config_text)
                g = f.create_group("model")
                for name, p in model.named_parameters():
                    g.create_dataset(name, data=p.detach().cpu().numpy())
                g = f.create_group("optim")
                for key, arr in _optim_arrays(optimizer).items():
                    g.create_dataset(key, data=arr)
                f.create_dataset("rng/torch", data=np.stack(rngs))
                f.flush()
            with open(tmp, "rb+") as fh:  # data on disk before the rename makes it visible
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if keep > 0:
            for old in list_checkpoints(folder)[:-keep]:
                old.unlink(missing_ok=True)

    agree(comm, write, what=f"writing checkpoint {path}")
    return path


def _read_validated(path: Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, np.ndarray]]:
    """Rank 0's half of loading: everything read into memory and checked."""
    import h5py

    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CheckpointError(f"{path}: not a readable HDF5 file (corrupt or truncated?): "
                              f"{e}") from None
    try:
        with f:
            if f.attrs.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not an mltrain checkpoint (no format={FORMAT!r})")
            if int(f.attrs.get("version", -1)) > VERSION:
                raise CheckpointError(f"{path}: format version {f.attrs['version']} is newer "
                                      f"than this mltrain reads ({VERSION})")
            meta = {k: f.attrs[k] for k in ("step", "epoch", "position", "world_size")}
            meta = {k: int(v) for k, v in meta.items()}
            meta["config"] = str(f.attrs.get("config", ""))
            saved_opt = str(f.attrs.get("optimizer", ""))
            if saved_opt != type(optimizer).__name__:
                raise CheckpointError(f"{path}: written with optimizer {saved_opt}, but this "
                                      f"run uses {type(optimizer).__name__}")
            arrays: dict[str, np.ndarray] = {}
            if "model" not in f:
                raise CheckpointError(f"{path}: has no /model group")
            names = dict(model.named_parameters())
            missing = [n for n in names if n not in f["model"]]
            extra = sorted(set(f["model"].keys()) - set(names)) if not missing else []
            if missing or extra:
                raise CheckpointError(
                    f"{path}: parameters do not match the model (missing: {missing[:5]}, "
                    f"unexpected: {extra[:5]}); was it written for another model.* config?")
            for n, p in names.items():
                ds = f["model"][n]
                if not isinstance(ds, h5py.Dataset) or tuple(ds.shape) != tuple(p.shape):
                    shape = getattr(ds, "shape", "a group")
                    raise CheckpointError(f"{path}: /model/{n} has shape {shape}, the model "
                                          f"has {tuple(p.shape)}")
                arr = ds[...]
                if arr.dtype != p.detach().cpu().numpy().dtype:
                    raise CheckpointError(f"{path}: /model/{n} is {arr.dtype}, the model is "
                                          f"{p.dtype} (run.dtype differs?)")
                arrays[f"model/{n}"] = arr
            for idx in f.get("optim", {}):
                for key in f["optim"][idx]:
                    arrays[f"optim/{idx}/{key}"] = f["optim"][idx][key][...]
            rng = f.get("rng/torch")
            if rng is None or rng.ndim != 2 or rng.shape[0] != meta["world_size"]:
                raise CheckpointError(f"{path}: /rng/torch is missing or does not have one row "
                                      f"per writing rank ({meta['world_size']})")
            arrays["rng/torch"] = rng[...]
    except (OSError, KeyError, ValueError, TypeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: damaged checkpoint ({type(e).__name__}: {e})") from None
    # Optimizer state must belong to existing parameters with matching shapes.
    # What the state's indices number: the optimizer's parameters, or (multilevel) every
    # level's whole network, the same on every rank whatever the layer-parallel split.
    params = (optimizer.state_params() if hasattr(optimizer, "state_params") else
              [p for g in optimizer.param_groups for p in g["params"]])
    for key, arr in arrays.items():
        if key.startswith("optim/"):
            idx = int(key.split("/")[1])
            if idx >= len(params):
                raise CheckpointError(f"{path}: optimizer state for parameter {idx}, but the "
                                      f"model has {len(params)}")
            if arr.ndim and tuple(arr.shape) != tuple(params[idx].shape):
                raise CheckpointError(f"{path}: /{key} has shape {arr.shape}, parameter has "
                                      f"{tuple(params[idx].shape)}")
    return meta, arrays


def load_checkpoint(path: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, comm: MPI.Comm) -> dict:
    """Restores parameters, optimizer state and RNG state; returns step/epoch/position.

    Raises CollectiveError (kind CheckpointError) on every rank when the file is unusable.
    When the job has another rank count than the writer, RNG states are left as they are.

    Collective on ``comm``.
    """
    path = Path(path)
    rank = comm.Get_rank()
    loaded = agree(comm, lambda: _read_validated(path, model, optimizer) if rank == 0 else None,
                   what="loading checkpoint")
    meta, arrays = loaded if rank == 0 else (None, None)
    # Small metadata by pickle between our own ranks; array payloads as raw buffers.
    layout = comm.bcast(
        (meta, [(k, a.shape, a.dtype.str) for k, a in arrays.items()]) if rank == 0 else None)
    meta, shapes = layout
    received: dict[str, torch.Tensor] = {}
    for key, shape, dtype in shapes:
        t = (torch.from_numpy(np.array(arrays[key], order="C")) if rank == 0 else
             torch.from_numpy(np.empty(shape, dtype=np.dtype(dtype))))
        if key != "rng/torch":
            broadcast_(t, comm)
        received[key] = t
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(received[f"model/{name}"])
    state: dict[int, dict] = {}
    for key, t in received.items():
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = t.clone()
    sd = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    if meta["world_size"] == comm.Get_size():
        rng = comm.scatter(list(arrays["rng/torch"]) if rank == 0 else None, root=0)
        torch.set_rng_state(torch.from_numpy(np.array(rng, order="C")))
    return meta
