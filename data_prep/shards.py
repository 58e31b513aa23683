"""Writing the shard format that ``ssmpi.data`` reads (docs/DATA.md).

A shard is written to ``<name>.partial`` and renamed when complete, so a file with the final
name is always whole; a re-run finds it (same split id, complete) and skips it.
"""

from __future__ import annotations

import hashlib
import json
import os
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
    "COMPRESSIONS",
]

COMPRESSIONS = ("gzip", "lzf", "none")


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
        self.tmp = self.path.with_name(self.path.name + ".partial")
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
        try:
            self.f.close()
        finally:
            if self.tmp.exists():
                self.tmp.unlink()


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

_PROGRESS = None  # a multiprocessing queue in worker processes


def _init_worker(q):
    global _PROGRESS
    _PROGRESS = q
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def progress_tick(n: int = 1):
    """Called by a shard job after each video (a no-op outside a worker pool)."""
    if _PROGRESS is not None:
        _PROGRESS.put(n)


def run_jobs(fn, jobs: list, *, workers: int, total: int, desc: str, quiet: bool = False):
    """Run ``fn(job)`` for every job (one shard each), ``workers`` processes at a time, with a
    progress bar over ``total`` videos. Returns the results in job order."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="video", disable=quiet, leave=not quiet)
    try:
        if workers <= 1 or len(jobs) <= 1:
            results = []
            for job in jobs:
                before = bar.n
                results.append(fn(job))
                bar.update(job_size(job) - (bar.n - before))
            return results
        import multiprocessing as mp
        import queue as _queue
        from concurrent.futures import ProcessPoolExecutor

        # not "fork": the parent may run threads (a loader's prefetch thread, tqdm's monitor)
        # that hold locks (h5py's) at the moment of the fork
        methods = mp.get_all_start_methods()
        ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
        q = ctx.Queue()
        with ProcessPoolExecutor(
            max_workers=min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker,
            initargs=(q,)
        ) as ex:
            futs = [ex.submit(fn, job) for job in jobs]
            pending = set(futs)
            while pending:
                try:
                    bar.update(q.get(timeout=0.2))
                except _queue.Empty:
                    pass
                pending = {f for f in pending if not f.done()}
            results = [f.result() for f in futs]
            while True:
                try:
                    bar.update(q.get_nowait())
                except _queue.Empty:
                    break
            return results
    finally:
        bar.close()


def job_size(job) -> int:
    """Videos in a job (jobs are dicts with an ``items`` list)."""
    return len(job["items"])
