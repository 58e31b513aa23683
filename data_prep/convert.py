"""Convert real video datasets (official layouts and split files) to ssmpi shards.

Usage::

    python -m data_prep.convert hmdb51 hmdb51_org/ testTrainMulti_7030_splits/ data/hmdb51 \\
        --split-id 1
    python -m data_prep.convert ucf101 UCF-101/ ucfTrainTestlist/ data/ucf101 --split-id 1
    python -m data_prep.convert kinetics k600/ k600/annotations/ data/k600 --shards 64
    python -m data_prep.convert folder my_videos/ data/mine --split train

Every video is decoded with PyAV (FFmpeg), rotated as its rotation metadata says, resampled
to ``--fps`` (default 25; 0 keeps the source rate) by nearest timestamp, and resized so its
short side is ``--short-side`` (default 128; use 256 for 224 crops). Splits are written as
``<split>-0000i-of-0000N.h5`` shards, videos dealt to shards so that counts and bytes
balance; each shard is decoded by one worker process and renamed into place only when
complete, so a re-run skips finished shards.

A video that cannot be opened or decoded, or that decodes to fewer frames than its container
declares (a truncated file), is skipped, never stored short; so is a listed video missing on
disk. Every skipped video and its reason goes to ``<out>/skipped-<split>.tsv`` and the
manifest, and a summary line is printed. A malformed split-file line is an error naming the
file and line.

SIGINT (Ctrl-C) or SIGTERM stops the conversion within seconds: no more shards are started,
the workers are terminated and joined, unfinished shards are deleted, one line says how to
resume (run the same command again: complete shards are reused), and the exit code is 130
(SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import sys
from pathlib import Path

import numpy as np

from data_prep import shards as sh
from ssmpi.data import shard_name

VIDEO_EXTS = (".avi", ".mp4", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".flv",
              ".wmv", ".3gp", ".ogv")


class SplitFileError(ValueError):
    """A malformed line in a split or annotation file: ``file:line: what is wrong``."""


class VideoError(Exception):
    """A video that cannot be stored whole; the message is the reason it is skipped."""


Interrupted = sh.Interrupted  # raised by the CLI's SIGINT/SIGTERM handler


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


def _rotation(stream, frame) -> int:
    rot = getattr(frame, "rotation", None)
    if rot is None:  # older PyAV: the legacy 'rotate' tag (clockwise degrees)
        try:
            rot = -int(float(stream.metadata.get("rotate", 0)))
        except ValueError:
            rot = 0
    return int(round(float(rot) / 90.0)) % 4  # counter-clockwise quarter turns


def decode_video(path, *, fps: float = 25.0, short_side: int = 128, min_decoded: float = 0.98):
    """Decode a whole video to uint8 (T, H, W, 3).

    Returns ``(frames, info)`` with ``info = {"orig_fps", "orig_frames", "rotation"}``;
    raises :class:`VideoError` when the file cannot be opened or decoded, has no video
    stream, or decodes fewer than ``min_decoded`` x the frames its container declares (and
    at least 2 fewer): a truncated video is never returned short.
    """
    import av

    try:
        container = av.open(str(path))
    except Exception as e:
        raise VideoError(f"cannot open: {_msg(e)}") from None
    frames, times = [], []
    try:
        if not container.streams.video:
            raise VideoError("no video stream")
        s = container.streams.video[0]
        s.codec_context.thread_count = 1  # one decode thread per worker process
        rate = s.average_rate or s.guessed_rate or s.base_rate
        src_fps = float(rate) if rate else 0.0
        declared = int(s.frames or 0)
        if not declared:
            dur = (float(s.duration * s.time_base) if s.duration and s.time_base else
                   (container.duration or 0) / 1e6)
            declared = int(round(dur * src_fps)) if src_fps else 0
        rot, size = 0, None
        try:
            for fr in container.decode(s):
                sh.check_stop()  # a signal asked to stop (the CLI, decoding in-process)
                if size is None:
                    rot = _rotation(s, fr)
                    w, h = fr.width, fr.height
                    if short_side:
                        scale = short_side / min(w, h)
                        size = (max(1, round(w * scale)), max(1, round(h * scale)))
                    else:
                        size = (w, h)
                frames.append(fr.to_ndarray(format="rgb24", width=size[0], height=size[1],
                                            interpolation="AREA"))
                times.append(fr.time)
        except VideoError:
            raise
        except Exception as e:
            raise VideoError(f"decode error after {len(frames)} frames: {_msg(e)}") from None
    finally:
        container.close()
    n = len(frames)
    if n == 0:
        raise VideoError("no frames decoded")
    if declared and n < declared * min_decoded and n < declared - 2:
        raise VideoError(f"truncated: decoded {n} of the {declared} frames the container declares")
    if not src_fps:
        src_fps = fps or 25.0
    # source timestamps: container times if they increase, else frame count / rate
    t = np.array([np.nan if x is None else x for x in times], dtype=np.float64)
    if np.isnan(t).any() or (np.diff(t) <= 0).any():
        t = np.arange(n) / src_fps
    else:
        t = t - t[0]
    if fps and abs(fps - src_fps) > 1e-3:
        n_out = max(1, int(round(n * fps / src_fps)))
        tau = np.arange(n_out) / fps
        idx = np.clip(np.searchsorted(t, tau + 0.5 / src_fps, side="right") - 1, 0, n - 1)
    else:
        idx = np.arange(n)
    out = np.stack([frames[i] for i in idx])
    if rot:
        out = np.ascontiguousarray(np.rot90(out, k=rot, axes=(1, 2)))
    return out, {"orig_fps": src_fps, "orig_frames": n, "rotation": rot * 90}


def _msg(e) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0]}" if s else type(e).__name__


# --------------------------------------------------------------------------------------
# Layouts: each returns (class_names, {split: [item]}, {split: [(source, reason)]})
# item = {"path": str, "label": int, "source": str}
# --------------------------------------------------------------------------------------


def _lines(path: Path):
    """(line number, stripped text) of the non-empty lines; CRLF and trailing blanks ok."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise SplitFileError(f"{path}: unreadable: {e}") from None
    for i, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line:
            yield i, line


