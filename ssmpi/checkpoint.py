"""Per-unit HDF5 checkpoints, written atomically, tied together by a manifest.

Layout (readable with plain h5py)::

    <run_dir>/checkpoints/ckpt-00000040/
        manifest.json        {"format": "ssmpi-checkpoint", "version": 1, "iteration": 40,
                              "epoch": 1, "batch": 8, "units": {"1": {"file": "unit-01.h5",
                              "sha256": "..."}, ...}, "mode": "skip", "model": "vgg8(...)"}
        unit-01.h5           attrs: unit, iteration, epoch, batch, step, format
                             /theta          (P,) the unit's flat parameters
                             /params/<i.layer.name>  each parameter in its own shape
                             /optim/<key>    optimizer state (t, m, v or v)
                             /rng/<layer>    attr "state": JSON of a dropout layer's RNG
        ...
    <run_dir>/config.toml    the resolved config

Every file is written to a temporary name in the same folder, flushed, fsynced and renamed,
so a crash never leaves a half-written file under a final name; the manifest, written last
by rank 0 after every unit file is in place, is what makes a checkpoint complete.
:func:`latest_checkpoint` returns the newest checkpoint whose manifest and unit files are
intact (sha256), and says which newer ones it skipped and why.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import h5py
import numpy as np

from . import backend

FORMAT, VERSION = "ssmpi-checkpoint", 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(d: Path):
    try:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_bytes(path: Path, data: bytes):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def ckpt_dir(run_dir, iteration: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"ckpt-{iteration:08d}"


def write_unit(folder: Path, engine, l: int, meta: dict) -> Tuple[str, str]:
    """Write unit l's file atomically; returns (file name, sha256)."""
    u, opt = engine.units[l], engine.opt[l]
    folder.mkdir(parents=True, exist_ok=True)
    name = f"unit-{l:02d}.h5"
    final = folder / name
    tmp = folder / f".{name}.tmp{os.getpid()}"
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["version"] = VERSION
        f.attrs["unit"] = l
        for k, v in meta.items():
            f.attrs[k] = v
        f.create_dataset("theta", data=backend.asnumpy(u.theta))
        g = f.create_group("params")
        for qn, arr in u.param_items():
            g.create_dataset(qn, data=backend.asnumpy(arr))
        og = f.create_group("optim")
        og.attrs["class"] = type(opt).__name__
        for k, v in opt.state_dict().items():
            og.create_dataset(k, data=backend.asnumpy(v) if not np.isscalar(v) else v)
        rg = f.create_group("rng")
        for i, layer in enumerate(u.layers):
            rng = getattr(layer, "rng", None)
            if rng is not None:
                rg.attrs[f"{i}.{layer.name}"] = json.dumps(rng.bit_generator.state)
        f.flush()
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    return name, _sha256(final)


def save(run_dir, engine, comm, *, iteration: int, epoch: int, batch: int, step: int = 0,
         extra: Optional[dict] = None, keep: int = 3) -> Optional[Path]:
    """Collective (all ranks, outside the step loop): every rank of replica 0 writes its
    units; rank 0 writes the manifest last. Returns the folder on rank 0."""
    folder = ckpt_dir(run_dir, iteration)
    meta = dict(iteration=iteration, epoch=epoch, batch=batch, step=step)
    mine = {}
    err = None
    if engine.replica == 0:
        try:
            for l in engine.local:
                mine[l] = write_unit(folder, engine, l, meta)
        except Exception as e:  # report on rank 0, never leave others waiting
            err = f"rank {comm.Get_rank()}: {type(e).__name__}: {e}"
    gathered = comm.gather((mine, err), root=0)
    path = None
    if comm.Get_rank() == 0:
        errors = [e for _, e in gathered if e]
        if errors:
            raise CheckpointError("checkpoint not written: " + "; ".join(errors))
        units = {}
        for d, _ in gathered:
            for l, (name, sha) in d.items():
                units[str(l)] = {"file": name, "sha256": sha}
        man = dict(format=FORMAT, version=VERSION, iteration=iteration, epoch=epoch,
                   batch=batch, step=step, n_units=engine.topo.L, mode=engine.topo.mode,
                   model=engine.topo.model.name, units=units, **(extra or {}))
        atomic_write_bytes(folder / "manifest.json", json.dumps(man, indent=1).encode())
        path = folder
        prune(run_dir, keep)
    comm.Barrier()
    return path


