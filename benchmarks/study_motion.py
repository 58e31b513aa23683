"""Study: which training rules learn a motion-only task, and how well Skip-Sideways'
pseudo-gradients align with the exact gradient of the same temporal model.

Methods (all serial, one process; placement does not change the mathematics):

- ``sideways``      Sideways engine (direct edges only): its forward sees one frame per
                    output, so it must stay at chance on a motion-only task;
- ``skip``          Skip-Sideways engine, k edges, fuse concat (paper's default);
- ``skip-add``      Skip-Sideways engine, fuse add;
- ``fa-skip``       FA-Skip-Sideways (shortcut activations, no shortcut pseudo-gradients);
- ``bptt``          the same unrolled temporal model as ``skip`` (same units, edges, timing,
                    init) trained with exact backprop through time (:mod:`ssmpi.bptt`);
- ``twoframe``      a CNN with the same modules fed [frame t, frame t-1] (6 channels),
                    exact per-step backprop (an upper reference: what two frames allow);
- ``causal3d``      the causal 3D twin of the same modules (every conv a causal conv3d,
                    kt = 3: a frame sees itself and the 2 before it, per layer), trained by
                    exact backprop through the clip (ssmpi.baselines.CausalBP); the loss is
                    the mean over the clip's frames, the prediction the mean softmax.

Dataset: ``data_prep.synthetic motion`` (generated once under ``--data``). Every run writes
``<out>/runs/<key>.json`` (config, accuracy curve, training loss, gradient alignment) and is
skipped when that file exists (resumable). At the end: ``<out>/results.md`` (table) and
``<out>/curves.png`` / ``<out>/alignment.png`` when matplotlib imports.

    python benchmarks/study_motion.py                     # the default grid (long)
    python benchmarks/study_motion.py --quick             # a smoke test (~1 minute)
    python benchmarks/study_motion.py --only base --seeds 0,1,2 --iters 1200
    python benchmarks/study_motion.py --report-only       # rebuild table and plots

Gradient alignment (``--align-every N``, for the skip-family runs): every N iterations the
engine runs the clip with ``update=False``; its per-unit pseudo-gradient (accumulated grad /
valid steps, what ``update`` applies) is compared with the exact BPTT gradient dJ/dtheta_l
of the same parameters on the same clip: cosine similarity per unit.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (benchmarks/common.py: shared plotting)
from mpi4py import MPI  # noqa: E402

from ssmpi import data  # noqa: E402
from ssmpi.engine.bptt import BPTT  # noqa: E402
from ssmpi.engine.executor import Engine  # noqa: E402
from ssmpi.engine.topology import Placement, Topology  # noqa: E402
from ssmpi.nn import models  # noqa: E402
from ssmpi.optim import make_optimizer  # noqa: E402

DATA = Path(os.environ.get("SSMPI_STUDY_DATA", "/tmp/ssmpi_study_motion_data"))
METHODS = ("sideways", "skip", "skip-add", "fa-skip", "bptt", "twoframe", "causal3d")
ENGINE_MODES = {"sideways": ("sideways", "concat"), "skip": ("skip", "concat"),
                "skip-add": ("skip", "add"), "fa-skip": ("fa-skip", "concat")}

# base setting (the run.sh demo regime, serial): still vs moving, 16x16, square 8
BASE = dict(task="still", speed=2, size=16, square=8, noise=0.02, units=4, width=16, k=2,
            T=8, batch=16, lr=1e-3, iters=1200)
# one-factor variations around BASE: (name, overrides, methods)
VARIANTS = [
    ("base", {}, METHODS),
    ("lr5e-4", dict(lr=5e-4), ("skip", "bptt")),
    ("lr2e-3", dict(lr=2e-3), ("skip", "bptt")),
    ("k3", dict(k=3), ("skip", "bptt")),
    ("T12", dict(T=12), ("skip", "bptt")),
    ("speed1", dict(speed=1), ("skip", "bptt", "twoframe")),
    ("width8", dict(width=8), ("skip", "bptt")),
    ("leftright", dict(task="direction"),
     ("sideways", "skip", "fa-skip", "bptt", "twoframe", "causal3d")),
]
# the search (issue 8): what lets pseudo-gradients find *direction* (left vs right), where
# base-setting Skip-Sideways stayed at chance and exact BPTT of the same model learned
DIR = dict(task="direction", iters=2000)
SEARCH = [
    ("dir-long", dict(DIR, iters=3000), ("skip",)),
    ("dir-lr2e-3", dict(DIR, lr=2e-3), ("skip", "bptt")),
    ("dir-cosine", dict(DIR, lr=2e-3, sched="cosine", warmup=200), ("skip",)),
    ("dir-unitlr", dict(DIR, unit_lr=[0.25, 0.25, 1, 1]), ("skip",)),
    ("dir-freeze12", dict(DIR, unit_lr=[0, 0, 1, 1]), ("skip", "bptt")),
    ("dir-clip", dict(DIR, clip=0.1), ("skip",)),
    ("dir-T16", dict(DIR, T=16), ("skip", "bptt")),
    ("dir-k3", dict(DIR, k=3), ("skip",)),
    ("dir-curriculum", dict(DIR, curriculum=[1, 1000]), ("skip",)),
    ("dir-bpttinit", dict(DIR, bptt_init=200), ("skip",)),
    ("dir-inputsc", dict(DIR, stem=True), ("skip", "bptt")),
    # it learns, then drifts away (constant lr 1e-3): decay or a smaller lr
    ("dir-inputsc-cosine", dict(DIR, stem=True, sched="cosine"), ("skip", "bptt")),
    ("dir-inputsc-lr5e-4", dict(DIR, stem=True, lr=5e-4), ("skip",)),
    ("dir-inputsc-sideways", dict(DIR, stem=True), ("sideways",)),
    # the input shortcut with the first conv unit frozen (its pseudo-gradient turns
    # against the exact one once direction is learned)
    ("dir-inputsc-freeze1", dict(DIR, stem=True, unit_lr=[0, 1, 1, 1]), ("skip",)),
    # expected-gradient probes along the skip and the BPTT trajectories (see probe())
    ("probe-dir", dict(DIR, iters=1200, probe=200), ("skip", "bptt")),
    ("probe-dir-inputsc", dict(DIR, iters=1200, stem=True, probe=200), ("skip", "bptt")),
    ("probe-still", dict(iters=1200, probe=200), ("skip", "bptt")),
    # stream mode (no reset between clips, one update per unit every update_every steps)
    ("stream", dict(stream=True), ("sideways", "skip")),
    ("stream-u2", dict(stream=True, update_every=2), ("skip",)),
    ("dir-stream", dict(DIR, stream=True), ("skip",)),
]
VARIANTS += SEARCH


# -- data -----------------------------------------------------------------------------------
def dataset(out: Path, cfg: dict) -> str:
    """Generate (once) the synthetic dataset of ``cfg``; returns its folder."""
    videos = cfg.get("videos", (2048, 512))
    cfg = {k: cfg[k] for k in ("task", "speed", "size", "square", "noise")}
    from data_prep import synthetic

    speeds = [0, cfg["speed"]] if cfg["task"] == "still" else [cfg["speed"]]
    name = f"{cfg['task']}_s{cfg['size']}_v{cfg['speed']}_q{cfg['square']}_n{cfg['noise']}"
    if tuple(videos) != (2048, 512):
        name += f"_{videos[0]}_{videos[1]}"
    root = DATA / name
    if not (root / "manifest.json").exists():
        params = {"size": [cfg["size"]] * 2, "frames": 16, "noise": cfg["noise"],
                  "subsample": 1, "seed": 0, "classes": 2, "speeds": speeds,
                  "square": cfg["square"]}
        synthetic.generate("motion", root, splits={"train": videos[0], "test": videos[1]},
                           params=params, shards=5, quiet=True)
    return str(root)


def two_frames(f):
    """(N, T, H, W, C) -> (N, T-1, H, W, 2C): [frame t, frame t-1] along channels."""
    return np.ascontiguousarray(np.concatenate([f[:, 1:], f[:, :-1]], axis=-1))


# -- models ---------------------------------------------------------------------------------
def tiny_spec(cfg: dict, ncls: int):
    """The tiny model of ``cfg``. With ``cfg["stem"]`` a frozen identity unit (1x1 conv, 3
    channels) goes first: the raw frame becomes a message, so a shortcut edge carries the
    input frame x[t-2] (pooled by tau) into the first conv unit's successor. This is "the
    input frames as an extra shortcut source": temporal mixing starts on raw pixels."""
    spec = models.tiny(ncls, units=cfg["units"], width=cfg["width"], resolution=cfg["size"])
    if cfg.get("stem"):
        spec.modules.insert(0, [("conv", 3, 1)])
        spec.name += " + identity stem"
    return spec


