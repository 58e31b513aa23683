"""Study: future-frame prediction (the paper's Table 7 at small scale): Full-Res-like model,
target frame t+8, Sideways vs Skip-Sideways vs exact BPTT, test L2.

Methods (all serial, one process; placement does not change the mathematics):

- ``sideways``       Sideways engine (direct edges only): the top unit's output at step t is
                     a function of frame t-L+1 alone, so it predicts frame t+8 from a frame
                     L-1+8 steps older (it "lags behind", Figure 3);
- ``skip``           Skip-Sideways engine, k edges, fuse concat (paper's default): shortcut
                     edges bring newer frames (and several frames) to the top unit;
- ``bptt``           the same unrolled temporal model as ``skip`` (same units, edges, timing,
                     init) trained with exact backprop through time (:mod:`ssmpi.bptt`);
- ``bptt-sideways``  exact BPTT of the ``sideways`` model (= per-frame backprop of a
                     network that sees frame t-L+1): the best the Sideways model can do.

References on the same test clips and steps (no training): ``copy-newest`` predicts frame
t+8 by frame t (the newest frame given), ``copy-direct`` by frame t-L+1 (the frame the
Sideways top unit sees), ``mean-frame`` by the per-pixel mean frame of the training clips.

Test L2 (the number reported): the mean squared error per pixel and channel between the
top unit's output at step t and frame t+8, averaged over the valid steps t = L..T of one
centred clip per test video (and over the videos), in the loader's units
``(x / 255 - 0.5) / 0.25`` (divide by 16 for [0, 1] intensity units). The same definition
for every method and reference; it is the training objective J evaluated on test clips.

Dataset: ``data_prep.synthetic frame-prediction`` (bouncing seven-segment digits), generated
once under ``--data``. Every run writes ``<out>/runs/<key>.json`` (config, test-L2 curve,
training loss, gradient alignment) and is skipped when that file exists (resumable). At the
end: ``<out>/results.md`` (table) and ``<out>/curves.png`` / ``<out>/alignment.png`` when
matplotlib imports.

    python experiments/study_frames.py                     # the default grid (~35 min, 1 core)
    python experiments/study_frames.py --quick             # a smoke test (~1 minute)
    python experiments/study_frames.py --only base --seeds 0 --iters 200
    python experiments/study_frames.py --report-only       # rebuild table and plots
    python experiments/study_frames.py --align-probe 1,0.5,0.25,0   # pseudo/exact cosine

Gradient alignment (``--align-every N``, for the engine runs): every N iterations the engine
runs the clip with ``update=False``; its per-unit pseudo-gradient (accumulated grad / valid
steps, what ``update`` applies) is compared with the exact BPTT gradient dJ/dtheta_l of the
same model (same topology) at the same parameters on the same clip: cosine per unit.
"""

from __future__ import annotations

import study_common as sc  # isort: skip  (first: one BLAS thread, the repo root on sys.path)

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from ssmpi import data
from ssmpi.engine.bptt import BPTT
from ssmpi.engine.executor import Engine
from ssmpi.engine.topology import Placement, Topology
from ssmpi.nn import models

ROOT = sc.ROOT
DATA = Path(os.environ.get("SSMPI_STUDY_DATA", "/tmp/ssmpi_study_frames_data"))
METHODS = ("sideways", "skip", "bptt", "bptt-sideways")
REFS = ("copy-newest", "copy-direct", "mean-frame")
MODE = {"sideways": "sideways", "skip": "skip", "bptt": "skip", "bptt-sideways": "sideways"}

# base setting: 24x24 bouncing digits at 0.5 px/frame, Full-Res with 6 units of width 16,
# clips of T = 12 steps (top unit valid on steps 6..12), target t+8
BASE = dict(size=24, glyphs=2, speed=0.5, noise=0.02, frames=32, train_videos=1024,
            test_videos=128, units=6, width=16, k=2, T=12, offset=8, batch=8, lr=1e-3,
            iters=800)
