"""Writing the shard format that ``ssmpi.data`` reads (docs/DATA.md).

A shard is written to ``<name>.partial`` and renamed when complete, so a file with the final
name is always whole; a re-run finds it (same split id, complete) and skips it.
Interrupted runs (:func:`run_jobs` stops its workers on any exception, KeyboardInterrupt
included) leave only whole shards once the caller removes the ``.partial`` files.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np

from ssmpi.data import FORMAT, FORMAT_VERSION, MANIFEST, shard_name, video_key

__all__ = [
    "ShardWriter",
    "balance",
    "split_id",
    "shard_is_complete",
    "read_shard_summary",
    "write_manifest",
    "partial_path",
    "Interrupted",
    "StopOnSignals",
    "check_stop",
    "signals_held",
    "run_jobs",
    "stop_helper_processes",
    "become_subreaper",
    "reap_children",
    "COMPRESSIONS",
]

COMPRESSIONS = ("gzip", "lzf", "none")


def partial_path(path: Path) -> Path:
    """Where the shard ``path`` is written until it is complete."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def split_id(plan: object) -> str:
    """A stable id of a split's conversion plan (inputs and settings): shards written by an
    earlier run with the same plan are reused, any other shard is rewritten."""
    blob = json.dumps(plan, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def balance(sizes: Sequence[float], n_shards: int) -> List[List[int]]:
    """Assign items to ``n_shards`` so that counts differ by at most one and sizes balance.

    Items sorted by size (largest first) are dealt in a snake order (0..S-1, S-1..0, ...);
    within a shard, items keep their input order. Deterministic.
    """
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    out: List[List[int]] = [[] for _ in range(n_shards)]
    for j, i in enumerate(order):
        r, q = divmod(j, n_shards)
        out[q if r % 2 == 0 else n_shards - 1 - q].append(i)
    return [sorted(b) for b in out]


class ShardWriter:
    """Write one shard: ``add`` each video's frames, then ``close`` (atomic rename)."""

    def __init__(
        self,
        path: Path,
        *,
        split: str,
        split_id: str,
        shard_index: int,
        num_shards: int,
        task: str,
        compression: str = "gzip",
        gzip_level: int = 4,
        extra_attrs: Optional[dict] = None,
    ):
        import h5py

        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}")
        self.path = Path(path)
        self.tmp = partial_path(self.path)
        self.f = h5py.File(self.tmp, "w")
        self.f.attrs.update(
            {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "split": split,
                "split_id": split_id,
                "shard_index": shard_index,
                "num_shards": num_shards,
                "task": task,
                "complete": 0,
            }
        )
        for k, v in (extra_attrs or {}).items():
            self.f.attrs[k] = v
        self.f.create_group("videos")
        self.kw = {"fletcher32": True}  # a checksum per chunk: garbled data fail to read
        if compression == "gzip":
            self.kw.update(compression="gzip", compression_opts=int(gzip_level))
        elif compression == "lzf":
            self.kw.update(compression="lzf")
        self.rows = {k: [] for k in ("label", "num_frames", "height", "width", "orig_frames")}
        self.fps, self.orig_fps, self.source = [], [], []
        self.skipped: List[dict] = []

    def add(self, frames: np.ndarray, *, label: int, source: str, fps: float = 0.0,
            orig_fps: float = 0.0, orig_frames: int = 0):
        """Store one video: uint8 (T, H, W, 3)."""
        frames = np.ascontiguousarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
            raise ValueError(f"{source}: frames must be uint8 (T, H, W, 3), got "
                             f"{frames.dtype} {frames.shape}")
        if frames.shape[0] < 1:
            raise ValueError(f"{source}: no frames")
        k = len(self.source)
        t, h, w, _ = frames.shape
        d = self.f.create_dataset(video_key(k), data=frames, chunks=(1, h, w, 3), **self.kw)
        d.attrs["label"] = int(label)
        d.attrs["source"] = str(source)
        for name, v in (("label", label), ("num_frames", t), ("height", h), ("width", w),
                        ("orig_frames", orig_frames)):
            self.rows[name].append(int(v))
        self.fps.append(float(fps))
        self.orig_fps.append(float(orig_fps))
        self.source.append(str(source))

    def skip(self, source: str, reason: str):
        """Record a video left out (kept in the shard so that a resumed run can report it)."""
        self.skipped.append({"source": str(source), "reason": str(reason)})

    def close(self) -> Path:
        import h5py

        g = self.f.create_group("index")
        for name, vals in self.rows.items():
            g.create_dataset(name, data=np.asarray(vals, dtype=np.int64).reshape(-1))
        g.create_dataset("fps", data=np.asarray(self.fps, dtype=np.float64))
        g.create_dataset("orig_fps", data=np.asarray(self.orig_fps, dtype=np.float64))
        g.create_dataset("source", data=self.source, dtype=h5py.string_dtype())
        self.f.attrs["num_videos"] = len(self.source)
        self.f.attrs["num_frames"] = int(sum(self.rows["num_frames"]))
        self.f.attrs["skipped"] = json.dumps(self.skipped)
        self.f.attrs["complete"] = 1
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self):
        """Drop the unfinished shard. Never raises: it runs while another exception (an
        interrupt, a failed video) propagates, and must not replace it."""
        try:
            self.f.close()
        except Exception:
            pass
        try:
            self.tmp.unlink()
        except OSError:
            pass


