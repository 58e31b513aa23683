"""The run folder ``<run.out_dir>/<run.name>/``: one run at a time, and a resume that fits.

- :class:`RunLock`: ``run.lock`` holds the host and PID of the run that owns the folder;
  a second run of the same name stops with one line naming them. A lock left by a process
  that is gone (same host, PID not alive) is stale: it is taken over with a warning. A
  lock from another host cannot be checked from here: the message says how to remove it.
- :func:`resume_conflicts`: the config keys that a checkpoint fixes (model, mode, k, fuse,
  units, optimizer, dtype) and whose values differ between the run's saved config and
  this one.
- :func:`truncate_metrics`: after a resume from iteration i, ``metrics.jsonl`` keeps only
  the lines up to iteration i, so that every iteration appears once.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import List, Optional

LOCK = "run.lock"
UNREADABLE_STALE_S = 10.0  # an empty lock younger than this may be a run writing it now
STALE_CHECKS, STALE_WAIT_S = 10, 0.2  # a live holder is looked at for up to 2 s
# the keys a checkpoint depends on: a resume with other values cannot load it
FIXED_BY_CHECKPOINT = ("model.*", "engine.mode", "engine.k", "engine.fuse",
                       "engine.modules_per_unit", "optim.name", "run.dtype")


class RunDirError(RuntimeError):
    """The run folder is in use, or does not fit this run."""

    collective = True  # decided on rank 0 and shared with every rank


class RunLock:
    """An exclusive lock on a run folder (taken by one rank)."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK
        self.held = False

    def acquire(self, warn=None):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = dict(host=socket.gethostname(), pid=os.getpid(), started=time.time())
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self._read()
                if not self._stale(other):
                    raise RunDirError(
                        f"{self.path.parent}: the run folder is in use by pid "
                        f"{other.get('pid', '?')} on host {other.get('host', '?')} (since "
                        f"{_when(other.get('started'))}); choose another run.name, or delete "
                        f"{self.path} if that run is gone") from None
                if warn is not None:
                    warn(f"taking over the stale lock {self.path} " + (
                        f"(pid {other.get('pid')} on {other.get('host')} is gone)" if other
                        else "(empty or unreadable)"))
                self.path.unlink(missing_ok=True)
                continue
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
            except OSError as e:  # e.g. a full disk: leave no empty lock behind
                self.path.unlink(missing_ok=True)
                raise OSError(e.errno, e.strerror, str(self.path)) from None
            self.held = True
            return self
        raise RunDirError(f"{self.path}: could not take the lock")

    def release(self):
        if self.held:
            self.held = False
            try:
                if self._read().get("pid") == os.getpid():
                    self.path.unlink()
            except OSError:
                pass

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _stale(self, other: dict) -> bool:
        if not other:  # empty or unreadable: a crash while writing it, unless it is that new
            try:
                return time.time() - self.path.stat().st_mtime > UNREADABLE_STALE_S
            except OSError:
                return True
        if other.get("host") != socket.gethostname():
            return False  # cannot tell from here
        pid = other.get("pid")
        if not isinstance(pid, int):
            return True
        # a process killed a moment ago may still be tearing down, and one whose parent is
        # gone stays a zombie where PID 1 does not reap (containers): both are gone
        for _ in range(STALE_CHECKS):
            if not _alive(pid):
                return True
            time.sleep(STALE_WAIT_S)
        return False


def _alive(pid: int) -> bool:
    """True when process `pid` runs on this host (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: the state letter follows the parenthesised command name
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _when(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "?"


def _flat(d: dict) -> dict:
    return {f"{sec}.{k}": v for sec, body in d.items() if isinstance(body, dict)
            for k, v in body.items()}


def resume_conflicts(saved: dict, now: dict, defaults: Optional[dict] = None) -> List[str]:
    """``key: saved -> now`` for every key fixed by a checkpoint whose value differs.

    A key missing from the saved config (written by an older version) counts as its value
    in `defaults`, so run folders of an earlier release still resume."""
    a, b = {**_flat(defaults or {}), **_flat(saved)}, _flat(now)
    out = []
    for key in sorted(set(a) | set(b)):
        fixed = any(key == k or (k.endswith(".*") and key.startswith(k[:-1]))
                    for k in FIXED_BY_CHECKPOINT)
        if fixed and a.get(key) != b.get(key):
            out.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out


def read_config(run_dir) -> Optional[dict]:
    """The run's saved resolved config as a dict (None when there is none)."""
    p = Path(run_dir) / "config.toml"
    if not p.is_file():
        return None
    from .config import tomllib

    try:
        return tomllib.loads(p.read_text())
    except (OSError, ValueError) as e:  # tomllib.TOMLDecodeError is a ValueError
        raise RunDirError(f"{p}: unreadable ({str(e).splitlines()[0] if str(e) else e!r}); "
                          "cannot check that the resume fits the run") from None


def truncate_metrics(path, iteration: int) -> int:
    """Keep the lines of ``metrics.jsonl`` up to ``iteration`` (training lines, evaluations
    and anything without an iteration before them); returns the number of lines dropped.
    Written atomically: a crash leaves the old file or the new one."""
    path = Path(path)
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            dropped += 1  # a line cut short by the kill
            continue
        it = rec.get("iteration")
        if rec.get("final") or (it is not None and it > iteration):
            dropped += 1
            continue
        keep.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            tmp.write_text("".join(x + "\n" for x in keep))
            os.replace(tmp, path)
        except OSError as e:  # e.g. a full disk: the old file stays, the temporary goes
            tmp.unlink(missing_ok=True)
            raise OSError(e.errno, e.strerror, str(path)) from None
    return dropped


def set_aside_earlier_run(run_dir) -> Optional[Path]:
    """Move an earlier run's ``checkpoints/`` and ``metrics.jsonl`` out of the way of a fresh
    run of the same name, into ``earlier/<time>/``; returns that folder, or None when there
    was nothing. (Left in place, the earlier run's newer checkpoints would be what a later
    ``--resume`` picks, and what pruning keeps instead of the fresh run's.)"""
    run_dir = Path(run_dir)
    found = [p for p in (run_dir / "checkpoints", run_dir / "metrics.jsonl")
             if p.is_dir() and any(p.iterdir()) or p.is_file() and p.stat().st_size > 0]
    if not found:
        return None
    dest = run_dir / "earlier" / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
    dest.mkdir(parents=True)
    for p in found:
        os.replace(p, dest / p.name)  # same file system: a rename, nothing copied
    return dest


class MetricsLog:
    """``metrics.jsonl`` opened for appending: one JSON object per line, flushed at once.
    A failed write (a full disk) raises an ``OSError`` that names the file."""

    def __init__(self, path):
        self.path = Path(path)
        self._f = open(self.path, "a")

    def write(self, record: dict):
        try:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from None

    def close(self):
        try:
            self._f.close()
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from None


def write_config(run_dir, text: str):
    """Write the run's ``config.toml`` atomically: a failed write (a full disk) keeps the
    earlier file and raises an ``OSError`` that names it."""
    from .checkpoint import atomic_write_bytes

    path = Path(run_dir) / "config.toml"
    try:
        atomic_write_bytes(path, text.encode())
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