def identity_stem(model):
    """Set unit 1 (the stem) to the identity map; with learning rate 0 it stays so."""
    for name, a in model.units[1].param_items():
        a[...] = 0
        if name.endswith("w"):
            a.reshape(3, 3)[...] = np.eye(3, dtype=a.dtype)


def optimizer(cfg: dict, scale: float = 1.0) -> dict:
    """Adam settings of ``cfg`` (lr x ``scale``; optional schedule, warm-up, clipping)."""
    opt = dict(name="adam", lr=cfg["lr"] * scale, clip=cfg.get("clip", 0.0))
    if cfg.get("sched", "constant") != "constant" or cfg.get("warmup"):
        opt.update(schedule=cfg.get("sched", "constant"), warmup=cfg.get("warmup", 0),
                   total=cfg["iters"])
    return opt


def build(method: str, cfg: dict, seed: int, ncls: int):
    """The trainer object of ``method`` (an Engine, serial, or a BPTT), with per-unit learning
    rates when ``cfg["unit_lr"]`` lists one multiplier per unit."""
    model = _build(method, cfg, seed, ncls)
    lrs = list(cfg.get("unit_lr") or [])
    if cfg.get("stem") and method != "twoframe":
        identity_stem(model)
        lrs = [0.0] + (lrs or [1.0] * cfg["units"])
    for l, m in enumerate(lrs, start=1):
        if l in model.units and method != "twoframe":
            model.opt[l] = make_optimizer(model.units[l].theta, **optimizer(cfg, m))
    return model


