"""Data pipeline throughput: conversion (videos/s) and the shard reader (frames/s).

    OMP_NUM_THREADS=1 python benchmarks/bench_data.py            # ~1 minute on 2 cores
    python benchmarks/bench_data.py --batches 60 --workers 2

1. Conversion: every fixture clip in ../shared/fixtures (real videos and the miniature
   datasets' clips, the damaged ones included and skipped) laid out as a plain
   folder/<class>/ dataset, converted with 1 and with ``--workers`` processes (25 fps,
   short side 128, gzip 4). Reported in videos/s and stored frames/s.
2. Reader: the converted dataset (128 x ~171 frames, as training reads real data), read by a
   ClipLoader at batch 8, 16-frame clips, random 112x112 crop and flip, normalised float32:
   - ``sync``: ``make_batch`` in the calling thread (strictly one core), frames/s;
   - ``prefetch``: iterating ``epoch()`` (the background thread does the work), frames/s;
   - ``steady``: a consumer that takes 200 frames/s (the training step's rate; simulated
     with sleep), reporting the fraction of time it waited for data.
   The target is reader frames/s >= 10 x 200. Also with lzf compression.
Results: a table on stdout and ``benchmarks/results/data.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep import convert as cv  # noqa: E402
from ssmpi.data import ClipLoader, open_dataset  # noqa: E402

FIX = ROOT.parent / "shared" / "fixtures"
STEP_FPS = 200.0  # frames/s that the training step consumes at batch 8, 112x112 (assumed)


def fixture_folder(dst: Path) -> int:
    """Symlink every fixture clip into dst/<class>/; returns the number of files."""
    clips = sorted(p for p in FIX.rglob("*") if p.suffix.lower() in cv.VIDEO_EXTS)
    for i, p in enumerate(clips):
        d = dst / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        os.symlink(p, d / f"{i:03d}_{p.name}")
    return len(clips)


def bench_convert(src, out, workers, compression="gzip"):
    classes, items, missing = cv.layout_folder(src, "train")
    t0 = time.perf_counter()
    s = cv.convert("folder", out, classes=classes, items=items, missing=missing,
                   shards=str(max(2, 2 * workers)), workers=workers, quiet=True,
                   compression=compression)["train"]
    dt = time.perf_counter() - t0
    n = len(items["train"])
    return {"workers": workers, "compression": compression, "videos": n,
            "stored": s["stored"], "skipped": len(s["skipped"]), "frames": s["frames"],
            "seconds": dt, "videos_per_s": n / dt, "frames_per_s": s["frames"] / dt}


def bench_reader(root, batches, batch=8, clip=16, crop=112):
    ds = open_dataset(root, "train")
    kw = dict(batch_size=batch, clip_len=clip, crop=crop, seed=0, short_policy="loop")
    ld = ClipLoader(ds, **kw)
    per = batch * clip
    order, pad = ld._order(0)
    ld.make_batch(0, 0, order, pad)  # warm the file handles
    t0 = time.perf_counter()
    for b in range(batches):
        ld.make_batch(0, b % len(ld), order, pad)
    sync = batches * per / (time.perf_counter() - t0)
    t0, n = time.perf_counter(), 0
    e = 0
    while n < batches:
        for _ in ld.epoch(e):
            n += 1
            if n >= batches:
                break
        e += 1
    pre = batches * per / (time.perf_counter() - t0)
    # steady state: the consumer takes per/STEP_FPS seconds per batch
    ld.wait_time = 0.0
    steps, t0, n, e = min(batches, 30), time.perf_counter(), 0, 0
    first_wait = None
    while n < steps:
        for _ in ld.epoch(e):
            if first_wait is None:
                first_wait = ld.wait_time
            time.sleep(per / STEP_FPS)
            n += 1
            if n >= steps:
                break
        e += 1
    total = time.perf_counter() - t0
    ld.close()
    return {"batch": batch, "clip": clip, "crop": crop, "frames_per_s_sync": sync,
            "frames_per_s_prefetch": pre, "ratio_vs_step": sync / STEP_FPS,
            "steady_wait_fraction": (ld.wait_time - first_wait) / total,
            "steady_wait_s": ld.wait_time - first_wait, "steady_steps": steps}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "data.json")
    args = p.parse_args(argv)
    if not FIX.is_dir():
        print(f"no fixtures at {FIX}", file=sys.stderr)
        return 1
    res = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                       "omp_threads": os.environ.get("OMP_NUM_THREADS")},
           "step_frames_per_s_assumed": STEP_FPS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = fixture_folder(tmp / "src")
        res["convert"] = [bench_convert(tmp / "src", tmp / f"w{w}", w)
                          for w in sorted({1, args.workers})]
        res["convert"].append(bench_convert(tmp / "src", tmp / "lzf", args.workers, "lzf"))
        res["reader"] = {"gzip": bench_reader(tmp / f"w{args.workers}", args.batches),
                         "lzf": bench_reader(tmp / "lzf", args.batches)}
    print(f"conversion of {n} fixture clips (folder layout, 25 fps, short side 128):")
    print(f"  {'workers':>7} {'codec':>5} {'stored':>6} {'skipped':>7} {'s':>6} "
          f"{'videos/s':>8} {'frames/s':>8}")
    for c in res["convert"]:
        print(f"  {c['workers']:>7} {c['compression']:>5} {c['stored']:>6} {c['skipped']:>7} "
              f"{c['seconds']:>6.2f} {c['videos_per_s']:>8.2f} {c['frames_per_s']:>8.0f}")
    print(f"reader (batch 8, 16-frame clips, 112x112 random crop + flip, float32; "
          f"target >= {10 * STEP_FPS:.0f} frames/s):")
    print(f"  {'codec':>5} {'sync f/s':>9} {'prefetch f/s':>12} {'x step':>7} "
          f"{'steady wait':>11}")
    for k, r in res["reader"].items():
        print(f"  {k:>5} {r['frames_per_s_sync']:>9.0f} {r['frames_per_s_prefetch']:>12.0f} "
              f"{r['ratio_vs_step']:>7.1f} {100 * r['steady_wait_fraction']:>10.2f}%")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
