"""HDF5 shard reader: open-time validation, clip sampling, augmentation, prefetch, montage.

The shard format is written by ``data_prep/`` and documented in ``docs/DATA.md``. In short,
``<root>/manifest.json`` lists every split and its shard files; each shard
``<split>-00003-of-00008.h5`` holds ``/index/*`` (one entry per video: label, frame count,
height, width, source path, original fps and frame count) and ``/videos/<k:06d>`` (uint8,
``(frames, H, W, 3)``, chunked one frame per chunk).

Who reads what (DESIGN.md: the data reader is one of the two places that decide by rank):

- a rank that needs frames (the bottom unit; the top unit in frame prediction, which reads
  ``extra_frames`` more frames for the t+offset targets) opens its replica's shards and reads
  frames; it validates every video dataset of those shards when the loader is built;
- a rank that needs only labels (the top unit in action recognition) opens the same shards
  but reads only the small ``/index`` arrays;
- a rank that needs neither opens nothing: it knows the batch count from the manifest and
  yields batches of ``None``.

Every random choice (video order, clip start, crop, flip, scale) is drawn from a generator
seeded by ``(seed, epoch, replica, batch index)``, and a fixed number of uniform numbers is
drawn per sample whatever the rank reads, so every rank of a replica agrees on every clip.

Replicas (data parallelism): replica ``r`` of ``R`` takes shards ``r, r+R, r+2R, ...``. All
replicas yield the same number of batches per epoch, computed from the largest replica's
video count ``n_max`` (known to every rank from the manifest):

- ``drop_last=True`` (training): ``n_max // batch_size`` batches. A replica walks a fresh
  permutation of its own videos and, if it holds fewer than it needs, continues with a
  second permutation, so every video is used at least once per epoch except the remainder
  (< batch_size) of the largest replica, which differs from epoch to epoch.
- ``drop_last=False`` (evaluation): ``ceil(n_max / batch_size)`` batches of full size; every
  video appears exactly once with its index in ``Batch.video``; the slots after a replica's
  last video are filled with repeats of its first videos, marked ``video == -1`` so that
  evaluation can mask them (``batch.video >= 0``).
"""

from __future__ import annotations

import json
import queue
import threading
import time
import weakref
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "DataError",
    "Dataset",
    "Batch",
    "StreamStep",
    "ClipLoader",
    "open_dataset",
    "montage_stream",
    "shard_name",
]

FORMAT = "ssmpi-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TASKS = ("action", "frames")
SHORT_POLICIES = ("loop", "pad", "skip", "error")


class DataError(ValueError):
    """Bad input data: one line that names the file (and the video where there is one)."""


def shard_name(split: str, index: int, count: int) -> str:
    """File name of shard ``index`` of ``count`` of a split: ``train-00000-of-00008.h5``."""
    return f"{split}-{index:05d}-of-{count:05d}.h5"


def video_key(local_index: int) -> str:
    """Name of a video's frames dataset inside its shard: ``videos/000012``."""
    return f"videos/{local_index:06d}"


# --------------------------------------------------------------------------------------
# Dataset: the manifest, checked against the shard files
# --------------------------------------------------------------------------------------


class _Shard(NamedTuple):
    path: Path
    num_videos: int
    first_video: int  # global index (in the split) of the shard's first video