def _collect(root: Path, rel: str, label: int, items: list, missing: list):
    p = root / rel
    if p.is_file():
        items.append({"path": str(p), "label": label, "source": rel})
    else:
        missing.append((rel, "missing on disk"))


def layout_hmdb51(videos: Path, splits: Path, split_id: int = 1):
    files = sorted(Path(splits).glob(f"*_test_split{split_id}.txt"))
    if not files:
        raise SplitFileError(f"{splits}: no *_test_split{split_id}.txt files")
    classes = sorted(f.name[: -len(f"_test_split{split_id}.txt")] for f in files)
    out = {"train": [], "test": []}
    miss = {"train": [], "test": []}
    for f in files:
        cls = f.name[: -len(f"_test_split{split_id}.txt")]
        label = classes.index(cls)
        for ln, line in _lines(f):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise SplitFileError(
                    f"{f}:{ln}: expected '<video> <0|1|2>', got {line!r}"
                )
            if parts[1] == "0":
                continue
            split = "train" if parts[1] == "1" else "test"
            _collect(Path(videos), f"{cls}/{parts[0]}", label, out[split], miss[split])
    return classes, out, miss


def layout_ucf101(videos: Path, lists: Path, split_id: int = 1):
    lists = Path(lists)
    ci = lists / "classInd.txt"
    if not ci.is_file():
        raise SplitFileError(f"{ci}: missing")
    index = {}
    for ln, line in _lines(ci):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise SplitFileError(f"{ci}:{ln}: expected '<index> <ClassName>', got {line!r}")
        index[parts[1]] = int(parts[0]) - 1
    classes = [c for c, _ in sorted(index.items(), key=lambda kv: kv[1])]
    if sorted(index.values()) != list(range(len(classes))):
        raise SplitFileError(f"{ci}: class indices are not 1..{len(classes)}")
    out = {"train": [], "test": []}
    miss = {"train": [], "test": []}
    for split, name, with_label in (("train", "trainlist", True), ("test", "testlist", False)):
        f = lists / f"{name}{split_id:02d}.txt"
        if not f.is_file():
            raise SplitFileError(f"{f}: missing")
        for ln, line in _lines(f):
            parts = line.split()
            ok = len(parts) == (2 if with_label else 1) or (not with_label and len(parts) == 2)
            if not ok or "/" not in parts[0]:
                form = "'<Class>/<video> <index>'" if with_label else "'<Class>/<video>'"
                raise SplitFileError(f"{f}:{ln}: expected {form}, got {line!r}")
            cls = parts[0].split("/")[0]
            if cls not in index:
                raise SplitFileError(f"{f}:{ln}: class {cls!r} is not in {ci.name}")
            if len(parts) == 2:
                if not parts[1].isdigit() or int(parts[1]) - 1 != index[cls]:
                    raise SplitFileError(
                        f"{f}:{ln}: label {parts[1]!r} does not match class {cls!r} "
                        f"(index {index[cls] + 1} in {ci.name})"
                    )
            _collect(Path(videos), parts[0], index[cls], out[split], miss[split])
    return classes, out, miss


