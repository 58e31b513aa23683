"""Synthetic video datasets in the ssmpi shard format, deterministic from a seed.

Usage::

    python -m data_prep.synthetic motion data/motion            # 4 directions, 32x32
    python -m data_prep.synthetic motion data/motion8 --classes 8 --speeds 1,2 --size 48
    python -m data_prep.synthetic frame-prediction data/bounce --frames 32

``motion``: a textured square moves over a static textured background with toroidal wrap;
the class is its velocity (direction, and speed when several are given). The start position
is uniform on the torus and the textures do not depend on the class, so the position in
every frame is uniform and **every class has the same distribution of single frames**: a
single-frame model is at chance by construction, a model that sees two frames can be
perfect. Class ``k`` moves in direction ``DIRECTIONS[k % D]`` at ``speeds[k // D]`` pixels
per frame, with ``D = classes / len(speeds)`` (default: 4 classes -> right, left, down, up).

``frame-prediction``: digit-like glyphs (seven-segment digits) bounce smoothly inside the
frame, for the t+offset future-frame task (task 'frames', labels -1).

Video ``i`` of a split is generated from ``numpy.random.default_rng([seed, split, i])``, so
the data do not depend on the number of shards.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import numpy as np

from data_prep import shards as sh
from ssmpi.data import shard_name

DIRECTIONS = [  # (dy, dx): right, left, down, up, then the diagonals
    (0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (-1, -1), (1, -1), (-1, 1)
]
DIR_NAMES = ["right", "left", "down", "up", "down-right", "up-left", "down-left", "up-right"]
SPLIT_CODES = {"train": 0, "test": 1, "val": 2}


def motion_classes(classes: int, speeds):
    """[(dy, dx, name)] velocity per class in pixels per (stored) frame."""
    speeds = [int(s) for s in speeds]
    if classes < 1 or classes % len(speeds):
        raise ValueError(f"--classes {classes} must be a multiple of the {len(speeds)} speeds")
    d = classes // len(speeds)
    if d > len(DIRECTIONS):
        raise ValueError(f"at most {len(DIRECTIONS)} directions per speed ({classes} classes)")
    out = []
    for k in range(classes):
        (dy, dx), s = DIRECTIONS[k % d], speeds[k // d]
        name = DIR_NAMES[k % d] + (f"-{s}px" if len(speeds) > 1 or s != 1 else "")
        out.append((dy * s, dx * s, name))
    return out


BACKGROUNDS = ("texture", "flat", "dynamic")


def motion_video(rng, *, label, classes, size, frames, square, noise, subsample,
                 background="texture"):
    """uint8 (frames, H, W, 3): a textured square (uniform in [0, 1]) moving with the class
    velocity over a ``background``: ``texture`` a still random texture (uniform in
    [0.2, 0.8], the default: the square is hard to tell from it in one frame), ``flat`` a
    constant 0.5 grey (the square stands out), ``dynamic`` a fresh random texture every frame
    (only the square persists from frame to frame). Additive noise ``noise`` on every frame."""
    if background not in BACKGROUNDS:
        raise ValueError(f"background {background!r} is not one of {', '.join(BACKGROUNDS)}")
    H, W = size
    dy, dx, _ = classes[label]
    bg = rng.uniform(0.2, 0.8, (H, W, 3)) if background == "texture" else np.full((H, W, 3), 0.5)
    tex = rng.uniform(0.0, 1.0, (square, square, 3))
    y0, x0 = rng.integers(0, H), rng.integers(0, W)
    out = np.empty((frames, H, W, 3), np.uint8)
    ar = np.arange(square)
    for t in range(frames):
        tt = t * subsample  # native frame number
        ys = (y0 + dy * tt + ar) % H
        xs = (x0 + dx * tt + ar) % W
        img = rng.uniform(0.2, 0.8, (H, W, 3)) if background == "dynamic" else bg.copy()
        img[np.ix_(ys, xs)] = tex
        if noise > 0:
            img += rng.normal(0.0, noise, img.shape)
        out[t] = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return out


# seven segments: (row0, col0, row1, col1) in a glyph box of 2 cells high x 1 wide
_SEGS = {
    "a": (0, 0, 0, 1), "b": (0, 1, 1, 1), "c": (1, 1, 2, 1), "d": (2, 0, 2, 1),
    "e": (1, 0, 2, 0), "f": (0, 0, 1, 0), "g": (1, 0, 1, 1),
}
_DIGITS = ["abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg"]


def glyph(digit, h, w):
    """bool (h, w) seven-segment digit."""
    g = np.zeros((h, w), bool)
    th = max(1, min(h, w) // 5)
    for s in _DIGITS[digit]:
        r0, c0, r1, c1 = _SEGS[s]
        y0, y1 = round(r0 * (h - th) / 2), round(r1 * (h - th) / 2) + th
        x0, x1 = round(c0 * (w - th)), round(c1 * (w - th)) + th
        g[y0:y1, x0:x1] = True
    return g


def bouncing_video(rng, *, size, frames, glyphs, noise, subsample, speed):
    """uint8 (frames, H, W, 3): seven-segment digits bouncing off the frame edges."""
    H, W = size
    gh, gw = max(5, H * 3 // 8), max(3, W // 4)
    objs = []
    for _ in range(glyphs):
        mask = glyph(int(rng.integers(0, 10)), gh, gw)
        color = rng.uniform(0.5, 1.0, 3)
        pos = np.array([rng.uniform(0, H - gh), rng.uniform(0, W - gw)])
        ang = rng.uniform(0, 2 * np.pi)
        vel = speed * rng.uniform(0.6, 1.0) * np.array([np.sin(ang), np.cos(ang)])
        objs.append([mask, color, pos, vel])
    bg = rng.uniform(0.0, 0.15, (H, W, 3))
    lim = np.array([H - gh, W - gw], float)
    out = np.empty((frames, H, W, 3), np.uint8)
    for t in range(frames * subsample):
        if t % subsample == 0:
            img = bg.copy()
            for mask, color, pos, _ in objs:
                y, x = int(round(pos[0])), int(round(pos[1]))
                reg = img[y : y + gh, x : x + gw]
                reg[mask] = np.maximum(reg[mask], color)
            if noise > 0:
                img += rng.normal(0.0, noise, img.shape)
            out[t // subsample] = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
        for o in objs:
            pos, vel = o[2], o[3]
            pos += vel
            for a in range(2):
                if pos[a] < 0:
                    pos[a], vel[a] = -pos[a], -vel[a]
                elif pos[a] > lim[a]:
                    pos[a], vel[a] = 2 * lim[a] - pos[a], -vel[a]
                pos[a] = min(max(pos[a], 0.0), lim[a])
    return out


def make_video(kind, params, split, i):
    """(frames, label) of video ``i`` of ``split``."""
    rng = np.random.default_rng([params["seed"], SPLIT_CODES.get(split, 9), i])
    if kind == "motion":
        classes = motion_classes(params["classes"], params["speeds"])
        # the label is drawn per video (not i % classes): shards take every S-th video, and
        # i % classes would give a shard (and so a data-parallel replica) a single class
        label = int(np.random.default_rng([params["seed"], SPLIT_CODES.get(split, 9), i,
                                           0xC1A55]).integers(len(classes)))
        return motion_video(
            rng, label=label, classes=classes, size=params["size"], frames=params["frames"],
            square=params["square"], noise=params["noise"], subsample=params["subsample"],
            background=params.get("background", "texture"),
        ), label
    return bouncing_video(
        rng, size=params["size"], frames=params["frames"], glyphs=params["glyphs"],
        noise=params["noise"], subsample=params["subsample"], speed=params["speed"],
    ), -1


def _write_shard(job):
    w = sh.ShardWriter(job["path"], **job["writer"])
    try:
        for i in job["items"]:
            frames, label = make_video(job["kind"], job["params"], job["split"], i)
            w.add(frames, label=label, source=f"synthetic:{job['kind']}/{job['split']}/{i}",
                  fps=job["fps"], orig_fps=job["fps"], orig_frames=len(frames))
            sh.progress_tick()
    except BaseException:
        w.abort()
        raise
    return w.close()


def generate(kind, out, *, splits, params, shards=4, workers=1, compression="gzip",
             gzip_level=4, fps=25.0, quiet=False):
    """Write the synthetic dataset ``kind`` to ``out``; returns the manifest path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task = "action" if kind == "motion" else "frames"
    names = ([c[2] for c in motion_classes(params["classes"], params["speeds"])]
             if kind == "motion" else [])
    done = {}
    for split, n in splits.items():
        if n <= 0:
            continue
        ns = max(1, min(shards, n))
        sid = sh.split_id({"kind": kind, "params": params, "n": n, "shards": ns,
                           "compression": compression, "gzip_level": gzip_level, "split": split})
        jobs, todo = [], 0
        for s in range(ns):
            path = out / shard_name(split, s, ns)
            items = list(range(s, n, ns))
            if sh.shard_is_complete(path, sid):
                continue
            todo += len(items)
            jobs.append({
                "path": path, "items": items, "kind": kind, "params": params, "split": split,
                "fps": fps, "writer": dict(split=split, split_id=sid, shard_index=s,
                                           num_shards=ns, task=task, compression=compression,
                                           gzip_level=gzip_level),
            })
        sh.run_jobs(_write_shard, jobs, workers=workers, total=todo, desc=f"{kind} {split}",
                    quiet=quiet)
        sums = [sh.read_shard_summary(out / shard_name(split, s, ns)) for s in range(ns)]
        done[split] = {"id": sid, "summaries": sums}
        if not quiet:
            print(f"{split}: {n} videos in {ns} shards ({ns - len(jobs)} reused)")
    settings = {"generator": f"data_prep.synthetic {kind}", **params,
                "compression": compression}
    return sh.write_manifest(out, task=task, class_names=names, splits=done, fps=fps,
                             settings=settings)


