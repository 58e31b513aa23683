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

import errno
import hashlib
import io
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
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def ckpt_dir(run_dir, iteration: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"ckpt-{iteration:08d}"


def diverged(engine, l: int) -> Optional[str]:
    """Why unit l's parameters or optimizer state cannot be saved (not finite), or None."""
    u, opt = engine.units[l], engine.opt[l]
    xp = engine.xp
    if not bool(xp.isfinite(u.theta).all()):
        return f"unit U{l}: parameters are not finite"
    for k, v in opt.state_dict().items():
        if not np.isscalar(v) and not bool(backend.get_array_module(v).isfinite(v).all()):
            return f"unit U{l}: optimizer state {k!r} is not finite"
    return None


def _no_space(e: BaseException) -> bool:
    return isinstance(e, OSError) and (e.errno == errno.ENOSPC or "No space left" in str(e)
                                       or "disk full" in str(e).lower())


def write_unit(folder: Path, engine, l: int, meta: dict) -> Tuple[str, str]:
    """Write unit l's file atomically; returns (file name, sha256). On any error the
    temporary file is removed and the error raised; a full disk is ``OSError(ENOSPC)``
    naming the file.

    The HDF5 file is built in memory and written with plain ``write`` + ``fsync``: HDF5
    reports a failed write only from a destructor (or not at all, when its cache absorbs
    the data), which would leave a damaged file that looks complete."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"unit-{l:02d}.h5"
    final = folder / name
    buf = io.BytesIO()
    _write_unit_file(buf, engine, l, meta)
    data = buf.getvalue()
    try:
        atomic_write_bytes(final, data)
    except OSError as e:
        if _no_space(e):
            raise OSError(errno.ENOSPC, "No space left on device", str(final)) from None
        raise
    return name, hashlib.sha256(data).hexdigest()


def _write_unit_file(target, engine, l: int, meta: dict):
    """Unit l's parameters, optimizer state and RNG as HDF5 into ``target`` (a path or a
    binary file object)."""
    u, opt = engine.units[l], engine.opt[l]
    with h5py.File(target, "w") as f:
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


def save(run_dir, engine, comm, *, iteration: int, epoch: int, batch: int, step: int = 0,
         extra: Optional[dict] = None, keep: int = 3) -> Optional[Path]:
    """Collective (all ranks, outside the step loop; ``comm`` a
    :class:`~ssmpi.engine.transport.Comm`): every rank of replica 0 writes its units; rank 0
    writes the manifest last. Returns the folder on rank 0.

    A unit whose parameters or optimizer state are not finite is never written: the run
    diverged, and rank 0 raises :class:`~ssmpi.engine.losses.DivergenceError` (the newer
    checkpoints kept are all good ones). A full disk raises ``OSError(ENOSPC)`` naming the
    file; the new checkpoint's files are removed and the earlier checkpoints stay intact."""
    from .engine.losses import DivergenceError

    folder = ckpt_dir(run_dir, iteration)
    meta = dict(iteration=iteration, epoch=epoch, batch=batch, step=step)
    mine, err, kind = {}, None, None
    if engine.replica == 0:
        try:
            bad = [why for why in (diverged(engine, l) for l in engine.local) if why]
            if bad:
                err, kind = "; ".join(bad), "diverged"
            else:
                for l in engine.local:
                    mine[l] = write_unit(folder, engine, l, meta)
        except Exception as e:  # report on rank 0, never leave others waiting
            if _no_space(e):
                err, kind = Path(e.filename or folder).name, "nospace"
            else:
                err, kind = f"rank {comm.rank}: {type(e).__name__}: {e}", "error"
    gathered = comm.gather((mine, err, kind), root=0,
                           what=f"the unit files of checkpoint {folder.name}")
    path = None
    if comm.rank == 0:
        errors = [(e, k) for _, e, k in gathered if e]
        if errors:
            shutil.rmtree(folder, ignore_errors=True)  # never a half-written checkpoint
            text = "; ".join(e for e, _ in errors)
            if any(k == "diverged" for _, k in errors):
                last, _ = latest_checkpoint(run_dir)
                raise DivergenceError(f"training diverged by iteration {iteration}: {text}; "
                                      f"no checkpoint written (the last good one: "
                                      f"{last or 'none'})")
            if any(k == "nospace" for _, k in errors):
                files = ", ".join(e for e, k in errors if k == "nospace")
                raise OSError(errno.ENOSPC, "No space left on device",
                              f"writing checkpoint {folder} ({files}); the partial "
                              "checkpoint was removed, the earlier ones are intact")
            raise CheckpointError("checkpoint not written: " + text)
        units = {}
        for d, _, _ in gathered:
            for l, (name, sha) in d.items():
                units[str(l)] = {"file": name, "sha256": sha}
        topo = engine.topo
        man = dict(format=FORMAT, version=VERSION, iteration=iteration, epoch=epoch,
                   batch=batch, step=step, n_units=topo.L, mode=topo.mode, k=topo.k,
                   fuse=topo.fuse, model=topo.model.name, units=units, **(extra or {}))
        try:
            atomic_write_bytes(folder / "manifest.json", json.dumps(man, indent=1).encode())
        except OSError as e:
            shutil.rmtree(folder, ignore_errors=True)
            if _no_space(e):
                raise OSError(errno.ENOSPC, "No space left on device",
                              f"writing checkpoint {folder} (manifest.json); the partial "
                              "checkpoint was removed, the earlier ones are intact") from None
            raise
        path = folder
        prune(run_dir, keep)
    comm.barrier(what=f"checkpoint {folder.name} to be complete")
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


_VERDICTS: dict = {}  # folder -> (its files' size and mtime, intact?) as hashed last time


def _intact(folder: Path) -> bool:
    """`check` with memory: a checkpoint whose files are unchanged since this process last
    hashed them is not read again (prune runs after every save; rereading every kept
    checkpoint each time would stall rank 0 for seconds on a large model)."""
    try:
        stamp = tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                             for f in folder.iterdir()))
    except OSError:
        return False
    seen = _VERDICTS.get(str(folder))
    if seen is not None and seen[0] == stamp:
        return seen[1]
    try:
        check(folder)
        ok = True
    except CheckpointError:
        ok = False
    _VERDICTS[str(folder)] = (stamp, ok)
    return ok


def prune(run_dir, keep: int):
    """Delete all but the ``keep`` newest intact checkpoints (and older damaged ones)."""
    good = 0
    for p in list_checkpoints(run_dir):
        try:
            if not _intact(p):
                raise CheckpointError(p.name)
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
    topo = engine.topo
    ours = dict(n_units=topo.L, mode=topo.mode, k=topo.k, fuse=topo.fuse,
                model=topo.model.name)
    differ = [f"{key} {man[key]!r} (this run: {v!r})" for key, v in ours.items()
              if key in man and man[key] != v]  # k and fuse: manifests since version 0.2
    if differ:
        raise CheckpointError(f"{folder}: the checkpoint does not fit this model: "
                              + ", ".join(differ))
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