class Dataset:
    """One split of a sharded dataset, validated against its manifest.

    Attributes: ``root``, ``split``, ``task`` ('action' | 'frames'), ``num_videos``,
    ``num_classes``, ``class_names``, ``frame_shape`` (H, W, 3), ``shards`` (paths),
    ``fps``, ``manifest`` (the parsed JSON).

    ``frame_shape`` is the common frame shape when every video has the same size, else the
    largest (H, W) that fits inside every video (the biggest crop a loader may ask for);
    ``uniform_shape`` says which.
    """

    def __init__(self, root: Path, split: str, manifest: dict, shards: list, index: list):
        self.root = root
        self.split = split
        self.manifest = manifest
        self.task = manifest["task"]
        self.class_names = list(manifest.get("class_names", []))
        self.num_classes = len(self.class_names)
        self.fps = manifest.get("fps")
        sp = manifest["splits"][split]
        self._shards = shards
        self.shards = [s.path for s in shards]
        self.num_videos = sum(s.num_videos for s in shards)
        self._index = index  # per shard: dict of numpy arrays from /index, or None (lazy)
        self.frame_shape = tuple(int(v) for v in sp.get("frame_shape", (0, 0, 3)))
        self.uniform_shape = bool(sp.get("uniform_shape", True))

    def _ix(self, s: int) -> dict:
        """The /index arrays of shard ``s`` (read on first use when opened lazily)."""
        if self._index[s] is None:
            sp = self.manifest["splits"][self.split]
            path = self._shards[s].path
            with _h5open(path) as f:
                self._index[s] = _read_index(
                    f, path, sp["shards"][s], self.split, sp.get("id", ""), s, len(self.shards)
                )
        return self._index[s]

    @property
    def labels(self) -> np.ndarray:
        """Labels of all videos in split order (int64; -1 where the task has none)."""
        return np.concatenate([self._ix(s)["label"] for s in range(len(self.shards))]).astype(
            np.int64
        )

    @property
    def num_frames(self) -> np.ndarray:
        """Frame count of every video in split order."""
        return np.concatenate([self._ix(s)["num_frames"] for s in range(len(self.shards))]).astype(
            np.int64
        )

    def source(self, video: int) -> str:
        """Source path (as recorded at conversion) of the video with split index ``video``."""
        s, k = self._locate(video)
        return str(self._ix(s)["source"][k])

    def _locate(self, video: int):
        for s, sh in enumerate(self._shards):
            if sh.first_video <= video < sh.first_video + sh.num_videos:
                return s, video - sh.first_video
        raise IndexError(f"video {video} out of range (split has {self.num_videos})")

    def __repr__(self):
        return (
            f"Dataset({str(self.root)!r}, split={self.split!r}, task={self.task!r}, "
            f"videos={self.num_videos}, classes={self.num_classes}, shards={len(self.shards)}, "
            f"frame_shape={self.frame_shape})"
        )


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    if not path.is_file():
        raise DataError(f"{path}: manifest missing (is {root} a folder written by data_prep?)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not an {FORMAT} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: format version {manifest.get('version')}, this reader reads {FORMAT_VERSION}"
        )
    if manifest.get("task") not in TASKS:
        raise DataError(f"{path}: task {manifest.get('task')!r} is not one of {TASKS}")
    return manifest


def _h5open(path: Path):
    import h5py

    if not path.is_file():
        raise DataError(f"{path}: shard file missing (listed in the manifest)")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"{path}: not a readable HDF5 file (truncated or garbled?): {msg}"
        ) from None


_INDEX_FIELDS = ("label", "num_frames", "height", "width")


def _read_index(f, path: Path, entry: dict, split: str, split_id: str, shard: int, nshards: int):
    """Check a shard's attributes against its manifest entry; return its /index arrays."""
    try:
        a = f.attrs
        got = {
            "format": a.get("format"),
            "split": a.get("split"),
            "split_id": a.get("split_id"),
            "shard_index": a.get("shard_index"),
            "num_shards": a.get("num_shards"),
            "num_videos": a.get("num_videos"),
        }
        got = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in got.items()}
        want = {
            "format": FORMAT,
            "split": split,
            "split_id": split_id,
            "shard_index": shard,
            "num_shards": nshards,
            "num_videos": entry["num_videos"],
        }
        for k, w in want.items():
            g = got[k]
            if g is None or (str(g) if isinstance(w, str) else int(g)) != w:
                raise DataError(f"{path}: manifest says {k}={w!r}, the shard holds {k}={g!r}")
        n = int(entry["num_videos"])
        index = {}
        for k in _INDEX_FIELDS:
            if f"index/{k}" not in f:
                raise DataError(f"{path}: /index/{k} missing")
            arr = f[f"index/{k}"][()]
            if arr.shape != (n,):
                raise DataError(f"{path}: /index/{k} has shape {arr.shape}, expected ({n},)")
            index[k] = np.asarray(arr, dtype=np.int64)
        if "index/source" in f:
            index["source"] = np.array(
                [s.decode() if isinstance(s, bytes) else str(s) for s in f["index/source"][()]],
                dtype=object,
            )
        else:
            index["source"] = np.array([""] * n, dtype=object)
        return index
    except DataError:
        raise
    except Exception as e:  # h5py raises OSError/KeyError/RuntimeError on damaged metadata
        raise DataError(f"{path}: damaged shard metadata: {type(e).__name__}: {e}") from None