def check(folder: Path) -> dict:
    """The manifest of an intact checkpoint, or CheckpointError saying what is wrong."""
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        raise CheckpointError(f"{folder.name}: incomplete (no manifest.json)")
    try:
        man = json.loads(mpath.read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{folder.name}: manifest.json unreadable ({e})") from None
    if man.get("format") != FORMAT:
        raise CheckpointError(f"{folder.name}: not an ssmpi checkpoint manifest")
    units = man.get("units", {})
    if len(units) != man.get("n_units"):
        raise CheckpointError(f"{folder.name}: manifest lists {len(units)} of "
                              f"{man.get('n_units')} units")
    for l, info in units.items():
        p = folder / info["file"]
        if not p.is_file():
            raise CheckpointError(f"{folder.name}: {info['file']} is missing")
        if _sha256(p) != info["sha256"]:
            raise CheckpointError(f"{folder.name}: {info['file']} is damaged (sha256 mismatch)")
    return man


def list_checkpoints(run_dir) -> List[Path]:
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if p.is_dir() and p.name.startswith("ckpt-")),
                  reverse=True)


def latest_checkpoint(run_dir) -> Tuple[Optional[Path], List[str]]:
    """(newest intact checkpoint or None, [why each newer one was skipped])."""
    skipped = []
    for p in list_checkpoints(run_dir):
        try:
            check(p)
            return p, skipped
        except CheckpointError as e:
            skipped.append(str(e))
    return None, skipped


def prune(run_dir, keep: int):
    """Delete all but the ``keep`` newest intact checkpoints (and older damaged ones)."""
    good = 0
    for p in list_checkpoints(run_dir):
        try:
            check(p)
            good += 1
            if good > keep:
                shutil.rmtree(p, ignore_errors=True)
        except CheckpointError:
            if good >= 1:
                shutil.rmtree(p, ignore_errors=True)


def load(folder: Path, engine) -> dict:
    """Load this rank's units (parameters, optimizer state, RNG) from ``folder``; returns
    the manifest. Every rank of every replica loads (replicas start identical)."""
    man = check(folder)
    if man["n_units"] != engine.topo.L or man["mode"] != engine.topo.mode:
        raise CheckpointError(f"{folder}: checkpoint is for {man['n_units']} units in mode "
                              f"{man['mode']}, this run has {engine.topo.L} in mode "
                              f"{engine.topo.mode}")
    for l in engine.local:
        u, opt = engine.units[l], engine.opt[l]
        with h5py.File(folder / man["units"][str(l)]["file"], "r") as f:
            theta = f["theta"][...]
            if theta.shape != tuple(u.theta.shape):
                raise CheckpointError(f"{folder}: unit {l} has {theta.size} parameters, the "
                                      f"model has {u.theta.size} (different model or width?)")
            u.theta[...] = engine.xp.asarray(theta.astype(u.theta.dtype))
            if f["optim"].attrs.get("class") != type(opt).__name__:
                raise CheckpointError(f"{folder}: unit {l} optimizer "
                                      f"{f['optim'].attrs.get('class')} != "
                                      f"{type(opt).__name__}")
            opt.load_state_dict({k: f["optim"][k][()] for k in f["optim"].keys()})
            for i, layer in enumerate(u.layers):
                key = f"{i}.{layer.name}"
                if getattr(layer, "rng", None) is not None and key in f["rng"].attrs:
                    layer.rng.bit_generator.state = json.loads(f["rng"].attrs[key])
        u.zero_grad()
    return man


def read_parameters(folder) -> Dict[int, Dict[str, np.ndarray]]:
    """{unit: {parameter name: array}} from a checkpoint, with plain h5py (no MPI)."""
    folder = Path(folder)
    man = check(folder)
    out = {}
    for l, info in man["units"].items():
        with h5py.File(folder / info["file"], "r") as f:
            out[int(l)] = {k: f["params"][k][...] for k in f["params"].keys()}
    return out