class Causal3D:
    """:class:`ssmpi.baselines.CausalBP` behind the study's ``run_clip`` interface."""

    def __init__(self, cfg: dict, seed: int, ncls: int):
        from types import SimpleNamespace

        from ssmpi.baselines import CausalBP, causal3d
        spec = causal3d("tiny", kt=3, num_classes=ncls, units=cfg["units"],
                        width=cfg["width"], resolution=cfg["size"])
        self.cb = CausalBP(spec, batch=cfg["batch"], seed=seed, optimizer=optimizer(cfg))
        self.units, self._ns = {}, SimpleNamespace

    def run_clip(self, T, frames, labels, *, train=True, update=True):
        if train:
            losses = self.cb.run_clip(T, frames, labels, update=update)
            return self._ns(loss=float(np.mean(losses)), probs=None)
        z = np.asarray(self.cb.logits(frames[:, :T]), np.float64)  # (N, T, K)
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return self._ns(loss=float("nan"), probs=p.mean(1))


def _build(method: str, cfg: dict, seed: int, ncls: int):
    opt = optimizer(cfg)
    if method == "causal3d":
        return Causal3D(cfg, seed, ncls)
    if method == "twoframe":
        spec = models.tiny(ncls, units=cfg["units"], width=cfg["width"],
                           resolution=cfg["size"], channels=6)
        topo = Topology(spec, mode="bp")
        return Engine(topo, Placement(1, 1), MPI.COMM_SELF, batch=cfg["batch"], seed=seed,
                      optimizer=opt)
    spec = tiny_spec(cfg, ncls)
    if method == "bptt":
        return BPTT(Topology(spec, mode="skip", k=cfg["k"], fuse="concat"), seed=seed,
                    optimizer=opt)
    mode, fuse = ENGINE_MODES[method]
    topo = Topology(spec, mode=mode, k=cfg["k"], fuse=fuse)
    return Engine(topo, Placement(topo.L, 1), MPI.COMM_SELF, batch=cfg["batch"], seed=seed,
                  update_every=cfg.get("update_every", cfg["T"]),
                  optimizer=opt)


def clip_for(method, frames, T):
    return (two_frames(frames[:, :T]), T - 1) if method == "twoframe" else (frames, T)


def evaluate(model, method, root, T, batch) -> float:
    """Clip accuracy on the whole test split (centred clips)."""
    ld = data.ClipLoader(data.open_dataset(root, "test"), batch_size=batch, clip_len=T,
                         train=False, flip=False, drop_last=False)
    c = n = 0
    try:
        for b in ld.epoch(0):
            f, TT = clip_for(method, b.frames, T)
            st = model.run_clip(TT, f, b.labels, train=False)
            m = b.video >= 0
            c += int((st.probs.argmax(1)[m] == b.labels[m]).sum())
            n += int(m.sum())
    finally:
        ld.close()
    return c / max(n, 1)


def cosine(a, b) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")