def shard_is_complete(path: Path, sid: str) -> bool:
    """True when ``path`` is a complete shard written for split id ``sid``."""
    import h5py

    if not Path(path).is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            return int(f.attrs.get("complete", 0)) == 1 and _s(f.attrs.get("split_id")) == sid
    except OSError:
        return False


def _s(v):
    return v.decode() if isinstance(v, bytes) else v


def read_shard_summary(path: Path) -> dict:
    """What the manifest needs from a complete shard."""
    import h5py

    with h5py.File(path, "r") as f:
        ix = f["index"]
        h, w = ix["height"][()], ix["width"][()]
        return {
            "file": Path(path).name,
            "num_videos": int(f.attrs["num_videos"]),
            "num_frames": int(f.attrs["num_frames"]),
            "bytes": Path(path).stat().st_size,
            "min_hw": [int(h.min()), int(w.min())] if len(h) else None,
            "hw": sorted({(int(a), int(b)) for a, b in zip(h, w)}),
            "skipped": json.loads(_s(f.attrs.get("skipped", "[]"))),
        }


def write_manifest(
    root: Path,
    *,
    task: str,
    class_names: Iterable[str],
    splits: dict,
    fps: Optional[float],
    settings: dict,
) -> Path:
    """Write (or update) ``root/manifest.json``.

    ``splits`` maps a split name to ``{"id": split_id, "summaries": [read_shard_summary, ...]}``.
    Splits already in an existing manifest with the same task and classes are kept.
    """
    root = Path(root)
    path = root / MANIFEST
    class_names = list(class_names)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "task": task,
        "class_names": class_names,
        "num_classes": len(class_names),
        "fps": fps,
        "settings": settings,
        "splits": {},
    }
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            if old.get("task") == task and old.get("class_names") == class_names:
                manifest["splits"].update(old.get("splits", {}))
        except ValueError:
            pass
    for name, sp in splits.items():
        sums = sp["summaries"]
        n = len(sums)
        hws = sorted({tuple(x) for s in sums for x in s["hw"]})
        mins = [s["min_hw"] for s in sums if s["min_hw"]]
        manifest["splits"][name] = {
            "id": sp["id"],
            "num_shards": n,
            "num_videos": sum(s["num_videos"] for s in sums),
            "num_frames": sum(s["num_frames"] for s in sums),
            "frame_shape": [min(m[0] for m in mins), min(m[1] for m in mins), 3] if mins
            else [0, 0, 3],
            "uniform_shape": len(hws) <= 1,
            "shards": [
                {k: s[k] for k in ("file", "num_videos", "num_frames", "bytes")} for s in sums
            ],
        }
        for i, s in enumerate(sums):
            assert s["file"] == shard_name(name, i, n), s["file"]
    tmp = path.with_name(MANIFEST + ".partial")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------
# Running shard jobs in worker processes, with one progress bar over videos
# --------------------------------------------------------------------------------------