# (name, overrides, methods, seeds: None = the --seeds given)
VARIANTS = [
    ("base", {}, ("sideways", "skip", "bptt"), None),
    ("speed1", dict(speed=1.0), ("sideways", "skip", "bptt"), (0,)),
    ("speed0.25", dict(speed=0.25), ("sideways", "skip", "bptt"), (0,)),
]


# -- data -----------------------------------------------------------------------------------
def dataset(cfg: dict) -> str:
    """Generate (once) the synthetic frame-prediction dataset of ``cfg``; returns its folder."""
    from data_prep import synthetic

    name = (f"fp_s{cfg['size']}_g{cfg['glyphs']}_v{cfg['speed']}_n{cfg['noise']}"
            f"_f{cfg['frames']}_{cfg['train_videos']}_{cfg['test_videos']}")
    root = DATA / name
    if not (root / "manifest.json").exists():
        params = {"size": [cfg["size"]] * 2, "frames": cfg["frames"], "noise": cfg["noise"],
                  "subsample": 1, "seed": 0, "glyphs": cfg["glyphs"], "speed": cfg["speed"]}
        synthetic.generate("frame-prediction", root,
                           splits={"train": cfg["train_videos"], "test": cfg["test_videos"]},
                           params=params, shards=4, quiet=True)
    return str(root)


def loader(root, split, cfg, train, seed=0):
    return data.ClipLoader(data.open_dataset(root, split), batch_size=cfg["batch"],
                           clip_len=cfg["T"], train=train, flip=False, seed=seed,
                           extra_frames=cfg["offset"], need_labels=False, drop_last=train)


# -- models ---------------------------------------------------------------------------------
def spec_of(cfg):
    return models.fullres(units=cfg["units"], width=cfg["width"], resolution=cfg["size"])


def build(method: str, cfg: dict, seed: int):
    """The trainer object of ``method``: a serial Engine or a BPTT."""
    opt = dict(name="adam", lr=cfg["lr"])
    topo = Topology(spec_of(cfg), mode=MODE[method], k=cfg["k"], fuse="concat")
    if method.startswith("bptt"):
        return BPTT(topo, seed=seed, optimizer=opt, frame_offset=cfg["offset"])
    return Engine(topo, Placement(topo.L, 1), MPI.COMM_SELF, batch=cfg["batch"], seed=seed,
                  optimizer=opt, frame_offset=cfg["offset"])


def run(model, T, frames, **kw):
    """One clip: frames (N, T + offset, ...) are the input and the targets."""
    if isinstance(model, BPTT):
        return model.run_clip(T, frames, targets=frames, **kw)
    return model.run_clip(T, frames, None, frames, **kw)


def test_batches(root, cfg):
    ld = loader(root, "test", cfg, train=False)
    try:
        for b in ld.epoch(0):
            if (b.video < 0).any():
                raise ValueError("test batch padded: choose test_videos divisible by batch")
            yield b.frames
    finally:
        ld.close()


def evaluate(model, root, cfg) -> float:
    """Test L2 (see the module docstring): mean over batches of the mean over valid steps."""
    vals = []
    for f in test_batches(root, cfg):
        st = run(model, cfg["T"], f, train=False)
        vals.append(st.loss)
    return float(np.mean(vals))


def references(root, cfg) -> dict:
    """Test L2 of the trivial predictors on the same clips and steps as the models."""
    T, off, L = cfg["T"], cfg["offset"], cfg["units"]
    mean = None
    ld = loader(root, "train", cfg, train=True, seed=123)
    try:
        n = 0
        for i, b in enumerate(ld.epoch(0)):
            s = b.frames.astype(np.float64).mean(axis=(0, 1))
            mean = s if mean is None else mean + s
            n += 1
            if i >= 63:
                break
        mean /= n
    finally:
        ld.close()
    out = {r: [] for r in REFS}
    for f in test_batches(root, cfg):
        f = f.astype(np.float64)
        steps = [t for t in range(L, T + 1) if t + off <= f.shape[1]]
        for r in REFS:
            e = []
            for t in steps:
                y = f[:, t + off - 1]
                p = {"copy-newest": f[:, t - 1], "copy-direct": f[:, t - L],
                     "mean-frame": mean}[r]
                e.append(np.mean((p - y) ** 2))
            out[r].append(np.mean(e))
    return {r: float(np.mean(v)) for r, v in out.items()}