def _pseudo(eng: Engine) -> dict:
    return {l: np.asarray(u.grad / max(u.count, 1), np.float64) for l, u in eng.units.items()}


def alignment(eng: Engine, twin: BPTT, frames, labels, T, ncls: int) -> tuple:
    """One training step of ``eng`` with, first, per unit:

    - ``cos``: cosine between its pseudo-gradient and the exact BPTT gradient of the same
      parameters on the same clip;
    - ``dcos`` (2 classes): the same for the *label-dependent* part of the gradient,
      g(y) - g(1 - y): what changes when the labels flip. The class-independent part (e.g.
      "make the logits smaller") dominates a whole-gradient cosine; this part is what must
      carry the motion signal, and is the one a pseudo-gradient can get wrong while ``cos``
      stays high."""
    twin.load_parameters(eng.parameters())
    dcos = {}
    if ncls == 2:  # flipped labels first (no update), then the real step
        flipped = 1 - np.asarray(labels)
        eng.run_clip(T, frames, flipped, update=False)
        pf = _pseudo(eng)
        for u in eng.units.values():
            u.zero_grad()
        twin.run_clip(T, frames, flipped, update=False)
        ef = twin.gradients()
    st = eng.run_clip(T, frames, labels, update=False)
    pseudo = _pseudo(eng)
    twin.run_clip(T, frames, labels, update=False)
    exact = twin.gradients()
    if ncls == 2:
        dcos = {str(l): cosine(pseudo[l] - pf[l], exact[l] - ef[l]) for l in pseudo}
    eng.update()
    return st, {str(l): cosine(pseudo[l], exact[l]) for l in pseudo}, dcos


def probe(eng: Engine, twin: BPTT, batches, T) -> dict:
    """Expected-gradient alignment at the current parameters (no update): over a fixed set
    of training clips, per unit, the cosine between the *summed* pseudo-gradients and the
    summed exact BPTT gradients (``ecos``), and each one's consistency ||sum g_i|| /
    sum ||g_i|| (``snr_pseudo``, ``snr_exact``: 1 = every clip pushes the same way, ~1/sqrt(K)
    = no consistent direction). A per-clip cosine is dominated by what the two share on that
    clip (fitting its particular labels); the summed gradient keeps what generalises."""
    L = eng.L
    sp = {l: 0.0 for l in range(1, L + 1)}
    se = {l: 0.0 for l in range(1, L + 1)}
    np_, ne = dict(sp), dict(se)
    for f, y in batches:
        for u in eng.units.values():
            u.zero_grad()
        eng.run_clip(T, f, y, update=False)
        gp = _pseudo(eng)
        twin.run_clip(T, f, y, update=False)
        ge = twin.gradients()
        for l in sp:
            sp[l] = sp[l] + gp[l]
            se[l] = se[l] + ge[l]
            np_[l] += float(np.linalg.norm(gp[l]))
            ne[l] += float(np.linalg.norm(ge[l]))
    for u in eng.units.values():
        u.zero_grad()
    return {str(l): {"ecos": cosine(sp[l], se[l]),
                     "snr_pseudo": float(np.linalg.norm(sp[l])) / max(np_[l], 1e-30),
                     "snr_exact": float(np.linalg.norm(se[l])) / max(ne[l], 1e-30)}
            for l in sp if np.size(sp[l]) > 1}


# -- one run --------------------------------------------------------------------------------
def _loop(ds, cfg: dict, seed: int, n: int, step):
    """Call ``step(batch)`` for ``n`` training batches of ``ds`` (epochs as needed)."""
    ld = data.ClipLoader(ds, batch_size=cfg["batch"], clip_len=cfg["T"], train=True,
                         flip=False, seed=seed)
    done, ep = 0, 0
    try:
        while done < n:
            for b in ld.epoch(ep):
                step(b)
                done += 1
                if done >= n:
                    break
            ep += 1
    finally:
        ld.close()


def _train(model, method: str, ds, cfg: dict, seed: int, n: int):
    """Plain training of ``model`` for ``n`` iterations (a warm start)."""
    def step(b):
        f, TT = clip_for(method, b.frames, cfg["T"])
        model.run_clip(TT, f, b.labels)
    _loop(ds, cfg, seed, n, step)