class Interrupted(KeyboardInterrupt):
    """Raised in the main thread on SIGINT or SIGTERM under :class:`StopOnSignals`;
    ``signum`` says which. A KeyboardInterrupt, so that ``except Exception`` (decoding,
    h5py) never swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_STOP = None  # the installed StopOnSignals, for check_stop()


class StopOnSignals:
    """For a program's main thread: the first SIGINT or SIGTERM raises :class:`Interrupted`
    at once, except inside :func:`signals_held` (where decoding and HDF5 writing run: an
    exception raised asynchronously inside a library's callback may be dropped, or leave it
    in a state that crashes later), where :func:`check_stop` raises it at the next check
    (after each decoded frame and each video). ``check_stop`` also raises it again should
    the first one be lost: a handler can run inside a weakref callback or ``__del__``,
    where Python drops exceptions (this hides the message it would print). Once ``armed`` is
    False, or after the first, signals are ignored, so that the clean-up (bounded in time)
    completes. SIGINT stays ignored where the parent shell ignores it (``cmd &``)."""

    def __init__(self):
        self.signum, self.armed, self.held, self.old = None, True, 0, {}
        self.old_hook = None

    def install(self):
        global _STOP
        _STOP = self
        self.old_hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable
        for sig in (signal.SIGINT, signal.SIGTERM):
            cur = signal.getsignal(sig)
            if sig == signal.SIGINT and cur == signal.SIG_IGN:
                continue
            self.old[sig] = cur
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum is None and self.armed:
            self.signum = signum
            if not self.held:
                raise Interrupted(signum)

    def _unraisable(self, u):
        if not isinstance(u.exc_value, Interrupted):  # that one check_stop raises again
            self.old_hook(u)

    def check(self):
        if self.signum is not None and self.armed:
            raise Interrupted(self.signum)

    def restore(self):
        global _STOP
        for sig, h in self.old.items():
            signal.signal(sig, h)
        self.old = {}
        if self.old_hook is not None:
            sys.unraisablehook, self.old_hook = self.old_hook, None
        if _STOP is self:
            _STOP = None


class signals_held:
    """Inside, the signal handler of :class:`StopOnSignals` only notes a stop request;
    :func:`check_stop` raises it (a no-op without StopOnSignals)."""

    def __enter__(self):
        self.stop = _STOP
        if self.stop is not None:
            self.stop.held += 1
        return self

    def __exit__(self, *exc):
        if self.stop is not None:
            self.stop.held -= 1
        return False


def check_stop():
    """Raise :class:`Interrupted` if a signal asked to stop (see :class:`StopOnSignals`)."""
    if _STOP is not None:
        _STOP.check()


_PROGRESS = None  # a multiprocessing queue in worker processes


def _init_worker(q):
    global _PROGRESS
    _PROGRESS = q
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Ctrl-C in a terminal reaches the whole process group: the parent alone handles it
    # (it terminates the workers), no worker prints a KeyboardInterrupt traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _signals_deferred:
    """Hold SIGINT and SIGTERM while the workers start: a Python-level handler (such as the
    default KeyboardInterrupt) that comes meanwhile runs at exit instead, once. An exception
    raised inside ``Process.start()`` would leave a started worker that the pool does not
    know of, hence cannot stop. (Blocking the signals with ``pthread_sigmask`` would not do:
    another thread, BLAS's, receives them, and Python runs the handler in the main thread
    all the same.) Ignored and default dispositions are left alone; main thread only."""

    def __enter__(self):
        self.old, self.got = {}, []
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                h = signal.getsignal(sig)
                if callable(h):
                    self.old[sig] = h
                    signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame):
        self.got.append(signum)

    def __exit__(self, *exc):
        for sig, h in self.old.items():
            signal.signal(sig, h)
        if self.got:
            self.old[self.got[0]](self.got[0], None)  # raises, as it would have
        return False


def _start_forkserver():
    """Start multiprocessing's forkserver with SIGINT blocked. It keeps that mask and its
    children (the workers) inherit it, so a Ctrl-C to the terminal's process group during
    their start-up prints no KeyboardInterrupt traceback from them: the parent alone
    handles it. Only this thread blocks SIGINT meanwhile, so the parent misses nothing."""
    from multiprocessing import forkserver, resource_tracker

    if not hasattr(signal, "pthread_sigmask"):
        forkserver.ensure_running()
        return
    resource_tracker.ensure_running()  # it unblocks SIGINT after its own start: not inside
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def progress_tick(n: int = 1):
    """Called by a shard job after each video: progress in a worker, a stop check in the
    parent (the serial path)."""
    if _PROGRESS is not None:
        _PROGRESS.put(n)
    else:
        check_stop()


def run_jobs(fn, jobs: list, *, workers: int, total: int, desc: str, quiet: bool = False):
    """Run ``fn(job)`` for every job (one shard each), ``workers`` processes at a time, with a
    progress bar over ``total`` videos. Returns the results in job order.

    Any exception here (a failed job, KeyboardInterrupt, an exception raised by a signal
    handler) stops the pool at once: queued jobs are cancelled, running workers are
    terminated and joined, then the exception propagates. Unfinished shards stay behind as
    ``.partial`` files for the caller to remove (a worker killed mid-shard cannot)."""
    from tqdm import tqdm

    if workers <= 1 or len(jobs) <= 1:
        bar = tqdm(total=total, desc=desc, unit="video", disable=quiet, leave=not quiet)
        try:
            results = []
            for job in jobs:
                check_stop()
                before = bar.n
                with signals_held():  # fn checks after each video (progress_tick)
                    results.append(fn(job))
                bar.update(job_size(job) - (bar.n - before))
            return results
        finally:
            bar.close()
    import multiprocessing as mp
    import queue as _queue
    from concurrent.futures import ProcessPoolExecutor

    # not "fork": the parent may run threads (a loader's prefetch thread, tqdm's monitor)
    # that hold locks (h5py's) at the moment of the fork
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
    ex = q = bar = None
    try:
        with _signals_deferred():  # a signal now is handled at its end, inside this try
            if ctx.get_start_method() == "forkserver":
                _start_forkserver()
            bar = tqdm(total=total, desc=desc, unit="video", disable=quiet, leave=not quiet)
            q = ctx.Queue()
            ex = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx,
                                     initializer=_init_worker, initargs=(q,))
            futs = [ex.submit(fn, job) for job in jobs]  # starts the workers
        pending = set(futs)
        while pending:
            check_stop()
            try:
                bar.update(q.get(timeout=0.2))
            except _queue.Empty:
                pass
            pending = {f for f in pending if not f.done()}
            for f in futs:  # a failed job stops the run now, not after all the others
                if f.done() and not f.cancelled() and f.exception() is not None:
                    f.result()
        results = [f.result() for f in futs]
        while True:
            try:
                bar.update(q.get_nowait())
            except _queue.Empty:
                break
    except BaseException:
        if ex is not None:
            _stop_pool(ex)
        raise
    else:
        ex.shutdown(wait=True)
    finally:
        if q is not None:
            q.close()
            q.join_thread()
        if bar is not None:
            bar.close()
    return results


def _stop_pool(ex, timeout: float = 5.0):
    """Cancel queued jobs, terminate and join the workers, shut ``ex`` down; bounded time.

    ``ProcessPoolExecutor.shutdown`` alone waits for every queued job (on an interrupt it
    would convert them all), and Python < 3.14 has no public way to terminate the workers:
    this uses ``ex._processes`` and ``ex._executor_manager_thread`` (both since 3.9)."""
    manager = getattr(ex, "_executor_manager_thread", None)
    procs = list((getattr(ex, "_processes", None) or {}).values())
    # cancel_futures through shutdown, not Future.cancel(): the manager thread then drops
    # the cancelled items itself (3.11 raises InvalidStateError setting BrokenProcessPool
    # on a future cancelled behind its back)
    ex.shutdown(wait=False, cancel_futures=True)
    if not procs and hasattr(ex, "terminate_workers"):  # Python >= 3.14
        ex.terminate_workers()
    for p in procs:
        try:
            p.terminate()  # SIGTERM: workers keep the default action, they die at once
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(timeout)
        except (OSError, ValueError):
            pass
    if manager is not None:  # it sees the dead workers at once, fails their futures, ends
        manager.join(timeout)


def stop_helper_processes(timeout: float = 5.0):
    """Stop and reap multiprocessing's forkserver and resource tracker, if this process
    started them. Call it just before the program exits, after the last pool is shut down.

    Left alone they exit by themselves once this process is gone, but then nobody reaps
    them where PID 1 does not (containers): they would stay as zombies. Uses the private
    ``_stop`` methods (Python 3.8+), each under a timeout (then SIGKILL), so this never
    hangs; does nothing where they are missing."""
    import gc

    if "multiprocessing" not in sys.modules:
        return
    gc.collect()  # finalise dead queues first: their semaphores unregister with the tracker
    from multiprocessing import forkserver, resource_tracker

    for obj, pid_attr in ((getattr(forkserver, "_forkserver", None), "_forkserver_pid"),
                          (getattr(resource_tracker, "_resource_tracker", None), "_pid")):
        stop, pid = getattr(obj, "_stop", None), getattr(obj, pid_attr, None)
        if stop is None or pid is None:
            continue
        t = threading.Thread(target=_quietly, args=(stop,), daemon=True)
        t.start()
        t.join(timeout)
        if t.is_alive():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
            t.join(timeout)


def become_subreaper() -> bool:
    """Linux: adopt this process's orphaned descendants (``PR_SET_CHILD_SUBREAPER``), so
    that :func:`reap_children` can reap workers whose forkserver was killed before it
    reaped them (a SIGTERM to the whole process group). False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # 36: SET_SUBREAPER
    except (OSError, AttributeError):
        return False


def reap_children(timeout: float = 2.0) -> int:
    """Wait (at most ``timeout`` s) until this process has no children left, reaping each;
    returns how many were still there after the timeout. Call it last, when nothing else
    of this process may wait for its children."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return 0
        if pid == 0:  # children, none exited yet
            if time.monotonic() >= deadline:
                return len(_children())
            time.sleep(0.02)


def _children() -> list:
    try:
        with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as fh:
            return fh.read().split()
    except OSError:
        return []


def _quietly(fn):
    try:
        fn()
    except Exception:
        pass


def job_size(job) -> int:
    """Videos in a job (jobs are dicts with an ``items`` list)."""
    return len(job["items"])