def _size(s):
    parts = s.lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    h, w = (int(p) for p in parts)
    if h < 4 or w < 4:
        raise argparse.ArgumentTypeError("size must be at least 4x4")
    return (h, w)


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m data_prep.synthetic",
        description="Write a synthetic video dataset in the ssmpi shard format.",
    )
    sub = p.add_subparsers(dest="kind", required=True)
    for kind, helptext in (
        ("motion", "classes are motions (direction/speed); single frames carry no class"),
        ("frame-prediction", "bouncing seven-segment digits for the t+offset task"),
    ):
        q = sub.add_parser(kind, help=helptext, description=helptext)
        q.add_argument("out", type=Path, help="output folder")
        q.add_argument("--size", type=_size, default=(32, 32), help="HxW or S (default 32)")
        q.add_argument("--frames", type=int, default=16 if kind == "motion" else 32,
                       help="frames per video (default %(default)s)")
        q.add_argument("--noise", type=float, default=0.05,
                       help="per-frame Gaussian noise std, in [0,1] units (default 0.05)")
        q.add_argument("--subsample", type=int, default=1,
                       help="keep every k-th frame of the native motion (default 1)")
        q.add_argument("--videos", type=int, default=512, help="training videos (512)")
        q.add_argument("--test-videos", type=int, default=128, help="test videos (128)")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--shards", type=int, default=4, help="shards per split (4)")
        q.add_argument("--workers", type=int, default=1, help="worker processes (1)")
        q.add_argument("--compression", choices=sh.COMPRESSIONS, default="gzip")
        q.add_argument("--gzip-level", type=int, default=4)
        q.add_argument("--quiet", action="store_true", help="no progress bar")
        if kind == "motion":
            q.add_argument("--classes", type=int, default=4, help="number of classes (4)")
            q.add_argument("--speeds", default="1",
                           help="comma-separated speeds in pixels/frame (default 1)")
            q.add_argument("--square", type=int, default=0,
                           help="side of the moving square (default: size/4)")
            q.add_argument("--background", choices=BACKGROUNDS, default="texture",
                           help="texture: a still random texture (default; the square is hard "
                           "to tell from it in one frame); flat: grey; dynamic: a new texture "
                           "every frame")
        else:
            q.add_argument("--glyphs", type=int, default=2, help="digits per video (2)")
            q.add_argument("--speed", type=float, default=1.5, help="pixels per frame (1.5)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    params = {"size": list(args.size), "frames": args.frames, "noise": args.noise,
              "subsample": args.subsample, "seed": args.seed}
    if args.frames < 1 or args.subsample < 1:
        print("error: --frames and --subsample must be >= 1", file=sys.stderr)
        return 2
    if args.kind == "motion":
        params["classes"] = args.classes
        params["speeds"] = [int(s) for s in str(args.speeds).split(",") if s.strip()]
        params["square"] = args.square or max(2, min(args.size) // 4)
        if args.background != "texture":  # the default stays out: split ids are unchanged
            params["background"] = args.background
        try:
            motion_classes(params["classes"], params["speeds"])
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if max(params["speeds"]) * args.subsample * 2 >= min(args.size):
            print("error: speed x subsample must be below half the frame size (wrap aliasing)",
                  file=sys.stderr)
            return 2
    else:
        params["glyphs"] = args.glyphs
        params["speed"] = args.speed
    stop = sh.StopOnSignals()  # SIGINT/SIGTERM: unfinished shards deleted, complete ones kept
    try:
        try:
            stop.install()
            path = generate(
                args.kind, args.out, splits={"train": args.videos, "test": args.test_videos},
                params=params, shards=args.shards, workers=args.workers,
                compression=args.compression, gzip_level=args.gzip_level, quiet=args.quiet,
            )
        except KeyboardInterrupt:  # Interrupted, or SIGINT's default handler
            signum = stop.signum or signal.SIGINT
        else:
            print(f"wrote {path}")
            return 0
        finally:
            stop.armed = False  # from here on signals are ignored: the clean-up completes
        done = len(list(Path(args.out).glob("*.h5"))) if Path(args.out).is_dir() else 0
        print(f"interrupted by {signal.Signals(signum).name}: unfinished shards deleted, {done} "
              f"complete shards kept in {args.out}; run the same command again to resume",
              file=sys.stderr)
        return 128 + signum
    finally:
        sh.stop_helper_processes()
        stop.restore()


if __name__ == "__main__":
    sys.exit(main())