def run_one(out: Path, variant: str, cfg: dict, method: str, seed: int, eval_every: int,
            align_every: int) -> dict:
    key = f"{variant}__{method}__s{seed}"
    path = out / "runs" / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    root = dataset(out, cfg)
    ds = data.open_dataset(root, "train")
    model = build(method, cfg, seed, ds.num_classes)
    T, iters = cfg["T"], cfg["iters"]
    if cfg.get("bptt_init") and method != "bptt":  # start from a short exact-BPTT phase
        init = build("bptt", cfg, seed, ds.num_classes)
        _train(init, "bptt", ds, cfg, seed, cfg["bptt_init"])
        for l, p in init.parameters().items():
            model.units[l].theta[...] = p
    phases = [(ds, iters)]
    if cfg.get("curriculum"):  # [speed, iterations]: first train on another speed
        speed, n = cfg["curriculum"]
        ds0 = data.open_dataset(dataset(out, dict(cfg, speed=speed)), "train")  # same videos
        phases = [(ds0, n), (ds, iters - n)]
    stream = bool(cfg.get("stream")) and method in ENGINE_MODES
    clock = [0]  # stream mode: the global step counter

    def stream_clip(frames, labels):
        """Feed one clip's frames as the next T steps of a never-reset stream (the previous
        clip's activations are still in flight: the montage of ALGORITHM.md's stream mode);
        each unit updates every ``update_every`` steps. Returns the clip's stats."""
        if clock[0] == 0:
            model.start_stream()
        model.new_interval()
        for s in range(T):
            clock[0] += 1
            st = model.stream_step(clock[0], frames[:, s], labels)
        return st

    twin = None
    if align_every and method in ("skip", "skip-add", "fa-skip") and not stream:
        spec = tiny_spec(cfg, ds.num_classes)
        twin = BPTT(Topology(spec, mode=ENGINE_MODES[method][0], k=cfg["k"],
                             fuse=ENGINE_MODES[method][1]), seed=seed)
    curve, losses, align, probes = [], [], [], []
    t0 = time.perf_counter()
    it = 0
    shadow = shadow_twin = None
    if cfg.get("probe"):  # fixed clips, and an engine + BPTT pair that shares the parameters
        shadow = build("skip", dict(cfg, unit_lr=None), seed, ds.num_classes)
        shadow_twin = BPTT(shadow.topo, seed=seed)
        pb = []
        _loop(ds, dict(cfg), seed + 1000, cfg.get("probe_batches", 16),
              lambda b: pb.append((b.frames.copy(), b.labels.copy())))

    def do_probe():
        params = model.parameters()
        for l, p in params.items():
            shadow.units[l].theta[...] = p
        shadow_twin.load_parameters(params)
        probes.append({"it": it, "units": probe(shadow, shadow_twin, pb, T)})

    def step(b):
        nonlocal it
        if shadow is not None and it % cfg["probe"] == 0:
            do_probe()
        f, TT = clip_for(method, b.frames, T)
        if twin is not None and it % align_every == 0:
            st, cos, dcos = alignment(model, twin, f, b.labels, TT, ds.num_classes)
            align.append({"it": it, "cos": cos, "dcos": dcos})
        elif stream:
            st = stream_clip(f, b.labels)
        else:
            st = model.run_clip(TT, f, b.labels)
        losses.append(st.loss)
        it += 1
        if it % eval_every == 0 or it == iters:
            acc = evaluate(model, method, root, T, cfg["batch"])
            clock[0] = 0  # evaluation ran reset-mode clips: restart the stream
            curve.append([it, acc])
            print(f"  {key} it {it}: acc {acc:.3f} loss "
                  f"{np.mean(losses[-eval_every:]):.3f}", flush=True)

    for pds, n in phases:
        _loop(pds, cfg, seed, n, step)
    res = dict(key=key, variant=variant, method=method, seed=seed, cfg=cfg, curve=curve,
               final_acc=curve[-1][1], best_acc=max(a for _, a in curve),
               first_90=next((i for i, a in curve if a >= 0.9), None),
               loss=[float(np.mean(losses[i:i + 50])) for i in range(0, len(losses), 50)],
               align=align, probes=probes, seconds=round(time.perf_counter() - t0, 1),
               command=" ".join(["python", "benchmarks/study_motion.py"] + sys.argv[1:]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res))
    tmp.replace(path)
    return res


# -- report ---------------------------------------------------------------------------------
def _nanmean(xs) -> float:
    """Mean of the finite values (nan when there are none, e.g. a unit without parameters)."""
    xs = [x for x in xs if x == x]
    return float(np.mean(xs)) if xs else float("nan")



