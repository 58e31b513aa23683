"""Summarise a shard folder and write a PNG contact sheet of sample frames.

Usage::

    python -m data_prep.inspect data/hmdb51                 # every split
    python -m data_prep.inspect data/motion --split train --videos 8 --frames 6 \\
        --sheet motion.png

Prints, per split: videos, shards, classes (with per-class counts), frames (total, min,
mean, max per video), frame sizes, bytes on disk and skipped videos. The contact sheet has
one row per sampled video (its first ``--frames`` frames spread over the video), labelled
by class in the printed legend. The PNG writer is plain zlib (no imaging dependency).
"""

from __future__ import annotations

import argparse
import struct
import sys
import zlib
from pathlib import Path

import numpy as np

from ssmpi.data import DataError, open_dataset, video_key


def write_png(path, img: np.ndarray) -> Path:
    """Write uint8 (H, W, 3) or (H, W) as an 8-bit PNG with only zlib."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    if img.ndim == 2:
        img = img[:, :, None].repeat(3, axis=2)
    h, w, c = img.shape
    if c != 3:
        raise ValueError("write_png wants (H, W, 3) or (H, W)")
    raw = np.concatenate([np.zeros((h, 1), np.uint8), img.reshape(h, w * 3)], axis=1)

    def chunk(tag, data):
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    png = (b"\x89PNG\r\n\x1a\n"
           + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
           + chunk(b"IEND", b""))
    path = Path(path)
    path.write_bytes(png)
    return path


def contact_sheet(ds, *, videos=8, frames=6, seed=0, pad=2, max_side=128):
    """uint8 image: ``videos`` rows (evenly spread over the split) x ``frames`` columns.
    Returns (image, [(video index, label, class name, source)])."""
    import h5py

    n = ds.num_videos
    picks = np.unique(np.linspace(0, n - 1, min(videos, n)).round().astype(int))
    tiles, legend = [], []
    for v in picks:
        s, k = ds._locate(int(v))
        with h5py.File(ds.shards[s], "r") as f:
            d = f[video_key(k)]
            idx = np.unique(np.linspace(0, d.shape[0] - 1, frames).round().astype(int))
            clip = d[list(idx)]
        step = max(1, int(np.ceil(max(clip.shape[1:3]) / max_side)))
        clip = clip[:, ::step, ::step]
        tiles.append(clip)
        lab = int(ds._ix(s)["label"][k])
        name = ds.class_names[lab] if 0 <= lab < len(ds.class_names) else "-"
        legend.append((int(v), lab, name, ds.source(int(v))))
    th = max(t.shape[1] for t in tiles)
    tw = max(t.shape[2] for t in tiles)
    H = len(tiles) * (th + pad) + pad
    W = frames * (tw + pad) + pad
    sheet = np.full((H, W, 3), 255, np.uint8)
    for r, clip in enumerate(tiles):
        for c, fr in enumerate(clip):
            y, x = pad + r * (th + pad), pad + c * (tw + pad)
            sheet[y : y + fr.shape[0], x : x + fr.shape[1]] = fr
    return sheet, legend


def summarise(root, split) -> list:
    """Lines describing one split."""
    ds = open_dataset(root, split)
    nf = ds.num_frames
    lab = ds.labels
    sp = ds.manifest["splits"][split]
    size = sum(Path(p).stat().st_size for p in ds.shards)
    lines = [
        f"[{split}] {ds.num_videos} videos in {len(ds.shards)} shards, task {ds.task}, "
        f"{size / 2**20:.1f} MiB",
        f"  frames: {int(nf.sum())} total, per video min {int(nf.min())} / mean "
        f"{nf.mean():.1f} / max {int(nf.max())}" if len(nf) else "  frames: none",
        f"  frame size: {'uniform ' if ds.uniform_shape else 'smallest '}"
        f"{ds.frame_shape[0]}x{ds.frame_shape[1]}",
        "  per shard (videos): " + " ".join(str(s["num_videos"]) for s in sp["shards"]),
    ]
    if ds.num_classes:
        counts = np.bincount(lab[lab >= 0], minlength=ds.num_classes)
        shown = ", ".join(f"{c} {n}" for c, n in zip(ds.class_names, counts))
        lines.append(f"  classes ({ds.num_classes}): {shown}")
    sk = sp.get("skipped", [])
    if sk:
        lines.append(f"  skipped at conversion: {len(sk)}")
        lines += [f"    {s['source']}: {s['reason']}" for s in sk[:20]]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m data_prep.inspect",
                                description="Summarise a shard folder; write a contact sheet.")
    p.add_argument("root", type=Path, help="dataset folder (with manifest.json)")
    p.add_argument("--split", default=None, help="one split (default: all)")
    p.add_argument("--sheet", type=Path, default=None,
                   help="contact sheet PNG (default <root>/contact-<split>.png)")
    p.add_argument("--no-sheet", action="store_true", help="do not write a contact sheet")
    p.add_argument("--videos", type=int, default=8, help="rows of the contact sheet (8)")
    p.add_argument("--frames", type=int, default=6, help="columns of the contact sheet (6)")
    args = p.parse_args(argv)
    import json

    from tqdm import tqdm

    try:
        mpath = args.root / "manifest.json"
        if not mpath.is_file():
            raise DataError(f"{mpath}: manifest missing")
        splits = [args.split] if args.split else sorted(json.loads(mpath.read_text())["splits"])
        out = []
        for split in tqdm(splits, desc="inspect", unit="split", leave=False):
            out += summarise(args.root, split)
            if not args.no_sheet:
                ds = open_dataset(args.root, split)
                sheet, legend = contact_sheet(ds, videos=args.videos, frames=args.frames)
                path = args.sheet if (args.sheet and len(splits) == 1) else (
                    args.root / f"contact-{split}.png")
                write_png(path, sheet)
                out.append(f"  contact sheet: {path} (rows: "
                           + "; ".join(f"#{v} {name}" for v, _, name, _ in legend) + ")")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