def open_dataset(root, split: str, *, validate: bool = True) -> Dataset:
    """Open one split of a dataset folder and validate the manifest against its shards.

    Checks, each failing with a one-line :class:`DataError` naming the file: the manifest
    exists and is ours; the split exists; every listed shard file exists and opens as HDF5;
    its attributes (split, split id, shard index and count, video count) match the manifest;
    its index arrays have one entry per video. Frame datasets are checked later, by the
    loaders that read frames (only those ranks open them).

    ``validate=False`` reads only the manifest (for a rank that reads no data); shard
    indexes are then read on first use.
    """
    root = Path(root)
    manifest = _read_manifest(root)
    splits = manifest.get("splits", {})
    if split not in splits:
        raise DataError(f"{root / MANIFEST}: no split {split!r} (has {sorted(splits)})")
    sp = splits[split]
    nshards = int(sp["num_shards"])
    if len(sp["shards"]) != nshards:
        raise DataError(
            f"{root / MANIFEST}: split {split!r} lists {len(sp['shards'])} shards, "
            f"num_shards={nshards}"
        )
    shards, index = [], []
    first = 0
    for i, entry in enumerate(sp["shards"]):
        path = root / entry["file"]
        if path.name != shard_name(split, i, nshards):
            raise DataError(f"{root / MANIFEST}: shard {i} of {split!r} is named {path.name}")
        if validate:
            with _h5open(path) as f:
                index.append(_read_index(f, path, entry, split, sp.get("id", ""), i, nshards))
        else:
            index.append(None)
        shards.append(_Shard(path, int(entry["num_videos"]), first))
        first += int(entry["num_videos"])
    if first != int(sp["num_videos"]):
        raise DataError(
            f"{root / MANIFEST}: split {split!r} says {sp['num_videos']} videos, "
            f"its shards hold {first}"
        )
    return Dataset(root, split, manifest, shards, index)


# --------------------------------------------------------------------------------------
# Clip loader
# --------------------------------------------------------------------------------------


class Batch(NamedTuple):
    """One batch. ``frames``: float (N, T+extra_frames, H, W, 3) normalised, or None;
    ``labels``: int64 (N,) or None; ``video``: int64 (N,) split indices of the videos (-1
    marks an evaluation padding slot); ``index``: batch index in the epoch."""

    frames: Optional[np.ndarray]
    labels: Optional[np.ndarray]
    video: np.ndarray
    index: int


# uniform numbers drawn per sample, in this order, whatever the rank reads
_U_START, _U_Y, _U_X, _U_FLIP, _U_SCALE, _U_LEN = range(6)
_NU = 6


def _as_channels(v, name):
    a = np.asarray(v, dtype=np.float64).reshape(-1)
    if a.size not in (1, 3):
        raise ValueError(f"{name} must be a number or 3 numbers, got {v!r}")
    return a