def report(out: Path):
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    if not runs:
        return
    groups = {}
    for r in runs:
        groups.setdefault((r["variant"], r["method"]), []).append(r)
    order = {v[0]: i for i, v in enumerate(VARIANTS)}
    lines = ["| variant | method | seeds | final acc (mean / each) | first eval >= 0.9 "
             "(iterations, each) | mean pseudo/exact cosine U1..UL (last half) | same, "
             "label-dependent part | s/run |",
             "|---|---|---|---|---|---|---|---|"]
    for (v, m), rs in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99),
                                                            METHODS.index(kv[0][1]))):
        rs = sorted(rs, key=lambda r: r["seed"])
        accs = [r["final_acc"] for r in rs]
        f90 = ", ".join(str(r["first_90"]) if r["first_90"] else "-" for r in rs)
        cos = dcos = "-"
        al = [a for r in rs for a in r["align"][len(r["align"]) // 2:]]
        if al:
            units = sorted(al[0]["cos"], key=int)
            cos = " / ".join(f"{_nanmean([a['cos'][u] for a in al]):.2f}" for u in units)
            dl = [a for a in al if a.get("dcos")]
            if dl:
                dcos = " / ".join(f"{_nanmean([a['dcos'][u] for a in dl]):.2f}"
                                  for u in units)
        lines.append(f"| {v} | {m} | {len(rs)} | {np.mean(accs):.3f} / "
                     f"{', '.join(f'{a:.3f}' for a in accs)} | {f90} | {cos} | {dcos} | "
                     f"{np.mean([r['seconds'] for r in rs]):.0f} |")
    cfgs = {r["variant"]: r["cfg"] for r in runs}
    lines += ["", "Settings per variant (task still = speed 0 vs speed v; direction = left vs "
              "right):", ""]
    for v, c in sorted(cfgs.items(), key=lambda kv: order.get(kv[0], 99)):
        lines.append(f"- {v}: " + ", ".join(f"{k}={c[k]}" for k in sorted(c)))
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
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3.2 * nrow), squeeze=False)
    for ax in axes.flat[len(variants):]:
        ax.set_visible(False)
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, v in zip(axes.flat, variants):
        for r in sorted((r for r in runs if r["variant"] == v), key=lambda r: r["seed"]):
            c = np.array(r["curve"])
            ax.plot(c[:, 0], c[:, 1], color=colors[r["method"]], alpha=0.8,
                    label=r["method"] if r["seed"] == min(
                        q["seed"] for q in runs if q["variant"] == v
                        and q["method"] == r["method"]) else None)
        ax.set_title(v)
        ax.set_xlabel("iteration")
        ax.set_ylim(0.3, 1.02)
        ax.axhline(0.5, color="gray", lw=0.5)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test clip accuracy")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)
    # seed 0 only: one panel per variant and method stays readable
    common.plot_alignment([r for r in runs if r["align"] and r["seed"] == 0],
                          out / "alignment.png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "study_motion")
    p.add_argument("--data", type=Path, default=None,
                   help="where the generated datasets go (default: $SSMPI_STUDY_DATA or "
                   "/tmp/ssmpi_study_motion_data)")
    p.add_argument("--only", default="", help="comma-separated variants (default: all)")
    p.add_argument("--methods", default="", help="comma-separated methods (default: per variant)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--iters", type=int, default=0, help="override iterations")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--align-every", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="tiny smoke run into <out>/quick")
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args(argv)
    global DATA
    DATA = a.data or DATA
    out = a.out
    if a.quick:
        out = out / "quick"
        a.iters, a.eval_every, a.align_every, a.seeds = 40, 20, 10, "0"
    if not a.report_only:
        only = [v for v in a.only.split(",") if v]
        meths = [m for m in a.methods.split(",") if m]
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
        for (name, over, methods), seed in itertools.product(VARIANTS, seeds):
            if only and name not in only:
                continue
            cfg = dict(BASE, **over)
            if a.iters:
                cfg["iters"] = a.iters
            if a.quick:  # small datasets, fewer probe clips: a smoke test of the machinery
                cfg.update(videos=(64, 32), probe_batches=2, probe=min(cfg.get("probe", 0), 20),
                           **({"curriculum": [cfg["curriculum"][0], 20]}
                              if cfg.get("curriculum") else {}),
                           **({"bptt_init": 5} if cfg.get("bptt_init") else {}))
            for m in methods:
                if meths and m not in meths:
                    continue
                run_one(out, name, cfg, m, seed, a.eval_every, a.align_every)
    report(out)


if __name__ == "__main__":
    main()