def alignment(eng: Engine, twin: BPTT, frames, T):
    """One training step of ``eng`` with, first, the cosine between its per-unit
    pseudo-gradient and the exact BPTT gradient of the same parameters on the same clip."""
    st = run(eng, T, frames, update=False)
    pseudo = sc.pseudo_gradients(eng)
    twin.load_parameters(eng.parameters())
    run(twin, T, frames, update=False)
    exact = twin.gradients()
    eng.update()
    return st, {str(l): sc.cosine(pseudo[l], exact[l]) for l in pseudo}


# -- one run --------------------------------------------------------------------------------
def run_one(out: Path, variant: str, cfg: dict, method: str, seed: int, eval_every: int,
            align_every: int) -> dict:
    key = f"{variant}__{method}__s{seed}"
    path = out / "runs" / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    root = dataset(cfg)
    model = build(method, cfg, seed)
    twin = None
    if align_every and not method.startswith("bptt"):
        twin = BPTT(Topology(spec_of(cfg), mode=MODE[method], k=cfg["k"], fuse="concat"),
                    seed=seed, frame_offset=cfg["offset"])
    ld = loader(root, "train", cfg, train=True, seed=seed)
    T, iters = cfg["T"], cfg["iters"]
    curve, losses, align = [[0, evaluate(model, root, cfg)]], [], []
    t0 = time.perf_counter()
    it, ep = 0, 0
    try:
        while it < iters:
            for b in ld.epoch(ep):
                if twin is not None and it % align_every == 0:
                    st, cos = alignment(model, twin, b.frames, T)
                    align.append({"it": it, "cos": cos})
                else:
                    st = run(model, T, b.frames)
                losses.append(st.loss)
                it += 1
                if it % eval_every == 0 or it == iters:
                    l2 = evaluate(model, root, cfg)
                    curve.append([it, l2])
                    print(f"  {key} it {it}: test L2 {l2:.4f} train "
                          f"{np.mean(losses[-eval_every:]):.4f} "
                          f"({time.perf_counter() - t0:.0f} s)", flush=True)
                if it >= iters:
                    break
            ep += 1
    finally:
        ld.close()
    res = dict(key=key, variant=variant, method=method, seed=seed, cfg=cfg, curve=curve,
               final_l2=curve[-1][1], best_l2=min(v for _, v in curve),
               loss=[float(np.mean(losses[i:i + 50])) for i in range(0, len(losses), 50)],
               align=align, seconds=round(time.perf_counter() - t0, 1),
               command=sc.command("study_frames.py"))
    sc.write_json(path, res)
    return res


def refs_for(out: Path, variant: str, cfg: dict) -> dict:
    path = out / "runs" / f"{variant}__refs.json"
    if path.exists():
        return json.loads(path.read_text())
    res = dict(key=f"{variant}__refs", variant=variant, method="refs", cfg=cfg,
               l2=references(dataset(cfg), cfg))
    sc.write_json(path, res)
    return res