class ClipLoader:
    """Batches of clips from one replica's shards, prepared by a background thread.

    Parameters (keyword-only after ``dataset``):
        batch_size: clips per batch (N).
        clip_len: frames per clip (T); a clip spans ``(clip_len + extra_frames - 1) * stride
            + 1`` stored frames.
        stride: temporal stride (frame-rate subsampling).
        crop: output size (int or (h, w)); random crop when ``train``, centre crop otherwise;
            None keeps the stored size (every video must then have the same size).
        train: random video order, clip start and crop; else in order, centred.
        seed, replica, n_replicas: see the module docstring.
        flip: random horizontal flip (default: ``train``).
        scale_jitter: None or (lo, hi): take a square region of side ``crop * s``,
            s ~ U(lo, hi) (clipped to the frame), resized (bilinear) to ``crop`` (train only).
        mean, std: normalisation ``(x / 255 - mean) / std``; numbers or 3 per-channel values.
        short_policy: a video shorter than a clip: 'loop' (wrap around), 'pad' (repeat the
            last frame), 'skip' (leave the video out) or 'error' (DataError when the loader
            is built).
        need_frames, need_labels: what this rank reads (a rank with neither opens nothing).
        extra_frames: frames read after the clip (frame prediction targets t + offset).
        clips_per_video: each video appears this many times per epoch (different clips).
        drop_last: see the module docstring.
        prefetch: batches prepared ahead by the background thread.
        dtype: float dtype of the frames.

    ``wait_time`` accumulates the seconds the consumer spent blocked waiting for a batch.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        clip_len: int,
        stride: int = 1,
        crop=None,
        train: bool = True,
        seed: int = 0,
        replica: int = 0,
        n_replicas: int = 1,
        flip: Optional[bool] = None,
        scale_jitter: Optional[Sequence[float]] = None,
        mean=0.5,
        std=0.25,
        short_policy: str = "loop",
        need_frames: bool = True,
        need_labels: bool = True,
        extra_frames: int = 0,
        clips_per_video: int = 1,
        drop_last: bool = True,
        prefetch: int = 2,
        dtype=np.float32,
    ):
        ds = dataset
        if batch_size < 1 or clip_len < 1 or stride < 1 or extra_frames < 0:
            raise ValueError("batch_size, clip_len and stride must be >= 1, extra_frames >= 0")
        if clips_per_video < 1:
            raise ValueError("clips_per_video must be >= 1")
        if short_policy not in SHORT_POLICIES:
            raise ValueError(f"short_policy must be one of {SHORT_POLICIES}")
        if not 0 <= replica < n_replicas:
            raise ValueError(f"replica {replica} not in [0, {n_replicas})")
        if n_replicas > len(ds.shards):
            raise DataError(
                f"{ds.root}: split {ds.split!r} has {len(ds.shards)} shards, fewer than "
                f"{n_replicas} replicas (rewrite it with --shards >= {n_replicas})"
            )
        self.dataset = ds
        self.batch_size = int(batch_size)
        self.clip_len = int(clip_len)
        self.stride = int(stride)
        self.extra_frames = int(extra_frames)
        self.span = (self.clip_len + self.extra_frames - 1) * self.stride + 1
        self.train = bool(train)
        self.seed = int(seed)
        self.replica, self.n_replicas = int(replica), int(n_replicas)
        self.flip = self.train if flip is None else bool(flip)
        self.scale_jitter = tuple(scale_jitter) if scale_jitter is not None else None
        if crop is not None:
            crop = (int(crop), int(crop)) if np.isscalar(crop) else tuple(int(c) for c in crop)
        self.crop = crop
        self.short_policy = short_policy
        self.need_frames, self.need_labels = bool(need_frames), bool(need_labels)
        self.clips_per_video = int(clips_per_video)
        self.drop_last = bool(drop_last)
        self.prefetch = max(1, int(prefetch))
        self.dtype = np.dtype(dtype)
        mean, std = _as_channels(mean, "mean"), _as_channels(std, "std")
        self._lut = ((np.arange(256)[:, None] / 255.0 - mean) / std).astype(self.dtype)  # (256,C)
        self._lut_scalar = self._lut.shape[1] == 1
        self.wait_time = 0.0
        self._files = {}
        self._thread = None
        self._stop = None
        self._queue = None
        self._next = None

        reads = self.need_frames or self.need_labels
        use_index = reads or short_policy == "skip"
        span = self.span
        nshards = len(ds.shards)

        def replica_shards(r):
            return range(r, nshards, self.n_replicas)

        def usable(s):  # videos of shard s that this loader plays
            if short_policy == "skip":
                return int((ds._ix(s)["num_frames"] >= span).sum())
            return ds._shards[s].num_videos

        # this replica's videos: (shard, local index, split index, label, frames, H, W)
        rows = []
        for s in replica_shards(self.replica):
            sh = ds._shards[s]
            if use_index:
                ix = ds._ix(s)
                for k in range(sh.num_videos):
                    rows.append(
                        (
                            s,
                            k,
                            sh.first_video + k,
                            ix["label"][k],
                            ix["num_frames"][k],
                            ix["height"][k],
                            ix["width"][k],
                        )
                    )
            else:  # a rank that reads nothing: the manifest is enough
                rows.extend(
                    (s, k, sh.first_video + k, -1, -1, -1, -1) for k in range(sh.num_videos)
                )
        self._rows = np.array(rows, dtype=np.int64).reshape(-1, 7)
        if use_index:
            short = self._rows[:, 4] < span
            if short.any():
                s, k, _, _, n = self._rows[short][0, :5]
                if short_policy == "error":
                    raise DataError(
                        f"{self._where(s, k)} has {n} frames, a clip needs {span} "
                        f"(clip_len={clip_len}, extra_frames={extra_frames}, stride={stride}); "
                        f"{int(short.sum())} videos are too short (short_policy='error')"
                    )
                if short_policy == "skip":
                    self._rows = self._rows[~short]
            self.skipped_short = int(short.sum()) if short_policy == "skip" else 0
        else:
            self.skipped_short = 0
        if self.need_labels and use_index and ds.task == "action" and len(self._rows):
            lab = self._rows[:, 3]
            bad = (lab < 0) | (lab >= max(ds.num_classes, 1))
            if bad.any():
                s, k, _, y = self._rows[bad][0, :4]
                raise DataError(
                    f"{self._where(s, k)} has label {y}, outside [0, {ds.num_classes}) "
                    f"({int(bad.sum())} such videos)"
                )
        if self.need_frames and len(self._rows):
            if self.crop is not None:
                ch, cw = self.crop
                bad = (self._rows[:, 5] < ch) | (self._rows[:, 6] < cw)
                if bad.any():
                    s, k, _, _, _, h, w = self._rows[bad][0]
                    raise DataError(
                        f"{self._where(s, k)} is {h}x{w}, smaller than the crop {ch}x{cw}"
                    )
            elif not ds.uniform_shape:
                raise DataError(
                    f"{ds.root}: split {ds.split!r} has videos of different sizes; set crop "
                    f"(at most {ds.frame_shape[0]}x{ds.frame_shape[1]})"
                )
        if len(self._rows) == 0:
            raise DataError(
                f"{ds.root}: replica {replica} of {n_replicas} has no usable videos in split "
                f"{ds.split!r}"
            )
        self.num_replica_videos = len(self._rows)
        # the same batch count on every replica, from the largest replica
        n_max = max(sum(usable(s) for s in replica_shards(r)) for r in range(self.n_replicas))
        n_max *= self.clips_per_video
        self._n_batches = (
            n_max // self.batch_size if self.drop_last else -(-n_max // self.batch_size)
        )
        if self._n_batches == 0:
            raise DataError(
                f"{ds.root}: split {ds.split!r} has at most {n_max} clips per replica, fewer "
                f"than batch_size={batch_size}: no batch (use drop_last=False)"
            )
        if self.need_frames:
            self._validate_frames()

    # ------------------------------------------------------------------ files
    def _file(self, s):
        f = self._files.get(s)
        if f is None:
            f = self._files[s] = _h5open(self.dataset._shards[s].path)
        return f

    def _where(self, s, k):
        src = self.dataset._ix(s)["source"][k]
        return f"{self.dataset._shards[s].path}: video {k} ({src})"

    def _validate_frames(self):
        """Open-time check of every frame dataset this loader will read."""
        for s, k, _, _, n, h, w in self._rows:
            f = self._file(s)
            key = video_key(int(k))
            try:
                d = f[key]
                shape, dtype = d.shape, d.dtype
            except Exception as e:
                raise DataError(
                    f"{self._where(s, k)}: frames dataset /{key} unreadable: {e}"
                ) from None
            if dtype != np.uint8:
                raise DataError(f"{self._where(s, k)}: frames have dtype {dtype}, expected uint8")
            if shape != (n, h, w, 3):
                raise DataError(
                    f"{self._where(s, k)}: frames have shape {shape}, the index says "
                    f"{(int(n), int(h), int(w), 3)}"
                )

    def close(self):
        """Stop the prefetch thread and close the shard files."""
        self._stop_thread()
        for f in self._files.values():
            try:
                f.close()
            except Exception:
                pass
        self._files = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __len__(self):
        return self._n_batches

    # ------------------------------------------------------------------ planning
    def _order(self, epoch):
        """Rows of this replica's videos for the epoch, len(self) * batch_size of them, and a
        padding mask (True for evaluation padding slots)."""
        n = len(self._rows)
        need = self._n_batches * self.batch_size
        base = np.tile(np.arange(n), self.clips_per_video)
        if self.train:
            rng = np.random.default_rng([self.seed, epoch, self.replica, 0x0D0E])
            parts, total = [], 0
            while total < need:
                p = rng.permutation(base)
                parts.append(p)
                total += len(p)
            order = np.concatenate(parts)[:need] if parts else np.zeros(0, np.int64)
            pad = np.zeros(need, bool)
        else:
            reps = -(-need // max(1, len(base)))
            order = np.tile(base, reps)[:need]
            pad = np.arange(need) >= len(base)
        return order, pad

    def _plan(self, epoch, b, order, pad):
        """(rows, pad mask, uniforms) of batch b."""
        sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
        rng = np.random.default_rng([self.seed, epoch, self.replica, b, 0xC11])
        u = rng.random((self.batch_size, _NU))
        return self._rows[order[sl]], pad[sl], u

    def _frame_indices(self, n, u_start):
        span = self.span
        if n >= span:
            start = int(u_start * (n - span + 1)) if self.train else (n - span) // 2
            idx = start + np.arange(self.clip_len + self.extra_frames) * self.stride
        else:
            idx = np.arange(self.clip_len + self.extra_frames) * self.stride
            if self.short_policy == "loop":
                idx = idx % n
            else:  # pad (skip/error never get here with need_frames)
                idx = np.minimum(idx, n - 1)
        return idx

    def _crop_box(self, h, w, u):
        """(y0, x0, rh, rw) of the source region for one sample."""
        if self.crop is None:
            return 0, 0, h, w
        ch, cw = self.crop
        rh, rw = ch, cw
        if self.train and self.scale_jitter is not None:
            lo, hi = self.scale_jitter
            s = lo + (hi - lo) * u[_U_SCALE]
            rh, rw = min(h, max(1, round(ch * s))), min(w, max(1, round(cw * s)))
        if self.train:
            y0, x0 = int(u[_U_Y] * (h - rh + 1)), int(u[_U_X] * (w - rw + 1))
        else:
            y0, x0 = (h - rh) // 2, (w - rw) // 2
        return y0, x0, rh, rw

    def _read_clip(self, s, k, n, h, w, u):
        idx = self._frame_indices(int(n), u[_U_START])
        y0, x0, rh, rw = self._crop_box(int(h), int(w), u)
        f = self._file(s)
        try:
            d = f[video_key(int(k))]
            uniq, inv = np.unique(idx, return_inverse=True)
            if len(uniq) > 1 and (np.diff(uniq) == uniq[1] - uniq[0]).all():
                raw = d[uniq[0] : uniq[-1] + 1 : uniq[1] - uniq[0], y0 : y0 + rh, x0 : x0 + rw]
            else:
                raw = d[uniq, y0 : y0 + rh, x0 : x0 + rw]
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{self._where(s, k)}: cannot read frames: {msg}") from None
        if raw.shape[1:] != (rh, rw, 3):
            raise DataError(f"{self._where(s, k)}: frames have shape {raw.shape}")
        clip = raw[inv] if len(uniq) != len(idx) or (inv != np.arange(len(idx))).any() else raw
        if self.crop is not None and (rh, rw) != tuple(self.crop):
            clip = _resize_bilinear(clip, self.crop)
        if self.flip and u[_U_FLIP] < 0.5:
            clip = clip[:, :, ::-1]
        return clip

    def _normalise(self, x, out):
        if self._lut_scalar:
            np.take(self._lut[:, 0], x, out=out)
        else:
            for c in range(3):
                np.take(self._lut[:, c], x[..., c], out=out[..., c])
        return out

    def make_batch(self, epoch, b, order=None, pad=None) -> Batch:
        """Build batch ``b`` of ``epoch`` synchronously (the prefetch thread calls this)."""
        if order is None:
            order, pad = self._order(epoch)
        rows, padm, u = self._plan(epoch, b, order, pad)
        video = np.where(padm, -1, rows[:, 2]).astype(np.int64)
        labels = rows[:, 3].astype(np.int64) if self.need_labels else None
        frames = None
        if self.need_frames:
            t = self.clip_len + self.extra_frames
            if self.crop is not None:
                hh, ww = self.crop
            else:
                hh, ww = int(rows[0, 5]), int(rows[0, 6])
            frames = np.empty((len(rows), t, hh, ww, 3), self.dtype)
            for i, (s, k, _, _, n, h, w) in enumerate(rows):
                self._normalise(self._read_clip(s, k, n, h, w, u[i]), frames[i])
        return Batch(frames, labels, video, b)

    # ------------------------------------------------------------------ iteration
    def _stop_thread(self):
        if self._thread is not None:
            self._stop.set()
            if self._thread is not threading.current_thread():
                self._thread.join()
            self._thread = None
            self._queue = None
        self._next = None

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Iterate over the batches of ``epoch`` (deterministic given seed and epoch).

        A background thread prepares up to ``prefetch`` batches ahead. When an epoch is
        consumed to its end, the thread goes on with the first batches of the next epoch, so
        that ``epoch(e + 1)`` starts without waiting; any other call restarts it.
        """
        if not (self.need_frames or self.need_labels):
            return self._plain(epoch)
        if self._thread is None or self._next != epoch:
            self._stop_thread()
            self._start(epoch)
        self._next = None
        return self._consume(epoch, self._queue)

    def _start(self, first_epoch):
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        ref = weakref.ref(self)  # the thread must not keep an abandoned loader alive

        def put(item):
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    if ref() is None:
                        return False
            return False

        def work():
            e = first_epoch
            try:
                while not stop.is_set():
                    ld = ref()
                    if ld is None:
                        return
                    n, (order, pad) = ld._n_batches, ld._order(e)
                    del ld
                    for b in range(n):
                        ld = ref()
                        if ld is None or stop.is_set():
                            return
                        item = ld.make_batch(e, b, order, pad)
                        del ld
                        if not put((e, item)):
                            return
                    e += 1
            except BaseException as exc:  # handed to the consumer
                put((e, exc))

        th = threading.Thread(target=work, name="ssmpi-prefetch", daemon=True)
        self._thread, self._stop, self._queue = th, stop, q
        th.start()

    def _plain(self, epoch):
        order, pad = self._order(epoch)
        for b in range(self._n_batches):
            yield self.make_batch(epoch, b, order, pad)

    def _consume(self, epoch, q):
        done = False
        try:
            for b in range(self._n_batches):
                t0 = time.perf_counter()
                e, item = q.get()
                self.wait_time += time.perf_counter() - t0
                if isinstance(item, BaseException):
                    raise item
                assert e == epoch and item.index == b, (e, item.index, epoch, b)
                yield item
            done = True
        finally:
            if done and self._queue is q:
                self._next = epoch + 1  # the thread is already on the next epoch
            elif self._queue is q:
                self._stop_thread()