KINETICS_FIELDS = ("label", "youtube_id", "time_start", "time_end")
KINETICS_SPLITS = {"validate": "val", "valid": "val", "validation": "val"}


def layout_kinetics(videos: Path, annotations: Path):
    ann = Path(annotations)
    files = sorted(ann.glob("*.csv")) if ann.is_dir() else [ann]
    if not files:
        raise SplitFileError(f"{ann}: no CSV annotation files")
    rows = []
    for f in files:
        try:
            text = f.read_bytes().decode("utf-8-sig")
        except OSError as e:
            raise SplitFileError(f"{f}: unreadable: {e}") from None
        reader = csv.reader(text.splitlines())
        header = [h.strip() for h in next(reader, [])]
        if not all(k in header for k in KINETICS_FIELDS):
            raise SplitFileError(
                f"{f}:1: header must contain {','.join(KINETICS_FIELDS)}, got {header}"
            )
        col = {k: header.index(k) for k in header}
        for ln, rec in enumerate(reader, 2):
            if not rec or all(not x.strip() for x in rec):
                continue
            if len(rec) != len(header):
                raise SplitFileError(f"{f}:{ln}: {len(rec)} fields, the header has {len(header)}")
            rec = [x.strip() for x in rec]
            try:
                t0, t1 = int(float(rec[col["time_start"]])), int(float(rec[col["time_end"]]))
            except ValueError:
                raise SplitFileError(f"{f}:{ln}: time_start/time_end not numbers") from None
            label, yid = rec[col["label"]], rec[col["youtube_id"]]
            if not label or not yid:
                raise SplitFileError(f"{f}:{ln}: empty label or youtube_id")
            split = rec[col["split"]] if "split" in col and rec[col["split"]] else f.stem
            split = KINETICS_SPLITS.get(split, split)
            rows.append((split, label, f"{yid}_{t0:06d}_{t1:06d}"))
    classes = sorted({r[1] for r in rows})
    found = {}
    for dirpath, _, names in os.walk(videos):
        for nm in names:
            stem, ext = os.path.splitext(nm)
            if ext.lower() in VIDEO_EXTS:
                found.setdefault(stem, os.path.join(dirpath, nm))
    out, miss = {}, {}
    for split, label, stem in rows:
        out.setdefault(split, [])
        miss.setdefault(split, [])
        p = found.get(stem)
        if p is None:
            miss[split].append((f"{label}/{stem}", "missing on disk"))
        else:
            out[split].append({"path": p, "label": classes.index(label),
                               "source": os.path.relpath(p, videos)})
    return classes, out, miss


def layout_folder(root: Path, split: str = "train"):
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise SplitFileError(f"{root}: no class folders")
    items = []
    for label, c in enumerate(classes):
        for p in sorted((root / c).rglob("*")):
            if p.is_file() and p.suffix.lower() in VIDEO_EXTS:
                items.append({"path": str(p), "label": label,
                              "source": str(p.relative_to(root))})
    return classes, {split: items}, {split: []}


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def _write_shard(job):
    w = sh.ShardWriter(job["path"], **job["writer"])
    try:
        for it in job["items"]:
            try:
                frames, info = decode_video(it["path"], **job["decode"])
            except VideoError as e:
                w.skip(it["source"], str(e))
            else:
                w.add(frames, label=it["label"], source=it["source"], fps=job["decode"]["fps"]
                      or info["orig_fps"], orig_fps=info["orig_fps"],
                      orig_frames=info["orig_frames"])
            sh.progress_tick()
    except BaseException:
        w.abort()
        raise
    return w.close()


def _shard_counts(spec: str, splits) -> dict:
    """'8' -> every split 8; 'train=8,test=2' -> per split (others 1)."""
    spec = str(spec)
    if "=" not in spec:
        return {s: int(spec) for s in splits}
    out = {s: 1 for s in splits}
    for part in spec.split(","):
        k, v = part.split("=")
        out[k.strip()] = int(v)
    return out