# -- alignment probe ------------------------------------------------------------------------
def align_probe(out: Path, speeds, npre: int, nclips: int = 6, seed: int = 0) -> dict:
    """How well the engine's pseudo-gradients point along the exact gradient, by the speed of
    the digits. For each speed and each of sideways / skip: parameters at init and after
    ``npre`` iterations of exact BPTT training of the same model; at those parameters, the
    cosine per unit between the engine's pseudo-gradient and the BPTT gradient, averaged
    over ``nclips`` training clips. Written to ``<out>/align_probe.json``."""
    path = out / "align_probe.json"
    res = json.loads(path.read_text()) if path.exists() else {"npre": npre, "rows": []}
    have = {(r["speed"], r["phase"], r["method"]) for r in res["rows"]}
    for speed in speeds:
        cfg = dict(BASE, speed=speed, train_videos=256, test_videos=32)
        phases = ("init", f"bptt{npre}")
        if all((speed, ph, m) in have for ph in phases for m in ("sideways", "skip")):
            continue
        ld = loader(dataset(cfg), "train", cfg, train=True, seed=seed)
        clips, ep = [], 0
        try:
            while len(clips) < npre + nclips:
                clips += [b.frames for b in ld.epoch(ep)]
                ep += 1
        finally:
            ld.close()
        for m, pm in (("sideways", "bptt-sideways"), ("skip", "bptt")):
            pre = build(pm, cfg, seed)
            for ph in phases:
                if ph != "init":
                    for f in clips[:npre]:
                        run(pre, cfg["T"], f)
                eng, twin = build(m, cfg, seed), build(pm, cfg, seed)
                cs = []
                for f in clips[npre:npre + nclips]:
                    for l, u in eng.units.items():
                        u.theta[...] = pre.units[l].theta
                    run(eng, cfg["T"], f, update=False)
                    pseudo = sc.pseudo_gradients(eng)
                    for u in eng.units.values():
                        u.zero_grad()
                    twin.load_parameters(eng.parameters())
                    run(twin, cfg["T"], f, update=False)
                    exact = twin.gradients()
                    cs.append([sc.cosine(pseudo[l], exact[l]) for l in sorted(pseudo)])
                row = dict(speed=speed, phase=ph, method=m,
                           cos=[float(c) for c in np.mean(cs, axis=0)])
                print(f"  align probe speed {speed} {ph} {m}: "
                      + " / ".join(f"{c:.2f}" for c in row["cos"]), flush=True)
                res["rows"].append(row)
        sc.write_json(path, res)
    return res