def _resize_bilinear(x, size):
    """Bilinear resize of uint8 (T, h, w, 3) to (T, H, W, 3) (align-corners=False)."""
    t, h, w, c = x.shape
    H, W = size

    def axis(n_in, n_out):
        pos = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        pos = np.clip(pos, 0, n_in - 1)
        i0 = np.floor(pos).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (pos - i0).astype(np.float32)

    y0, y1, fy = axis(h, H)
    x0, x1, fx = axis(w, W)
    xf = x.astype(np.float32)
    top = xf[:, y0] * (1 - fy)[None, :, None, None] + xf[:, y1] * fy[None, :, None, None]
    out = top[:, :, x0] * (1 - fx)[None, None, :, None] + top[:, :, x1] * fx[None, None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------
# Montage stream (stream mode)
# --------------------------------------------------------------------------------------


class StreamStep(NamedTuple):
    """One step of a montage stream, for N parallel lanes.

    ``frames``: float (N, H, W, 3) or None; ``labels``: int64 (N,) or None, the label of the
    clip each lane's frame belongs to; ``video``: int64 (N,) split index of that clip's
    video; ``cut``: bool (N,), True where this frame is the first of a new clip (a cut);
    ``step``: the step number since the stream began.
    """

    frames: Optional[np.ndarray]
    labels: Optional[np.ndarray]
    video: np.ndarray
    cut: np.ndarray
    step: int


def montage_stream(
    loader: ClipLoader,
    *,
    min_len: Optional[int] = None,
    start_epoch: int = 0,
    max_steps: Optional[int] = None,
) -> Iterator[StreamStep]:
    """A never-resetting stream of frames built from clips with cuts between them.

    Lane ``i`` of the stream plays sample ``i`` of batch 0 of ``start_epoch``, then sample
    ``i`` of batch 1, and so on through the epochs: each clip is cut after ``L`` frames,
    ``L ~ U{min_len .. loader.clip_len}`` drawn per lane and clip from the loader's seeded
    generator (default ``min_len = clip_len``: every clip plays whole), so lanes cut at
    different times. Every rank of a replica sees the same stream (same seed). A rank whose
    loader needs neither frames nor labels gets ``frames=None, labels=None``. Runs forever
    unless ``max_steps`` is given. ``loader.extra_frames`` must be 0 (a frame-prediction
    consumer takes its t+offset target from the stream itself, ``offset`` steps later).
    """
    if loader.extra_frames:
        raise ValueError("montage_stream needs a loader with extra_frames=0")
    T = loader.clip_len
    lo = T if min_len is None else int(min_len)
    if not 1 <= lo <= T:
        raise ValueError(f"min_len must be in [1, clip_len={T}]")
    N = loader.batch_size

    def batches():
        e = start_epoch
        while True:
            if len(loader) == 0:
                raise DataError(f"{loader.dataset.root}: the loader yields no batches")
            for b in loader.epoch(e):
                rng = np.random.default_rng([loader.seed, e, loader.replica, b.index, 0x5E6])
                lens = rng.integers(lo, T + 1, size=N)
                yield b, lens
            e += 1

    src = batches()
    lanes = [None] * N  # per lane: [batch, lens, pos]
    shared = []  # batches fetched so far and not yet consumed by every lane
    consumed = [0] * N  # index into shared per lane
    base = 0  # global index of shared[0]
    step = 0
    try:
        while max_steps is None or step < max_steps:
            frames = None
            labels = np.empty(N, np.int64) if loader.need_labels else None
            video = np.empty(N, np.int64)
            cut = np.zeros(N, bool)
            for i in range(N):
                if lanes[i] is None or lanes[i][2] >= lanes[i][1][i]:
                    j = consumed[i] - base
                    while j >= len(shared):
                        shared.append(next(src))
                    lanes[i] = [shared[j][0], shared[j][1], 0]
                    consumed[i] += 1
                    cut[i] = True
                b, lens, pos = lanes[i]
                if b.frames is not None:
                    if frames is None:
                        frames = np.empty((N,) + b.frames.shape[2:], b.frames.dtype)
                    frames[i] = b.frames[i, pos]
                if labels is not None:
                    labels[i] = b.labels[i]
                video[i] = b.video[i]
                lanes[i][2] += 1
            drop = min(consumed) - base
            if drop > 0:
                del shared[:drop]
                base += drop
            yield StreamStep(frames, labels, video, cut, step)
            step += 1
    finally:
        src.close()