def convert(layout, out, *, classes, items, missing, shards="8", workers=2, fps=25.0,
            short_side=128, compression="gzip", gzip_level=4, min_decoded=0.98,
            only=None, quiet=False):
    """Write the splits in ``items`` (a layout's output) to ``out``; returns a summary dict
    {split: {"stored", "frames", "skipped": [(source, reason)], "shards", "reused"}}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = _shard_counts(shards, items)
    decode = {"fps": float(fps), "short_side": int(short_side), "min_decoded": min_decoded}
    done, summary = {}, {}
    for split in sorted(items):
        if only and split not in only:
            continue
        its = items[split]
        if not its:
            print(f"{split}: no videos found on disk; split not written", file=sys.stderr)
            continue
        ns = max(1, min(counts.get(split, 1), len(its)))
        sizes = [os.path.getsize(it["path"]) for it in its]
        groups = sh.balance(sizes, ns)
        sid = sh.split_id({
            "layout": layout, "split": split, "decode": decode, "compression": compression,
            "gzip_level": gzip_level, "classes": classes,
            "groups": [[(its[i]["source"], its[i]["label"], sizes[i]) for i in g]
                       for g in groups],
        })
        jobs = []
        for s, g in enumerate(groups):
            path = out / shard_name(split, s, ns)
            if sh.shard_is_complete(path, sid):
                continue
            jobs.append({
                "path": path, "items": [its[i] for i in g], "decode": decode,
                "writer": dict(split=split, split_id=sid, shard_index=s, num_shards=ns,
                               task="action", compression=compression,
                               gzip_level=gzip_level,
                               extra_attrs={"layout": layout}),
            })
        try:
            sh.run_jobs(_write_shard, jobs, workers=workers,
                        total=sum(len(j["items"]) for j in jobs), desc=f"{layout} {split}",
                        quiet=quiet)
        except BaseException:
            # interrupted or failed: the workers are gone; drop what they left unfinished
            # (a re-run rewrites those shards and reuses the complete ones)
            for job in jobs:
                try:
                    sh.partial_path(job["path"]).unlink()
                except FileNotFoundError:
                    pass
            raise
        sums = [sh.read_shard_summary(out / shard_name(split, s, ns)) for s in range(ns)]
        skipped = [(m[0], m[1]) for m in missing.get(split, [])]
        skipped += [(x["source"], x["reason"]) for s in sums for x in s["skipped"]]
        done[split] = {"id": sid, "summaries": sums}
        report = out / f"skipped-{split}.tsv"
        with open(report, "w") as fh:
            fh.write("source\treason\n")
            for src, why in skipped:
                fh.write(f"{src}\t{why}\n")
        stored = sum(s["num_videos"] for s in sums)
        summary[split] = {"stored": stored, "frames": sum(s["num_frames"] for s in sums),
                          "skipped": skipped, "shards": ns, "reused": ns - len(jobs),
                          "report": str(report)}
        n_miss = len(missing.get(split, []))
        print(f"{split}: stored {stored} videos ({summary[split]['frames']} frames) in {ns} "
              f"shards ({ns - len(jobs)} reused); skipped {len(skipped)} "
              f"({len(skipped) - n_miss} unreadable, {n_miss} missing): see {report}")
    if done:
        sh.write_manifest(
            out, task="action", class_names=classes, splits=done, fps=float(fps) or None,
            settings={"layout": layout, **decode, "compression": compression},
        )
        for split in done:  # the manifest keeps the skip list too
            _add_skipped(out, split, summary[split]["skipped"])
    return summary


def _add_skipped(out: Path, split: str, skipped):
    import json

    from ssmpi.data import MANIFEST

    p = out / MANIFEST
    m = json.loads(p.read_text())
    m["splits"][split]["skipped"] = [{"source": s, "reason": r} for s, r in skipped]
    tmp = p.with_name(MANIFEST + ".partial")
    tmp.write_text(json.dumps(m, indent=1) + "\n")
    os.replace(tmp, p)


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m data_prep.convert",
        description="Convert a video dataset (official layout and splits) to ssmpi shards.",
    )
    sub = p.add_subparsers(dest="layout", required=True)

    def common(q):
        q.add_argument("out", type=Path, help="output folder")
        q.add_argument("--shards", default="8",
                       help="shards per split: N, or e.g. train=8,test=2 (default 8)")
        q.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                       help="decoding processes (default: the core count)")
        q.add_argument("--fps", type=float, default=25.0,
                       help="target frame rate; 0 keeps the source rate (default 25)")
        q.add_argument("--short-side", type=int, default=128,
                       help="resize the short side to this (128; 256 for 224 crops; 0 keeps)")
        q.add_argument("--compression", choices=sh.COMPRESSIONS, default="gzip")
        q.add_argument("--gzip-level", type=int, default=4)
        q.add_argument("--min-decoded", type=float, default=0.98,
                       help="skip a video that decodes fewer than this fraction of the "
                            "frames its container declares (default 0.98)")
        q.add_argument("--splits", default=None,
                       help="comma-separated splits to write (default: all)")
        q.add_argument("--quiet", action="store_true", help="no progress bar")

    q = sub.add_parser("hmdb51", help="HMDB51: <class>/<video>.avi + <class>_test_splitN.txt")
    q.add_argument("videos", type=Path, help="folder of class folders (hmdb51_org)")
    q.add_argument("split_files", type=Path, help="folder of *_test_splitN.txt")
    common(q)
    q.add_argument("--split-id", type=int, default=1, choices=(1, 2, 3))
    q = sub.add_parser("ucf101", help="UCF101: UCF-101/ + ucfTrainTestlist/")
    q.add_argument("videos", type=Path, help="UCF-101 folder")
    q.add_argument("split_files", type=Path, help="ucfTrainTestlist folder")
    common(q)
    q.add_argument("--split-id", type=int, default=1, choices=(1, 2, 3))
    q = sub.add_parser("kinetics", help="Kinetics-400/600/700: CSV annotations")
    q.add_argument("videos", type=Path, help="folder holding the videos (any depth)")
    q.add_argument("split_files", type=Path, help="annotation CSV file or folder of CSVs")
    common(q)
    q = sub.add_parser("folder", help="a plain folder/<class>/<video>")
    q.add_argument("videos", type=Path, help="folder of class folders")
    common(q)
    q.add_argument("--split", default="train", help="split name to write (default train)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    stop = sh.StopOnSignals()
    try:
        try:
            stop.install()
            return _main(args)
        except KeyboardInterrupt:  # Interrupted, or SIGINT's default handler
            signum = stop.signum or signal.SIGINT
        finally:
            stop.armed = False  # from here on signals are ignored: the clean-up completes
        out = Path(args.out)
        done = len(list(out.glob("*.h5"))) if out.is_dir() else 0
        print(f"interrupted by {signal.Signals(signum).name}: workers stopped, unfinished "
              f"shards deleted, {done} complete shards kept in {out}; run the same command "
              f"again to resume", file=sys.stderr)
        return 128 + signum
    finally:
        sh.stop_helper_processes()  # the forkserver and resource tracker: stopped, reaped
        stop.restore()


def _main(args) -> int:
    try:
        if not args.videos.is_dir():
            raise SplitFileError(f"{args.videos}: no such folder")
        if args.layout == "hmdb51":
            classes, items, missing = layout_hmdb51(args.videos, args.split_files, args.split_id)
        elif args.layout == "ucf101":
            classes, items, missing = layout_ucf101(args.videos, args.split_files, args.split_id)
        elif args.layout == "kinetics":
            classes, items, missing = layout_kinetics(args.videos, args.split_files)
        else:
            classes, items, missing = layout_folder(args.videos, args.split)
    except SplitFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    only = set(args.splits.split(",")) if args.splits else None
    convert(args.layout, args.out, classes=classes, items=items, missing=missing,
            shards=args.shards, workers=args.workers, fps=args.fps, short_side=args.short_side,
            compression=args.compression, gzip_level=args.gzip_level,
            min_decoded=args.min_decoded, only=only, quiet=args.quiet)
    return 0


def _cli() -> int:
    """The command: :func:`main` in a process that adopts orphaned descendants (workers
    whose forkserver was killed by a SIGTERM to the process group) and reaps every child
    before it exits. Not for in-process callers: it would reap their children too."""
    sh.become_subreaper()
    try:
        return main()
    finally:
        sh.reap_children()


if __name__ == "__main__":
    sys.exit(_cli())