# -- report ---------------------------------------------------------------------------------
def report(out: Path):
    allr = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    runs = [r for r in allr if r["method"] != "refs"]
    refs = {r["variant"]: r for r in allr if r["method"] == "refs"}
    if not runs:
        return
    order = {v[0]: i for i, v in enumerate(VARIANTS)}
    lines = ["| variant | method | seeds | final test L2 (mean / each seed) | best eval L2 "
             "(mean) | [0,1] units (final mean) | mean pseudo/exact cosine U1..UL "
             "(last half) | s/run |",
             "|---|---|---|---|---|---|---|---|"]
    for (v, m), rs in sc.grouped(runs, VARIANTS, METHODS):
        l2 = [r["final_l2"] for r in rs]
        cos = sc.mean_cosines(rs)
        lines.append(f"| {v} | {m} | {', '.join(str(r['seed']) for r in rs)} | "
                     f"{np.mean(l2):.4f} / {', '.join(f'{a:.4f}' for a in l2)} | "
                     f"{np.mean([r['best_l2'] for r in rs]):.4f} | {np.mean(l2) / 16:.5f} | "
                     f"{cos} | {np.mean([r['seconds'] for r in rs]):.0f} |")
    for v, rr in sorted(refs.items(), key=lambda kv: order.get(kv[0], 99)):
        for name, val in rr["l2"].items():
            lines.append(f"| {v} | ref: {name} | - | {val:.4f} | - | {val / 16:.5f} | - | - |")
    cfgs = {r["variant"]: r["cfg"] for r in runs}
    lines += ["", "Test L2: mean squared error per pixel and channel between the top output "
              "at step t and frame t+offset, over the valid steps t = L..T of one centred "
              "clip per test video, in loader units (x/255-0.5)/0.25; [0,1] units = /16.",
              "", "Settings per variant:", ""]
    for v, c in sorted(cfgs.items(), key=lambda kv: order.get(kv[0], 99)):
        lines.append(f"- {v}: " + ", ".join(f"{k}={c[k]}" for k in sorted(c)))
    if (out / "align_probe.json").exists():
        ap = json.loads((out / "align_probe.json").read_text())
        lines += ["", f"Alignment probe (--align-probe): sc.cosine(pseudo-gradient, exact BPTT "
                  f"gradient) per unit, mean over 6 training clips, at init and after "
                  f"{ap['npre']} iterations of exact BPTT training of the same model "
                  "(base model and clips, 256 training videos, seed 0, speed varied):", "",
                  "| speed (px/frame) | parameters | method | cosine U1 .. UL |",
                  "|---|---|---|---|"]
        for r in sorted(ap["rows"], key=lambda r: (-r["speed"], r["phase"] != "init",
                                                   r["method"])):
            lines.append(f"| {r['speed']} | {r['phase']} | {r['method']} | "
                         + " / ".join(f"{c:.2f}" for c in r["cos"]) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    variants = sorted({r["variant"] for r in runs}, key=lambda v: order.get(v, 99))
    ncol = min(4, len(variants))
    nrow = -(-len(variants) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 3.6 * nrow), squeeze=False)
    for ax in axes.flat[len(variants):]:
        ax.set_visible(False)
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, v in zip(axes.flat, variants):
        vr = [r for r in runs if r["variant"] == v]
        for r in sorted(vr, key=lambda r: r["seed"]):
            c = np.array(r["curve"])
            first = r["seed"] == min(q["seed"] for q in vr if q["method"] == r["method"])
            ax.plot(c[:, 0], c[:, 1], color=colors[r["method"]], alpha=0.8,
                    label=r["method"] if first else None)
        for (name, val), ls in zip(refs.get(v, {}).get("l2", {}).items(), (":", "--", "-.")):
            ax.axhline(val, color="gray", lw=0.8, ls=ls, label=name)
        hi = max(r["curve"][1][1] if len(r["curve"]) > 1 else r["curve"][0][1] for r in vr)
        ax.set_ylim(0, max(hi, *refs.get(v, {}).get("l2", {0: 0}).values()) * 1.1)
        ax.set_title(v)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test L2 (frame t+8)")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)
    sc.plot_alignment([r for r in runs if r["align"]], out / "alignment.png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sc.study_args(p, "study_frames", 100)
    p.add_argument("--lr", type=float, default=0.0, help="override the learning rate")
    p.add_argument("--batch", type=int, default=0, help="override the batch size")
    p.add_argument("--align-probe", default="",
                   help="comma-separated speeds: run only the alignment probe (e.g. 1,0.5,0.25,0)")
    p.add_argument("--probe-pretrain", type=int, default=100,
                   help="BPTT iterations before the second probe point")
    a = p.parse_args(argv)
    global DATA
    DATA = a.data or DATA
    out = a.out
    if a.quick:
        out = out / "quick"
        a.iters, a.eval_every, a.align_every, a.seeds = 20, 10, 10, "0"
        a.only = a.only or "base"  # one dataset to generate, not three
    if a.align_probe:
        align_probe(out, [float(v) for v in a.align_probe.split(",") if v], a.probe_pretrain)
    elif not a.report_only:
        only = [v for v in a.only.split(",") if v]
        meths = [m for m in a.methods.split(",") if m]
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
        for (name, over, methods, vseeds), seed in itertools.product(VARIANTS, seeds):
            if only and name not in only or vseeds is not None and seed not in vseeds:
                continue
            cfg = dict(BASE, **over)
            if a.iters:
                cfg["iters"] = a.iters
            if a.lr:
                cfg["lr"] = a.lr
            if a.batch:
                cfg["batch"] = a.batch
            refs_for(out, name, cfg)
            for m in (meths or methods):
                run_one(out, name, cfg, m, seed, a.eval_every, a.align_every)
    report(out)


if __name__ == "__main__":
    main()
