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
from mltrain.utils.h5safe import check_dataset, read_attr, walk

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "list_checkpoints",
           "latest_checkpoint", "prepare_folder", "checkpoint_bytes", "Snapshot", "resume", "remove_stale_temporaries", "FORMAT",
           "VERSION"]

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


_TEMP = re.compile(r"^\.ckpt-\d{8,}\.h5\..+\.tmp$")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Deletes what an interrupted write left in ``folder``: regular files named as
    save_checkpoint names its temporaries, nothing else. Returns them. Not collective
    (call it on one rank, when no write is under way)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir()
             if _TEMP.match(p.name) and p.is_file() and not p.is_symlink()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def prepare_folder(folder: str | Path) -> list[Path]:
    """Before training: creates ``folder`` if needed, proves it writable and deletes stale
    temporaries. Raises ConfigError naming checkpoint.dir. Not collective (rank 0's job)."""
    from mltrain.config import writable_folder

    return remove_stale_temporaries(writable_folder(folder, "checkpoint.dir"))


def _optim_arrays(optimizer: torch.optim.Optimizer) -> dict[str, np.ndarray]:
    out = {}
    for idx, st in optimizer.state_dict()["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                out[f"{idx}/{key}"] = val.detach().cpu().numpy()
            elif val is not None:
                out[f"{idx}/{key}"] = np.asarray(val)
    return out


def _write(f, model: torch.nn.Module, optimizer, *, step: int, epoch: int, position: int,
           config_text: str, rngs: list, world: int) -> None:
    """Fills the open HDF5 file ``f`` with the checkpoint layout. Not collective."""
    f.attrs.update(format=FORMAT, version=VERSION, step=step, epoch=epoch,
                   position=position, world_size=world,
                   optimizer=type(optimizer).__name__, config=config_text)
    g = f.create_group("model")
    for name, p in model.named_parameters():
        g.create_dataset(name, data=p.detach().cpu().numpy())
    g = f.create_group("optim")
    for key, arr in _optim_arrays(optimizer).items():
        g.create_dataset(key, data=arr)
    f.create_dataset("rng/torch", data=np.stack(rngs))


def save_checkpoint(folder: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, *, step: int, epoch: int, position: int,
                    config_text: str, comm: MPI.Comm, keep: int = 0) -> Path:
    """Writes ``ckpt-<step>.h5`` atomically and returns its path.

    Parameters and optimizer state are taken from rank 0 (data-parallel replicas agree);
    RNG states from every rank. ``keep > 0`` deletes all but the newest ``keep``.

    Collective on ``comm``.
    """
    import h5py

    rngs = comm.gather(torch.get_rng_state().numpy(), root=0)  # host: the CPU generator
    path = checkpoint_path(folder, step)

    def write() -> None:
        if comm.Get_rank() != 0:
            return
        Path(folder).mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            with h5py.File(tmp, "w") as f:
                _write(f, model, optimizer, step=step, epoch=epoch, position=position,
                       config_text=config_text, rngs=rngs, world=comm.Get_size())
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
            remove_stale_temporaries(folder)

    agree(comm, write, what=f"writing checkpoint {path}")
    return path


def checkpoint_bytes(model: torch.nn.Module, optimizer, *, step: int, epoch: int,
                     position: int, config_text: str, comm: MPI.Comm) -> bytes | None:
    """The checkpoint ``save_checkpoint`` would write, as the bytes of an HDF5 file held in
    memory (a search moves them between trial groups by MPI). Rank 0 gets the bytes, the
    others None. Collective on ``comm``."""
    import io

    import h5py

    rngs = comm.gather(torch.get_rng_state().numpy(), root=0)  # host: the CPU generator

    def write() -> bytes | None:
        if comm.Get_rank() != 0:
            return None
        buf = io.BytesIO()
        with h5py.File(buf, "w") as f:
            _write(f, model, optimizer, step=step, epoch=epoch, position=position,
                   config_text=config_text, rngs=rngs, world=comm.Get_size())
        return buf.getvalue()

    return agree(comm, write, what="writing a snapshot")


class Snapshot:
    """A checkpoint held in memory: ``data`` (HDF5 file bytes) and the ``name`` that
    messages about it show. Loaded exactly as a file is, with every check."""

    def __init__(self, name: str, data: bytes):
        self.name, self.data = name, data

    def __str__(self) -> str:
        return self.name


# What each optimizer keeps per parameter: a checkpoint may hold these and nothing else,
# shaped like its parameter or scalar, so loading allocates what the optimizer needs.
_STATE = {"SGD": {"momentum_buffer"}, "Adam": {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"},
          "TrustRegion": {"radius", "batch_factor", "rejected_streak", "stage_work",
                          "lsr1_gamma"}}
_SCALARS = {"step", "radius", "batch_factor", "rejected_streak", "stage_work", "lsr1_gamma"}
_SECOND_MOMENTS = {"exp_avg_sq", "max_exp_avg_sq"}
_LSR1 = re.compile(r"^lsr1_[sy](\d{1,6})$")
_LEVEL = re.compile(r"^level(\d{1,7})\.(.+)$")


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    """NumPy's counterpart of a torch type (without copying a tensor off its device)."""
    return torch.empty(0, dtype=dtype).numpy().dtype  # host: an empty tensor, for its type


def _state_rules(optimizer) -> tuple[set[str], int, int]:
    """(state names, L-SR1 pairs, ``level<l>.`` prefixes) that ``optimizer`` (or,
    multilevel, any of its levels; APTS, any of its subdomains) can hold."""
    names, memory = set(), 0
    parts = getattr(optimizer, "parts", [optimizer])
    for opt in parts:
        names |= _STATE.get(type(opt).__name__, set())
        lsr1 = getattr(opt, "lsr1", None)
        if lsr1 is not None:
            memory = max(memory, lsr1.memory)
    names |= getattr(optimizer, "state_names", set())  # APTS: its subdomains' Adam moments
    return names, memory, getattr(optimizer, "state_levels", len(parts))


def _state_name_ok(name: str, names: set[str], memory: int, levels: int) -> bool:
    m = _LEVEL.match(name)
    if m is not None and int(m.group(1)) >= levels:
        return False  # no such level or subdomain: nothing to allocate for it
    base = m.group(2) if m else name
    k = _LSR1.match(base)
    return base in names or (k is not None and int(k.group(1)) < memory)


def _inspect(f, path: Path, model: torch.nn.Module, optimizer) -> tuple[dict, list[str]]:
    """Checks everything in an open checkpoint against this run's model and optimizer
    from metadata alone (no dataset is read): the objects there are, their shapes,
    types and storage. Returns the attributes and the optimizer-state datasets."""
    import h5py

    err = CheckpointError
    objects = walk(f, path, err)
    where = str(path)
    if read_attr(f, "format", where, err, kind="str", limit=64) != FORMAT:
        raise err(f"{path}: not an mltrain checkpoint (no format={FORMAT!r})")
    version = read_attr(f, "version", where, err, kind="int")
    if version is None or version > VERSION or version < 1:
        raise err(f"{path}: format version {version} is not one this mltrain reads "
                  f"(1 to {VERSION})")
    meta = {}
    for k in ("step", "epoch", "position", "world_size"):
        v = read_attr(f, k, where, err, kind="int")
        if v is None or v < (1 if k == "world_size" else 0) or v >= 2 ** 62:
            raise err(f"{path}: attribute {k!r} is missing or out of range ({v})")
        meta[k] = v
    meta["config"] = read_attr(f, "config", where, err, kind="str") or ""
    saved_opt = read_attr(f, "optimizer", where, err, kind="str", limit=256) or ""
    if saved_opt != type(optimizer).__name__:
        raise err(f"{path}: written with optimizer {saved_opt}, but this run uses "
                  f"{type(optimizer).__name__}")
    if not isinstance(objects.get("model"), h5py.Group):
        raise err(f"{path}: has no /model group")
    names = dict(model.named_parameters())
    saved = {k[len("model/"):] for k, o in objects.items()
             if k.startswith("model/") and k.count("/") == 1}
    missing = [n for n in names if n not in saved]
    extra = sorted(saved - set(names))
    if missing or extra:
        raise err(f"{path}: parameters do not match the model (missing: {missing[:5]}, "
                  f"unexpected: {extra[:5]}); was it written for another model.* config?")
    for n, p in names.items():
        ds = objects[f"model/{n}"]
        if not isinstance(ds, h5py.Dataset) or tuple(ds.shape) != tuple(p.shape):
            shape = getattr(ds, "shape", "a group")
            raise err(f"{path}: /model/{n} has shape {shape}, the model has {tuple(p.shape)}")
        want = _np_dtype(p.dtype)
        if ds.dtype != want:
            raise err(f"{path}: /model/{n} is {ds.dtype}, the model is {p.dtype} "
                      "(run.dtype differs?)")
        check_dataset(ds, f"{path}: /model/{n}", err, filters=False)
    # Optimizer state indices number the optimizer's parameters, or (multilevel) every
    # level's whole network, the same on every rank whatever the layer-parallel split.
    params = (optimizer.state_params() if hasattr(optimizer, "state_params") else
              [p for g in optimizer.param_groups for p in g["params"]])
    state_names, memory, levels = _state_rules(optimizer)
    for top in ("optim", "rng"):  # groups, or nothing: a dataset here would be read whole
        if top in objects and not isinstance(objects[top], h5py.Group):
            raise err(f"{path}: /{top} is not a group")
    state_keys = []
    for key, obj in objects.items():
        parts = key.split("/")
        if parts[0] in ("model", "optim") and len(parts) == 1:
            continue
        if (parts[0] == "model" and len(parts) == 2) or key in ("rng", "rng/torch"):
            continue  # checked above / below
        if parts[0] != "optim":
            raise err(f"{path}: /{key} is not part of an mltrain checkpoint")
        if not parts[1].isdigit() or int(parts[1]) >= len(params):
            raise err(f"{path}: /{key}: optimizer state for parameter {parts[1]}, but the "
                      f"model has {len(params)}")
        if len(parts) == 2:
            if not isinstance(obj, h5py.Group):
                raise err(f"{path}: /{key} is not a group")
            continue
        p = params[int(parts[1])]
        if len(parts) != 3 or not isinstance(obj, h5py.Dataset) or not _state_name_ok(
                parts[2], state_names, memory, levels):
            raise err(f"{path}: /{key} is no state that {type(optimizer).__name__} keeps")
        # Counters and radii are scalars; moments, buffers and L-SR1 pairs are shaped like
        # their parameter.
        base = parts[2].split(".")[-1]
        shape = () if base in _SCALARS else tuple(p.shape)
        if obj.shape != shape:
            raise err(f"{path}: /{key} has shape {obj.shape}, expected {shape}")
        # Moments and buffers are the parameter's type; the L-SR1 memory (and what an
        # optimizer names in float64_state) is kept in float64.
        wide = _LSR1.match(base) or base in getattr(optimizer, "float64_state", ())
        want = np.dtype(np.float64) if wide else _np_dtype(p.dtype)
        if obj.dtype.kind != "f" or (obj.shape and obj.dtype != want):
            raise err(f"{path}: /{key} is {obj.dtype}, expected {want if obj.shape else 'a float'}")
        check_dataset(obj, f"{path}: /{key}", err, filters=False)
        state_keys.append(key)
    rng = objects.get("rng/torch")
    want = (meta["world_size"], torch.get_rng_state().numel())
    if not isinstance(rng, h5py.Dataset) or rng.shape != want or rng.dtype != np.uint8:
        raise err(f"{path}: /rng/torch is missing or is not {want[0]} uint8 rows of "
                  f"{want[1]} bytes (one per writing rank)")
    check_dataset(rng, f"{path}: /rng/torch", err, filters=False)
    return meta, state_keys


def _read_validated(path: "Path | Snapshot", model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    world: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Rank 0's half of loading: the file checked from its metadata, then read and its
    values checked. The RNG states are read only when the job has the writer's ``world``
    size (otherwise they are not restored)."""
    import h5py

    if not isinstance(path, Snapshot) and not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        if isinstance(path, Snapshot):
            import io

            f = h5py.File(io.BytesIO(path.data), "r")
        else:
            f = h5py.File(path, "r")
    except OSError as e:
        raise CheckpointError(f"{path}: not a readable HDF5 file (corrupt or truncated?): "
                              f"{e}") from None
    try:
        with f:
            meta, state_keys = _inspect(f, path, model, optimizer)
            arrays: dict[str, np.ndarray] = {}
            for n, _ in model.named_parameters():
                arrays[f"model/{n}"] = f["model"][n][...]
            for key in state_keys:  # exactly the datasets _inspect checked
                arrays[key] = f[key][...]
            if meta["world_size"] == world:
                arrays["rng/torch"] = f["rng/torch"][...]
    except (OSError, KeyError, ValueError, TypeError, IndexError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: damaged checkpoint ({type(e).__name__}: {e})") from None
    for key, arr in arrays.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise CheckpointError(f"{path}: /{key} holds non-finite values (NaN or inf); "
                                  "resume from an earlier checkpoint")
        # Finite values Adam cannot have (torch's or APTS's subdomains'): the next step
        # would divide by zero or take a square root of a negative number.
        base = key.rsplit("/", 1)[-1].split(".")[-1]
        if key.startswith("optim/") and (
                (base == "step" and not (arr >= 0 and arr == np.floor(arr)))
                or (base in _SECOND_MOMENTS and (arr < 0).any())):
            raise CheckpointError(f"{path}: /{key} is not Adam state (a step count is a whole "
                                  "number >= 0, second moments are >= 0)")
    return meta, arrays


def resume(folder: str | Path, model: torch.nn.Module, optimizer, comm: MPI.Comm,
           log) -> tuple[int, str | None]:
    """``checkpoint.resume``: restores the newest checkpoint in ``folder``; returns (its
    step, its path), or (0, None) when there is none (a fresh start, logged). Collective
    on ``comm``."""
    path = comm.bcast(latest_checkpoint(folder) if comm.Get_rank() == 0 else None)
    if path is None:
        log.info(f"checkpoint.resume: no checkpoint in {folder}; starting fresh")
        return 0, None
    meta = load_checkpoint(path, model, optimizer, comm)
    log.info(f"resumed from {path} at step {meta['step']}")
    if meta["world_size"] != comm.Get_size() and comm.Get_rank() == 0:
        log.warning(f"{path} was written by {meta['world_size']} ranks, this job has "
                    f"{comm.Get_size()}: parameters and optimizer state are restored, but "
                    "partitions and RNG streams differ, so the run will not be bit-identical "
                    "to an uninterrupted one")
    return meta["step"], str(path)


def load_checkpoint(path: "str | Path | Snapshot", model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, comm: MPI.Comm) -> dict:
    """Restores parameters, optimizer state and RNG state; returns step/epoch/position.

    Raises CollectiveError (kind CheckpointError) on every rank when the file is unusable.
    When the job has another rank count than the writer, RNG states are left as they are.

    Collective on ``comm``.
    """
    path = path if isinstance(path, Snapshot) else Path(path)
    rank = comm.Get_rank()
    loaded = agree(comm, lambda: _read_validated(path, model, optimizer, comm.Get_size())
                   if rank == 0 else None,
                   what="loading checkpoint")
    meta, arrays = loaded if rank == 0 else (None, None)
    # Small metadata by pickle between our own ranks; array payloads as raw buffers.
    layout = comm.bcast(
        (meta, [(k, a.shape, a.dtype.str) for k, a in arrays.items()]) if rank == 0 else None)
    meta, shapes = layout
    received: dict[str, torch.Tensor] = {}
    for key, shape, dtype in shapes:
        if key == "rng/torch":  # scattered below, a row to each rank
            continue
        # host: broadcast from the file's copy, then copied into each parameter's device
        t = (torch.from_numpy(np.array(arrays[key], order="C")) if rank == 0 else  # host:
             torch.from_numpy(np.empty(shape, dtype=np.dtype(dtype))))  # host: as above
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

    def restore() -> None:  # incomplete state (Adam without step, an L-SR1 pair half there)
        try:
            optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as e:
            raise CheckpointError(f"{path}: the optimizer state does not fit "
                                  f"{type(optimizer).__name__} ({type(e).__name__}: {e})") \
                from None
    agree(comm, restore, what="loading checkpoint")
    if meta["world_size"] == comm.Get_size():
        rng = comm.scatter(list(arrays["rng/torch"]) if rank == 0 else None, root=0)
        torch.set_rng_state(torch.from_numpy(np.array(rng, order="C")))  # host: CPU generator
    return meta
