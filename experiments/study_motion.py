"""Study: which training rules learn a motion-only task, and how well Skip-Sideways'
pseudo-gradients align with the exact gradient of the same temporal model.

Methods (all serial, one process; placement does not change the mathematics):

- ``sideways``      Sideways engine (direct edges only): its forward sees one frame per
                    output, so it must stay at chance on a motion-only task;
- ``skip``          Skip-Sideways engine, k edges, fuse concat (paper's default);
- ``skip-add``      Skip-Sideways engine, fuse add;
- ``fa-skip``       FA-Skip-Sideways (shortcut activations, no shortcut pseudo-gradients);
- ``bptt``          the same unrolled temporal model as ``skip`` (same units, edges, timing,
                    init) trained with exact backprop through time (:mod:`ssmpi.engine.bptt`);
- ``twoframe``      a CNN with the same modules fed [frame t, frame t-1] (6 channels),
                    exact per-step backprop (an upper reference: what two frames allow);
- ``causal3d``      the causal 3D twin of the same modules (every conv a causal conv3d,
                    kt = 3: a frame sees itself and the 2 before it, per layer), trained by
                    exact backprop through the clip (ssmpi.baselines.CausalBP); the loss is
                    the mean over the clip's frames, the prediction the mean softmax.

Models: the ``tiny`` preset (``units``, ``width``) or, with ``arch = NAME``, the architecture
file ``jobs/archs/NAME.toml`` (:mod:`ssmpi.nn.architecture`; the run's JSON records its
units). Tasks: ``still`` (still vs moving), ``direction`` (left vs right), ``dir4`` (right,
left, down, up): ``data_prep.synthetic motion``, generated once under ``--data``.

Every run writes ``<out>/runs/<key>.json`` (config, accuracy curve, training loss, gradient
alignment) and is skipped when that file exists. A run in progress saves its state (weights,
optimizer, curves) to ``<out>/partial/`` after every evaluation and continues from there
when the study is started again (stream-mode runs restart: their pipeline is in flight). At
the end: ``<out>/results.md`` (table) and ``<out>/curves.png`` / ``<out>/alignment.png``.

    python experiments/study_motion.py                     # the default grid (long)
    python experiments/study_motion.py --quick             # a smoke test (~1 minute)
    python experiments/study_motion.py --only base --seeds 0,1,2 --iters 1200
    python experiments/study_motion.py --only probe-dir4-lr5e-4 --seeds 0   # an arch variant
    python experiments/study_motion.py --report-only       # rebuild table and plots

Gradient alignment (``--align-every N``, for the skip-family runs): every N iterations the
engine runs the clip with ``update=False``; its per-unit pseudo-gradient (accumulated grad /
valid steps, what ``update`` applies) is compared with the exact BPTT gradient dJ/dtheta_l
of the same parameters on the same clip: cosine per unit, both norms, and the norm of the
update the optimizer then applies. Expected-gradient probes (``probe`` in a variant): see
:func:`probe`.
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
from ssmpi.nn import architecture, models
from ssmpi.optim import make_optimizer, unit_lr_scale

ROOT = sc.ROOT
ARCH_DIR = ROOT / "jobs" / "archs"

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

# -- the study across architectures (issue 16) --------------------------------------------
# Direction of motion without any input unit, on models where frames of different times meet
# in two or more conv units (jobs/archs/*.toml), at 32x32 with 16-frame clips (the setting of
# the learnability probe in ALGORITHM.md). Each Skip-Sideways run has its exact-BPTT twin
# (same model, init, data order and lr). The BPTT twin stops once it has held >= 0.95 for
# ``hold`` evaluations in a row (what is measured of it: the iteration of its first 0.9);
# Skip-Sideways runs always run to the end (whether they keep what they learn is measured).
ARCHS = ("probe", "tiny6", "vgg8n")
ARCH = dict(task="dir4", speed=2, size=32, square=8, noise=0.02, k=2, T=16, batch=16,
            iters=4000, frames=20, videos=(4096, 512), probe=400, probe_batches=8, hold=3)


def _lr_name(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


ARCH_STUDY = []
for _lr in (5e-4, 2e-4, 1e-3):  # in order of priority
    for _task in ("dir4", "direction"):
        for _a in ARCHS:
            _name = f"{_a}-{'dir4' if _task == 'dir4' else 'dir2'}-lr{_lr_name(_lr)}"
            ARCH_STUDY.append((_name, dict(ARCH, arch=_a, task=_task, lr=_lr), ("skip", "bptt")))
# fresh clips every iteration, as ALGORITHM.md's probe draws them (a fixed training set of
# 4096 videos made exact BPTT of the probe model 5x slower than that probe reports)
for _lr in (5e-4, 1e-3):
    for _a in ARCHS:
        ARCH_STUDY.append((f"{_a}-dir4-fresh-lr{_lr_name(_lr)}",
                           dict(ARCH, arch=_a, lr=_lr, fresh=True), ("skip", "bptt")))
# the probe model's exact BPTT at lr 2e-3: ALGORITHM.md's "BPTT: chance ~550, 100% by 600" does
# not state its lr, and its other runs of that list are at lr 2e-3
ARCH_STUDY.append(("probe-dir4-fresh-lr2e-3", dict(ARCH, arch="probe", lr=2e-3, fresh=True),
                   ("bptt", "skip")))
# the staleness rule (optim.unit_lr = stale) on the deep model, whose bottom units get the
# stalest pseudo-gradients (vgg8n: U1's cotangent is 14 steps old)
ARCH_STUDY.append(("vgg8n-dir4-fresh-stale-lr5e-4",
                   dict(ARCH, arch="vgg8n", lr=5e-4, fresh=True, unit_lr="stale"), ("skip",)))
# ... and its bottom units frozen (U1-U3, where the pseudo-gradients are furthest from the
# exact ones): can the units where frames meet learn direction on their own?
ARCH_STUDY.append(("vgg8n-dir4-fresh-freeze3-lr5e-4",
                   dict(ARCH, arch="vgg8n", lr=5e-4, fresh=True, unit_lr=[0, 0, 0, 1, 1, 1, 1, 1]),
                   ("skip", "bptt")))
# ... and slowed 10x instead (the top units at full lr, unlike the staleness rule): does
# moving the stale bottom units slowly suffice, or must they stop?
ARCH_STUDY.append(("vgg8n-dir4-fresh-slow3-lr5e-4",
                   dict(ARCH, arch="vgg8n", lr=5e-4, fresh=True,
                        unit_lr=[0.1, 0.1, 0.1, 1, 1, 1, 1, 1]), ("skip", "bptt")))
# Adam's beta2 at 0.99 instead of 0.999: exact BPTT of vgg8n left the plateau at the same
# iteration at lr 5e-4 and 1e-3, as if a clock other than the lr set it; the second-moment
# average's memory (1 / (1 - beta2) = 1000 iterations) is such a clock
ARCH_STUDY.append(("vgg8n-dir4-fresh-b2-lr5e-4",
                   dict(ARCH, arch="vgg8n", lr=5e-4, fresh=True, beta2=0.99), ("skip", "bptt")))
# the square on a flat grey background (``background = "flat"``) instead of the still random
# texture: on the texture even a two-frame CNN with exact backprop stays at chance for 600
# iterations (experiments/probe_torch.py), where ALGORITHM.md's probe reports 100% by 150; on
# flat grey it reaches 1.00 at 300. Is the texture what made every exact-BPTT twin slow?
FLAT = dict(ARCH, fresh=True, background="flat")
# a remedy that only Skip-Sideways needs is measured against the plain cell's exact BPTT
TWINS = {"vgg8n-dir4-fresh-stale-lr5e-4": "vgg8n-dir4-fresh-lr5e-4"}
for _a in ARCHS:
    for _lr in (5e-4, 2e-4, 1e-3):
        ARCH_STUDY.append((f"{_a}-dir4-flat-lr{_lr_name(_lr)}", dict(FLAT, arch=_a, lr=_lr),
                           ("skip", "bptt")))
    # ... Skip-Sideways found direction there within 100-200 iterations and lost it again:
    # the staleness rule (section 10) keeps what it finds
    ARCH_STUDY.append((f"{_a}-dir4-flat-stale-lr5e-4",
                       dict(FLAT, arch=_a, lr=5e-4, unit_lr="stale"), ("skip",)))
    TWINS[f"{_a}-dir4-flat-stale-lr5e-4"] = f"{_a}-dir4-flat-lr5e-4"
    # ... and its bottom units frozen instead (random fixed features; the units where frames
    # meet train on their nearly exact pseudo-gradients): U2's pseudo-gradient is the one that
    # turns away from the exact gradient along these runs (cosine 0.1-0.3, -0.47 at the
    # solution)
    _nf = {"probe": 2, "tiny6": 2, "vgg8n": 3}[_a]
    _L = len(architecture.load_arch_file(ARCH_DIR / f"{_a}.toml")["units"])
    _frozen = [0] * _nf + [1] * (_L - _nf)  # optim.unit_lr: U1.._nf at lr 0
    # (at issue 16's three learning rates, each against the plain model's exact BPTT there)
    for _lr in (5e-4, 1e-3, 2e-4):
        _cell = f"{_a}-dir4-flat-freeze{_nf}-lr{_lr_name(_lr)}"
        ARCH_STUDY.append((_cell, dict(FLAT, arch=_a, lr=_lr, unit_lr=_frozen), ("skip",)))
        TWINS[_cell] = f"{_a}-dir4-flat-lr{_lr_name(_lr)}"
    # ... and, for 3000 iterations at a constant lr, the trainable units slowed by the
    # staleness rule as well: frozen alone, vgg8n held >= 0.97 to 1700 iterations, then its
    # training loss rose (0.01 -> 2-13) with test dips to 0.87 (optim.unit_lr takes this list)
    ARCH_STUDY.append((f"{_a}-dir4-flat-freeze{_nf}-stale-lr5e-4",
                       dict(FLAT, arch=_a, lr=5e-4, iters=3000, unit_lr=[0] * _nf + [
                           unit_lr_scale("stale", l, _L) for l in range(_nf + 1, _L + 1)]),
                       ("skip",)))
    TWINS[f"{_a}-dir4-flat-freeze{_nf}-stale-lr5e-4"] = f"{_a}-dir4-flat-lr5e-4"
    # ... or with AMSGrad instead: the rises came as spikes (Adam's step m / sqrt(v) grows
    # when v has decayed over many tiny gradients; AMSGrad divides by the largest v seen)
    ARCH_STUDY.append((f"{_a}-dir4-flat-freeze{_nf}-amsgrad-lr5e-4",
                       dict(FLAT, arch=_a, lr=5e-4, iters=3000, amsgrad=True,
                            unit_lr=_frozen), ("skip",)))
    TWINS[f"{_a}-dir4-flat-freeze{_nf}-amsgrad-lr5e-4"] = f"{_a}-dir4-flat-lr5e-4"
    # ... the frozen model's exact BPTT for the same 3000 iterations (no early stop): does the
    # rise come from Skip-Sideways, or from Adam and the cross-entropy at a constant lr (at
    # the end of the frozen run the trainable units' weights had grown 2-2.7x, and the
    # pseudo-gradients of U4-U8 had cosine 1.00 with the exact ones)?
    ARCH_STUDY.append((f"{_a}-dir4-flat-freeze{_nf}-long-lr5e-4",
                       dict(FLAT, arch=_a, lr=5e-4, iters=3000, hold=0,
                            unit_lr=_frozen), ("bptt",)))
    # ... and decoupled weight decay (AdamW), which bounds the weights' growth
    ARCH_STUDY.append((f"{_a}-dir4-flat-freeze{_nf}-wd-lr5e-4",
                       dict(FLAT, arch=_a, lr=5e-4, iters=3000, wd=1.0,
                            unit_lr=_frozen), ("skip",)))
    TWINS[f"{_a}-dir4-flat-freeze{_nf}-wd-lr5e-4"] = f"{_a}-dir4-flat-lr5e-4"
    # the control on this background: Sideways sees one frame per forward, so stays at chance
    ARCH_STUDY.append((f"{_a}-dir4-flat-sideways", dict(FLAT, arch=_a, lr=5e-4, iters=600),
                       ("sideways",)))
# the control: Sideways must stay at chance (its forward sees one frame)
ARCH_STUDY += [(f"{a}-dir4-sideways", dict(ARCH, arch=a, lr=5e-4, iters=1000), ("sideways",))
               for a in ARCHS]

# -- keeping what it learns (issue 16): the input-unit setting that finds direction in
# 200-400 iterations and then drifts at a constant lr; 3000 iterations; remedies that need no
# knowledge of when the solution appears
KEEP = dict(DIR, stem=True, iters=3000)
KEEP_STUDY = [
    ("keep-const", dict(KEEP, probe=200), ("skip",)),
    ("keep-amsgrad", dict(KEEP, amsgrad=True), ("skip",)),
    ("keep-stale", dict(KEEP, unit_lr="stale"), ("skip",)),
    ("keep-ema", dict(KEEP, ema=0.99), ("skip",)),
    ("keep-plateau", dict(KEEP, plateau=[200, 0.5]), ("skip",)),
    ("keep-sgd", dict(KEEP, opt="sgd", lr=0.05), ("skip",)),
    # the staleness rule without the input unit: does slowing U1/U2 let direction form?
    ("dir-stale", dict(DIR, unit_lr="stale"), ("skip",)),
]

# -- stream mode with long clips (issue 16): clip boundaries pass through the pipeline once per
# 64 frames instead of once per 8; a montage stream (lanes cut at different times)
STREAM_STUDY = [
    ("stream-long", dict(T=64, frames=80, stream=True, montage=True, update_every=8,
                         iters=300, eval_every=50), ("sideways", "skip")),
    ("stream-long-dir", dict(DIR, T=64, frames=80, stream=True, montage=True, update_every=8,
                             iters=300, stem=True, eval_every=50), ("skip",)),
]
VARIANTS += ARCH_STUDY + KEEP_STUDY + STREAM_STUDY


# -- data -----------------------------------------------------------------------------------
def dataset(out: Path, cfg: dict) -> str:
    """Generate (once) the synthetic dataset of ``cfg``; returns its folder."""
    videos = cfg.get("videos", (2048, 512))
    frames = cfg.get("frames", 16)
    from data_prep import synthetic

    task = cfg["task"]
    speeds = [0, cfg["speed"]] if task == "still" else [cfg["speed"]]
    classes = 4 if task == "dir4" else 2
    name = f"{task}_s{cfg['size']}_v{cfg['speed']}_q{cfg['square']}_n{cfg['noise']}"
    if tuple(videos) != (2048, 512):
        name += f"_{videos[0]}_{videos[1]}"
    if frames != 16:
        name += f"_f{frames}"
    bg = cfg.get("background", "texture")
    if bg != "texture":
        name += f"_{bg}"
    root = DATA / name
    if not (root / "manifest.json").exists():
        params = {"size": [cfg["size"]] * 2, "frames": frames, "noise": cfg["noise"],
                  "subsample": 1, "seed": 0, "classes": classes, "speeds": speeds,
                  "square": cfg["square"], **({"background": bg} if bg != "texture" else {})}
        synthetic.generate("motion", root, splits={"train": videos[0], "test": videos[1]},
                           params=params, shards=5, quiet=True)
    return str(root)


def two_frames(f):
    """(N, T, H, W, C) -> (N, T-1, H, W, 2C): [frame t, frame t-1] along channels."""
    return np.ascontiguousarray(np.concatenate([f[:, 1:], f[:, :-1]], axis=-1))


# -- models ---------------------------------------------------------------------------------
def arch_units(cfg: dict):
    """The layer texts of ``cfg["arch"]`` (jobs/archs/<arch>.toml), or None for tiny."""
    if not cfg.get("arch"):
        return None
    return architecture.load_arch_file(ARCH_DIR / f"{cfg['arch']}.toml")["units"]


def base_spec(cfg: dict, ncls: int, channels: int = 3):
    """The model of ``cfg`` without the stem: an architecture file or the tiny preset."""
    units = arch_units(cfg)
    if units is not None:
        return models.custom(units, ncls, resolution=cfg["size"], channels=channels,
                             name=cfg["arch"])
    return models.tiny(ncls, units=cfg["units"], width=cfg["width"], resolution=cfg["size"],
                       channels=channels)


def tiny_spec(cfg: dict, ncls: int):
    """The model of ``cfg``. With ``cfg["stem"]`` a frozen identity unit (1x1 conv, 3
    channels) goes first: the raw frame becomes a message, so a shortcut edge carries the
    input frame x[t-2] (pooled by tau) into the first conv unit's successor. This is "the
    input frames as an extra shortcut source": temporal mixing starts on raw pixels."""
    spec = base_spec(cfg, ncls)
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
    """Optimizer settings of ``cfg`` (lr x ``scale``; optional schedule, warm-up, clipping,
    AMSGrad, weight decay)."""
    opt = dict(name=cfg.get("opt", "adam"), lr=cfg["lr"] * scale, clip=cfg.get("clip", 0.0))
    if cfg.get("amsgrad"):
        opt["amsgrad"] = True
    if cfg.get("wd"):  # decoupled (AdamW): theta -= lr * wd * theta each step
        opt["weight_decay"] = cfg["wd"]
    if cfg.get("beta2"):
        opt["betas"] = (0.9, cfg["beta2"])
    if cfg.get("sched", "constant") != "constant" or cfg.get("warmup"):
        opt.update(schedule=cfg.get("sched", "constant"), warmup=cfg.get("warmup", 0),
                   total=cfg["iters"])
    return opt


def unit_lrs(cfg: dict, L: int) -> list:
    """Per-unit lr multipliers: ``cfg["unit_lr"]`` as a list (one per unit, the stem not
    counted), or "stale": U_l's multiplier 1 / (1 + 2(L - l)), the inverse of the age of the
    cotangent its pseudo-gradient uses (2(L-l) steps; the head's is 1). [] = all 1."""
    u = cfg.get("unit_lr")
    if u == "stale":  # the trainer's optim.unit_lr = "stale"
        return [unit_lr_scale("stale", l, L) for l in range(1, L + 1)]
    return list(u or [])


def build(method: str, cfg: dict, seed: int, ncls: int):
    """The trainer object of ``method`` (an Engine, serial, or a BPTT), with per-unit learning
    rates when ``cfg["unit_lr"]`` lists one multiplier per unit (or is "stale")."""
    model = _build(method, cfg, seed, ncls)
    if method in ("twoframe", "causal3d"):
        return model
    lrs = unit_lrs(cfg, model.L)
    if cfg.get("stem"):
        identity_stem(model)
        if cfg.get("unit_lr") == "stale":
            lrs = [0.0] + lrs[1:]
        else:
            lrs = [0.0] + (lrs or [1.0] * (model.L - 1))
    for l, m in enumerate(lrs, start=1):
        if l in model.units:
            model.opt[l] = make_optimizer(model.units[l].theta, **optimizer(cfg, m))
    return model


class Causal3D:
    """:class:`ssmpi.baselines.CausalBP` behind the study's ``run_clip`` interface."""

    def __init__(self, cfg: dict, seed: int, ncls: int):
        from types import SimpleNamespace

        from ssmpi.baselines import CausalBP, causal3d
        units = arch_units(cfg)
        if units is not None:  # models.get_model("custom", arch=...) builds it from text
            spec = causal3d("custom", kt=3, arch=units, num_classes=ncls,
                            resolution=cfg["size"])
        else:
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
        topo = Topology(base_spec(cfg, ncls, channels=6), mode="bp")
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


def evaluate(model, method, root, T, batch, confusion: bool = False):
    """Clip accuracy on the whole test split (centred clips); with ``confusion`` the
    confusion matrix instead (ncls, ncls): [true class, predicted class] counts."""
    ds = data.open_dataset(root, "test")
    ld = data.ClipLoader(ds, batch_size=batch, clip_len=T, train=False, flip=False,
                         drop_last=False)
    cm = np.zeros((ds.num_classes, ds.num_classes), np.int64)
    try:
        for b in ld.epoch(0):
            f, TT = clip_for(method, b.frames, T)
            st = model.run_clip(TT, f, b.labels, train=False)
            m = b.video >= 0
            np.add.at(cm, (b.labels[m], st.probs.argmax(1)[m]), 1)
    finally:
        ld.close()
    return cm if confusion else np.trace(cm) / max(cm.sum(), 1)


def step_losses(model, root, T, batch, n_batches: int = 8) -> list:
    """The mean test loss at each valid step of a clip (first valid step first), over the
    first ``n_batches`` test batches: where in the clip a rising training loss comes from."""
    ds = data.open_dataset(root, "test")
    ld = data.ClipLoader(ds, batch_size=batch, clip_len=T, train=False, flip=False,
                         drop_last=True)
    rows = []
    try:
        for i, b in zip(range(n_batches), ld.epoch(0)):
            rows.append(model.run_clip(T, b.frames, b.labels, train=False).losses)
    finally:
        ld.close()
    return np.mean(rows, axis=0).tolist()


# -- state of a run (weights, optimizer state, and a weight average) ------------------------
def _slots(model) -> dict:
    """{name: (flat parameters, optimizer)} of every trained parameter vector."""
    if hasattr(model, "cb"):
        return {"c": (model.cb.theta, model.cb.opt)}
    return {str(l): (u.theta, model.opt[l]) for l, u in model.units.items()}


def model_state(model) -> dict:
    out = {}
    for k, (theta, opt) in _slots(model).items():
        out[f"{k}__theta"] = np.array(theta)
        for n, v in opt.state_dict().items():
            out[f"{k}__opt__{n}"] = np.asarray(v)
    return out


def load_model_state(model, st: dict):
    for k, (theta, opt) in _slots(model).items():
        theta[...] = st[f"{k}__theta"]
        pre = f"{k}__opt__"
        d = {n[len(pre):]: st[n] for n in st if n.startswith(pre)}
        d["t"] = int(d["t"])
        opt.load_state_dict(d)


class WeightAverage:
    """An exponential moving average of the weights (decay ``d`` per update), for evaluating
    with an average of recent weights instead of the last ones."""

    def __init__(self, model, d: float):
        self.model, self.d = model, float(d)
        self.avg = {k: np.array(th, np.float64) for k, (th, _) in _slots(model).items()}

    def update(self):
        for k, (th, _) in _slots(self.model).items():
            self.avg[k] *= self.d
            self.avg[k] += (1 - self.d) * np.asarray(th, np.float64)

    def swap(self):
        """Exchange the live weights and the average (call twice to restore)."""
        for k, (th, _) in _slots(self.model).items():
            live = np.array(th, np.float64)
            th[...] = self.avg[k]
            self.avg[k] = live


# -- gradient alignment ---------------------------------------------------------------------
def alignment(eng: Engine, twin: BPTT, frames, labels, T, ncls: int) -> tuple:
    """One training step of ``eng`` with, first, per unit:

    - ``cos``: cosine between its pseudo-gradient and the exact BPTT gradient of the same
      parameters on the same clip;
    - ``dcos`` (2 classes): the same for the *label-dependent* part of the gradient,
      g(y) - g(1 - y): what changes when the labels flip. The class-independent part (e.g.
      "make the logits smaller") dominates a whole-gradient cosine; this part is what must
      carry the motion signal, and is the one a pseudo-gradient can get wrong while ``cos``
      stays high;
    - ``pn``, ``en``: the norms of the pseudo and of the exact gradient; ``step``: the norm of
      the update the optimizer then applies (how far a step moves at a given gradient)."""
    twin.load_parameters(eng.parameters())
    dcos = {}
    if ncls == 2:  # flipped labels first (no update), then the real step
        flipped = 1 - np.asarray(labels)
        eng.run_clip(T, frames, flipped, update=False)
        pf = sc.pseudo_gradients(eng)
        for u in eng.units.values():
            u.zero_grad()
        twin.run_clip(T, frames, flipped, update=False)
        ef = twin.gradients()
    st = eng.run_clip(T, frames, labels, update=False)
    pseudo = sc.pseudo_gradients(eng)
    twin.run_clip(T, frames, labels, update=False)
    exact = twin.gradients()
    if ncls == 2:
        dcos = {str(l): sc.cosine(pseudo[l] - pf[l], exact[l] - ef[l]) for l in pseudo}
    before = eng.parameters()
    eng.update()
    after = eng.parameters()
    norms = {str(l): [float(np.linalg.norm(pseudo[l])), float(np.linalg.norm(exact[l])),
                      float(np.linalg.norm(after[l] - before[l]))] for l in pseudo}
    return st, {str(l): sc.cosine(pseudo[l], exact[l]) for l in pseudo}, dcos, norms


def both_gradients(eng: Engine, twin: BPTT, frames, labels, T) -> tuple:
    """({unit: pseudo-gradient}, {unit: exact BPTT gradient}) of one clip at the current
    parameters, without an update (the engine's accumulators start from zero)."""
    for u in eng.units.values():
        u.zero_grad()
    eng.run_clip(T, frames, labels, update=False)
    gp = sc.pseudo_gradients(eng)
    twin.run_clip(T, frames, labels, update=False)
    return gp, twin.gradients()


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
        gp, ge = both_gradients(eng, twin, f, y, T)
        for l in sp:
            sp[l] = sp[l] + gp[l]
            se[l] = se[l] + ge[l]
            np_[l] += float(np.linalg.norm(gp[l]))
            ne[l] += float(np.linalg.norm(ge[l]))
    for u in eng.units.values():
        u.zero_grad()
    return {str(l): {"ecos": sc.cosine(sp[l], se[l]),
                     "snr_pseudo": float(np.linalg.norm(sp[l])) / max(np_[l], 1e-30),
                     "snr_exact": float(np.linalg.norm(se[l])) / max(ne[l], 1e-30)}
            for l in sp if np.size(sp[l]) > 1}


def motion_part(eng: Engine, twin: BPTT, batches, T) -> dict:
    """The direction-dependent part of the gradients at the current parameters (no update):
    per unit, the cosine between sum_i [g(y_i) - g(y_i xor 1)] of the pseudo-gradients and of
    the exact BPTT gradients over ``batches`` (``mcos``). ``y xor 1`` is the opposite
    direction (right <-> left, down <-> up; still <-> moving with 2 classes); every class has
    the same single-frame statistics, so this difference is what the gradient says about
    *motion*, the part that must be right for direction to be learned. Also the ratio of its
    norms, pseudo : exact (``mnorm``)."""
    sp, se = {}, {}
    for f, y in batches:
        for sign, lab in ((1.0, y), (-1.0, np.asarray(y) ^ 1)):
            gp, ge = both_gradients(eng, twin, f, lab, T)
            for l in gp:
                sp[l] = sp.get(l, 0.0) + sign * gp[l]
                se[l] = se.get(l, 0.0) + sign * ge[l]
    for u in eng.units.values():
        u.zero_grad()
    return {str(l): {"mcos": sc.cosine(sp[l], se[l]),
                     "mnorm": float(np.linalg.norm(sp[l]) / max(np.linalg.norm(se[l]), 1e-30))}
            for l in sp if np.size(sp[l]) > 1}


def analyse(out: Path, key: str, n_batches: int = 16) -> dict:
    """:func:`motion_part` of a finished Skip-Sideways run (``--analyse VARIANT__skip__sS``)
    at its initial weights and at its final ones (``partial/<key>__final.npz``), on
    ``n_batches`` training batches that no run trained on."""
    r = json.loads((out / "runs" / f"{key}.json").read_text())
    cfg, seed = r["cfg"], r["seed"]
    ds = data.open_dataset(dataset(out, cfg), "train")
    ncls = ds.num_classes
    model = build("skip", dict(cfg, unit_lr=None, amsgrad=False), seed, ncls)
    twin = BPTT(model.topo, seed=seed)
    pb = []
    _loop(ds, dict(cfg), seed + 2000, n_batches,
          lambda b: pb.append((b.frames.copy(), b.labels.copy())))
    res = {"key": key}
    for when in ("initial", "final"):
        if when == "final":
            st = dict(np.load(_f(out / "partial" / f"{key}__final", "npz")))
            load_model_state(model, {k: v for k, v in st.items() if not k.startswith("ema__")})
        twin.load_parameters(model.parameters())
        res[when] = motion_part(model, twin, pb, cfg["T"])
        # which directions it tells apart: the test confusion matrix [true, predicted]
        res[f"confusion_{when}"] = evaluate(model, "skip", dataset(out, cfg), cfg["T"],
                                            cfg["batch"], confusion=True).tolist()
        # the size of each unit's weights, and the test loss at each step of the clip
        res[f"norm_{when}"] = {str(l): float(np.linalg.norm(u.theta))
                               for l, u in sorted(model.units.items())}
        res[f"step_loss_{when}"] = step_losses(model, dataset(out, cfg), cfg["T"], cfg["batch"])
        print(f"  {key} {when}: weight norms " + " / ".join(
            f"U{l} {v:.1f}" for l, v in res[f"norm_{when}"].items()) + "; test loss per step "
            + " ".join(f"{v:.2f}" for v in res[f"step_loss_{when}"]), flush=True)
        print(f"  {key} {when}: test confusion [true, predicted] "
              f"{res[f'confusion_{when}']}", flush=True)
        print(f"  {key} {when}: mcos " + " / ".join(
            f"U{u} {v['mcos']:.2f}" for u, v in sorted(res[when].items(), key=lambda x: int(x[0])))
            + "; norm pseudo:exact " + " / ".join(
            f"{v['mnorm']:.2f}" for _, v in sorted(res[when].items(), key=lambda x: int(x[0]))),
            flush=True)
    sc.write_json(out / "analysis" / f"{key}.json", res)
    return res


# -- one run --------------------------------------------------------------------------------
def fresh_batches(cfg: dict, seed: int, start: int = 0):
    """Fresh clips every iteration (``cfg["fresh"]``, as the learnability probe of
    ALGORITHM.md draws them): batch ``i`` is ``cfg["batch"]`` new videos of ``cfg["T"]``
    frames from the generator of :func:`dataset`, drawn from ``default_rng([seed, 1, i])``, so
    a resumed run continues the same sequence. Normalised as the ClipLoader does
    ((x / 255 - 0.5) / 0.25)."""
    from data_prep import synthetic

    task = cfg["task"]
    classes = synthetic.motion_classes(4 if task == "dir4" else 2,
                                       [0, cfg["speed"]] if task == "still" else [cfg["speed"]])
    n, T = cfg["batch"], cfg["T"]
    i = start
    while True:
        rng = np.random.default_rng([seed, 1, i])
        labels = rng.integers(0, len(classes), n)
        frames = np.stack([synthetic.motion_video(
            rng, label=int(y), classes=classes, size=(cfg["size"],) * 2, frames=T,
            square=cfg["square"], noise=cfg["noise"], subsample=1,
            background=cfg.get("background", "texture")) for y in labels])
        frames = ((frames.astype(np.float32) / 255.0 - 0.5) / 0.25).astype(np.float32)
        yield data.Batch(frames, labels.astype(np.int64), np.arange(n, dtype=np.int64), i)
        i += 1


def train_batches(ds, cfg: dict, seed: int, start: int = 0):
    """Training batches of ``ds`` from batch number ``start`` on (epochs as needed), the same
    sequence whatever ``start`` (a resumed run continues it); with ``cfg["fresh"]`` fresh
    clips instead (:func:`fresh_batches`)."""
    if cfg.get("fresh"):
        yield from fresh_batches(cfg, seed, start)
        return
    ld = data.ClipLoader(ds, batch_size=cfg["batch"], clip_len=cfg["T"], train=True,
                         flip=False, seed=seed)
    nb = len(ld)
    epoch, b0 = divmod(start, nb)
    try:
        while True:
            if b0:
                for b in range(b0, nb):
                    yield ld.make_batch(epoch, b)
                b0 = 0
            else:
                yield from ld.epoch(epoch)
            epoch += 1
    finally:
        ld.close()


def _loop(ds, cfg: dict, seed: int, n: int, step):
    """Call ``step(batch)`` for ``n`` training batches of ``ds``."""
    gen = train_batches(ds, cfg, seed)
    try:
        for _ in range(n):
            step(next(gen))
    finally:
        gen.close()


def _train(model, method: str, ds, cfg: dict, seed: int, n: int):
    """Plain training of ``model`` for ``n`` iterations (a warm start)."""
    def step(b):
        f, TT = clip_for(method, b.frames, cfg["T"])
        model.run_clip(TT, f, b.labels)
    _loop(ds, cfg, seed, n, step)


def _nothing():
    while True:
        yield None


def _summary(curve) -> dict:
    """What a curve says: final, best, first eval >= 0.9, and whether it kept it."""
    accs = [a for _, a in curve]
    f90 = next((i for i, a in curve if a >= 0.9), None)
    after = [a for i, a in curve if f90 is not None and i >= f90]
    return dict(final_acc=accs[-1], best_acc=max(accs), first_90=f90,
                min_after_90=min(after) if after else None,
                frac_after_90=(sum(a >= 0.9 for a in after) / len(after)) if after else None)


STOP_AFTER = 0  # --stop-after (tests): leave the run after this many iterations, resumable


def run_one(out: Path, variant: str, cfg: dict, method: str, seed: int, eval_every: int,
            align_every: int) -> dict:
    key = f"{variant}__{method}__s{seed}"
    path = out / "runs" / f"{key}.json"
    part = out / "partial" / key  # .json (curves) + .npz (weights): a run in progress
    final = out / "partial" / f"{key}__final"  # the state at the end of a finished run
    if path.exists():
        done = json.loads(path.read_text())
        if not _extends(done, cfg) or not (_f(final, "npz").exists()
                                           or _f(part, "npz").exists()):
            return done
        if _f(final, "npz").exists():  # the same run with more iterations: continue from
            _f(final, "npz").replace(_f(part, "npz"))  # where it ended (or, below, from
            st = json.loads(_f(final, "json").read_text())  # where that extension stopped)
            sc.write_json(_f(part, "json"), dict(st, cfg=cfg))
            _f(final, "json").unlink()
    eval_every = cfg.get("eval_every", eval_every)
    root = dataset(out, cfg)
    ds = data.open_dataset(root, "train")
    ncls = ds.num_classes
    model = build(method, cfg, seed, ncls)
    T, iters = cfg["T"], cfg["iters"]
    stream = bool(cfg.get("stream")) and method in ENGINE_MODES
    st0 = None
    if not stream and _f(part, "json").exists():
        st0 = json.loads(_f(part, "json").read_text())
        if st0.get("cfg") != json.loads(json.dumps(cfg)):
            st0 = None  # the variant changed since: start again
    if st0 is None and cfg.get("bptt_init") and method != "bptt":  # exact-BPTT phase first
        init = build("bptt", cfg, seed, ncls)
        _train(init, "bptt", ds, cfg, seed, cfg["bptt_init"])
        for l, p in init.parameters().items():
            model.units[l].theta[...] = p
    phases = [(ds, iters)]
    if cfg.get("curriculum"):  # [speed, iterations]: first train on another speed
        speed, n = cfg["curriculum"]
        ds0 = data.open_dataset(dataset(out, dict(cfg, speed=speed)), "train")  # same videos
        phases = [(ds0, n), (ds, iters - n)]
    clock = [0]  # stream mode: the global step counter
    stream_src = [None]

    def stream_clip(frames, labels):
        """Feed one clip's frames as the next T steps of a never-reset stream (the previous
        clip's activations are still in flight: the montage of ALGORITHM.md's stream mode);
        each unit updates every ``update_every`` steps. With ``cfg["montage"]`` the steps
        come from :func:`ssmpi.data.montage_stream` instead (lanes cut between clips at
        different times, clip lengths T/2..T, labels per lane and step). Returns the
        interval's stats."""
        if clock[0] == 0:
            model.start_stream()
        model.new_interval()
        for s in range(T):
            clock[0] += 1
            if stream_src[0] is not None:
                step = next(stream_src[0])
                st = model.stream_step(clock[0], step.frames, step.labels)
            else:
                st = model.stream_step(clock[0], frames[:, s], labels)
        return st

    if stream and cfg.get("montage"):
        mld = data.ClipLoader(ds, batch_size=cfg["batch"], clip_len=T, train=True,
                              flip=False, seed=seed)
        stream_src[0] = data.montage_stream(mld, min_len=max(1, T // 2))

    twin = None
    if align_every and method in ("skip", "skip-add", "fa-skip") and not stream:
        spec = tiny_spec(cfg, ncls)
        twin = BPTT(Topology(spec, mode=ENGINE_MODES[method][0], k=cfg["k"],
                             fuse=ENGINE_MODES[method][1]), seed=seed)
    curve, losses, align, probes = [], [], [], []
    it, elapsed, stopped = 0, 0.0, None
    ema = WeightAverage(model, cfg["ema"]) if cfg.get("ema") else None
    plateau = dict(best=float("inf"), since=0, cuts=0) if cfg.get("plateau") else None
    if st0 is not None:
        arrays = dict(np.load(_f(part, "npz")))
        load_model_state(model, {k: v for k, v in arrays.items() if not k.startswith("ema__")})
        if ema is not None:
            ema.avg = {k[5:]: v for k, v in arrays.items() if k.startswith("ema__")}
        it, elapsed = st0["it"], st0["elapsed"]
        curve, losses, align, probes = st0["curve"], st0["losses"], st0["align"], st0["probes"]
        plateau = st0.get("plateau", plateau)
        print(f"  {key}: resumed at iteration {it}", flush=True)
    shadow = shadow_twin = None
    # fixed clips, and an engine + BPTT pair that shares the parameters (only where the model
    # has the Skip-Sideways concat topology's parameters: not Sideways, not add)
    if cfg.get("probe") and method in ("skip", "bptt", "fa-skip"):
        shadow = build("skip", dict(cfg, unit_lr=None, amsgrad=False), seed, ncls)
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

    def save_partial(dest=part):
        if stream:
            return
        arrays = model_state(model)
        if ema is not None:
            arrays.update({f"ema__{k}": v for k, v in ema.avg.items()})
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / (dest.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(_f(dest, "npz"))
        sc.write_json(_f(dest, "json"), dict(
            cfg=cfg, it=it, elapsed=elapsed + time.perf_counter() - t0, curve=curve,
            losses=losses, align=align, probes=probes, plateau=plateau))

    def lr_cut(factor):
        for o in model.opt.values():
            o.schedule.lr *= factor

    def step(b):
        nonlocal it, stopped
        if shadow is not None and it % cfg["probe"] == 0:
            do_probe()
        f, TT = clip_for(method, b.frames, T) if b is not None else (None, T)
        if twin is not None and it % align_every == 0:
            st, cos, dcos, norms = alignment(model, twin, f, b.labels, TT, ncls)
            align.append({"it": it, "cos": cos, "dcos": dcos, "norms": norms})
        elif stream:
            st = stream_clip(f, b.labels if b is not None else None)
        else:
            st = model.run_clip(TT, f, b.labels)
        losses.append(st.loss)
        it += 1
        if ema is not None:
            ema.update()
        if plateau is not None:  # lr x gamma when the mean training loss of the last
            # `patience` iterations is no better than the best such mean so far
            patience, gamma = cfg["plateau"]
            if it % patience == 0:
                m = float(np.mean(losses[-patience:]))
                if m < plateau["best"] * 0.99:
                    plateau["best"] = m
                else:
                    lr_cut(gamma)
                    plateau["cuts"] += 1
        if it % eval_every == 0 or it == iters:
            if ema is not None:
                ema.swap()
            acc = evaluate(model, method, root, T, cfg["batch"])
            if ema is not None:
                ema.swap()
            clock[0] = 0  # evaluation ran reset-mode clips: restart the stream
            curve.append([it, acc])
            print(f"  {key} it {it}: acc {acc:.3f} loss "
                  f"{np.mean(losses[-eval_every:]):.3f} "
                  f"({elapsed + time.perf_counter() - t0:.0f} s)", flush=True)
            hold = cfg.get("hold") if method == "bptt" else None
            if hold and len(curve) >= hold and all(a >= 0.95 for _, a in curve[-hold:]):
                stopped = it
            if it < iters and not stopped:
                save_partial()
                if STOP_AFTER and it >= STOP_AFTER:
                    raise SystemExit(f"{key}: stopped after iteration {it} (--stop-after); "
                                     "run the same command again to continue")

    t0 = time.perf_counter()
    done = 0
    for pds, n in phases:
        if it >= done + n:
            done += n
            continue
        gen = (_nothing() if stream_src[0] is not None  # the montage stream feeds it
               else train_batches(pds, cfg, seed, start=it - done))
        try:
            while it < done + n and not stopped:
                step(next(gen))
        finally:
            gen.close()
        done += n
        if stopped:
            break
    if stream_src[0] is not None:
        stream_src[0].close()
        mld.close()
    res = dict(key=key, variant=variant, method=method, seed=seed, cfg=cfg, curve=curve,
               **_summary(curve), stopped_early=stopped,
               loss=[float(np.mean(losses[i:i + 50])) for i in range(0, len(losses), 50)],
               align=align, probes=probes,
               seconds=round(elapsed + time.perf_counter() - t0, 1),
               command=sc.command("study_motion.py"))
    if cfg.get("arch"):
        res["arch_units"] = arch_units(cfg)
    if plateau is not None:
        res["plateau_cuts"] = plateau["cuts"]
    if not stopped:  # kept, so that the run can be extended (more iterations) later
        save_partial(final)
    sc.write_json(path, res)
    for ext in ("json", "npz"):
        _f(part, ext).unlink(missing_ok=True)
    return res


def _f(base: Path, ext: str) -> Path:
    """``base`` + "." + ``ext`` (``with_suffix`` would cut a name that holds a dot)."""
    return base.parent / f"{base.name}.{ext}"


def _extends(done: dict, cfg: dict) -> bool:
    """Is ``cfg`` the finished run's settings with more iterations?"""
    old = done["cfg"]
    same = json.loads(json.dumps(dict(cfg, iters=0))) == dict(old, iters=0)
    return same and cfg["iters"] > old["iters"] and not done.get("stopped_early")


# -- report ---------------------------------------------------------------------------------
def _fmt_first(rs) -> str:
    return ", ".join(str(r["first_90"]) if r["first_90"] else "-" for r in rs)


def _arch_table(groups) -> list:
    """Skip-Sideways against its BPTT twin, per architecture, task and lr."""
    lines = ["", "Architecture study (no input unit; 32x32, 16-frame clips, batch 16, Adam): "
             "Skip-Sideways and its exact-BPTT twin. 'kept' = lowest eval from the first "
             ">= 0.9 on; a BPTT twin stops after holding >= 0.95 for 3 evaluations; "
             "'-fresh-' variants draw new training clips every iteration, the others read a "
             "fixed set of 4096 videos; '-flat-' variants put the square on a flat grey "
             "background. A remedy cell without its own twin (the staleness rule) is measured "
             "against the plain cell's twin.", "",
             "| variant | seeds | skip: first eval >= 0.9 | skip: final / best / kept | "
             "BPTT: first eval >= 0.9 | skip / BPTT iterations |", "|---|---|---|---|---|---|"]
    for (v, m), rs in sorted(groups.items()):
        if m != "skip" or not rs[0]["cfg"].get("arch"):
            continue
        rs = sorted(rs, key=lambda r: r["seed"])
        # the twin: this cell's own BPTT runs, or those of the plain cell (TWINS)
        tw = {r["seed"]: r for r in groups.get((TWINS.get(v, v), "bptt"), [])}
        fk = ", ".join(f"{r['final_acc']:.2f} / {r['best_acc']:.2f} / "
                       + (f"{r['min_after_90']:.2f}" if r.get("min_after_90") is not None
                          else "-") for r in rs)
        tf = ", ".join(str(tw[r["seed"]]["first_90"] or "-") if r["seed"] in tw else "?"
                       for r in rs)
        ratio = []
        for r in rs:
            b = tw.get(r["seed"])
            ratio.append(f"{r['first_90'] / b['first_90']:.1f}" if r["first_90"] and b
                         and b["first_90"] else "-")
        lines.append(f"| {v} | {', '.join(str(r['seed']) for r in rs)} | {_fmt_first(rs)} | "
                     f"{fk} | {tf} | {', '.join(ratio)} |")
    return lines


def _probe_table(runs) -> list:
    """Expected-gradient cosines (``ecos``) along each trajectory (runs with probes)."""
    rows = [r for r in runs if r.get("probes") and r["cfg"].get("arch")]
    if not rows:
        return []
    lines = ["", "Expected-gradient probes (arch variants): per unit, cosine of the summed "
             "pseudo-gradients and the summed exact gradients over fixed training clips, at "
             "the parameters of the run's own trajectory ('skip': Skip-Sideways, 'bptt': its "
             "twin); test accuracy at the nearest evaluation.", "",
             "| run | iteration | test acc | ecos U1..UL |", "|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["key"]):
        acc = dict((i, a) for i, a in r["curve"])
        for p in r["probes"]:
            units = sorted(p["units"], key=int)
            a = acc.get(p["it"])
            lines.append(f"| {r['key']} | {p['it']} | {'-' if a is None else f'{a:.2f}'} | "
                         + " / ".join(f"U{u} {p['units'][u]['ecos']:.2f}" for u in units)
                         + " |")
    return lines


def _drift_table(runs) -> list:
    """Per unit, before and after the first eval >= 0.9: mean per-clip cosine, pseudo and
    exact gradient norms, and the norm of the applied update (the drift measurement)."""
    rows = [r for r in runs if r["align"] and r["align"][0].get("norms") and r["first_90"]]
    if not rows:
        return []
    lines = ["", "Drift measurement (runs that reached 0.9): per unit, mean over the "
             "alignment points before / after the first eval >= 0.9: cosine(pseudo, exact) | "
             "||pseudo|| : ||exact|| | ||update|| (x1e3).", "",
             "| run | unit | cos before / after | norms before | norms after | "
             "update before / after |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["key"]):
        f = r["first_90"]
        pre = [a for a in r["align"] if a["it"] < f]
        post = [a for a in r["align"] if a["it"] >= f]
        if not pre or not post:
            continue
        for u in sorted(r["align"][0]["cos"], key=int):
            def m(al, i):
                return sc.nanmean([a["norms"][u][i] for a in al])
            if m(post, 0) == 0 and m(pre, 0) == 0:
                continue  # no pseudo-gradient (a unit without parameters, or the stem)
            lines.append(
                f"| {r['key']} | U{u} | {sc.nanmean([a['cos'][u] for a in pre]):.2f} / "
                f"{sc.nanmean([a['cos'][u] for a in post]):.2f} | {m(pre, 0):.3f} : "
                f"{m(pre, 1):.3f} | {m(post, 0):.3f} : {m(post, 1):.3f} | "
                f"{1e3 * m(pre, 2):.2f} / {1e3 * m(post, 2):.2f} |")
    return lines


def _plot_curves(runs, variants, path, order):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    variants = sorted(variants, key=lambda v: order.get(v, 99))
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
        ax.set_title(v, fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_ylim(0.15, 1.02)
        chance = 0.25 if runs and any(r["variant"] == v and r["cfg"]["task"] == "dir4"
                                      for r in runs) else 0.5
        ax.axhline(chance, color="gray", lw=0.5)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test clip accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def report(out: Path):
    runs = sc.load_runs(out / "runs")
    if not runs:
        return
    order = {v[0]: i for i, v in enumerate(VARIANTS)}
    lines = ["| variant | method | seeds | final acc (mean / each) | first eval >= 0.9 "
             "(iterations, each) | best / kept after 0.9 (each) | mean pseudo/exact cosine "
             "U1..UL (last half) | same, label-dependent part | s/run |",
             "|---|---|---|---|---|---|---|---|---|"]
    groups = sc.grouped(runs, VARIANTS, METHODS)
    for (v, m), rs in groups:
        accs = [r["final_acc"] for r in rs]
        kept = ", ".join(f"{r['best_acc']:.2f} / " + (f"{r['min_after_90']:.2f}"
                                                       if r.get("min_after_90") is not None
                                                       else "-") for r in rs)
        cos, dcos = sc.mean_cosines(rs), sc.mean_cosines(rs, "dcos")
        stop = [str(r["stopped_early"]) for r in rs if r.get("stopped_early")]
        lines.append(f"| {v} | {m} | {len(rs)} | {np.mean(accs):.3f} / "
                     f"{', '.join(f'{a:.3f}' for a in accs)} | {_fmt_first(rs)}"
                     + (f" (stopped at {', '.join(stop)})" if stop else "")
                     + f" | {kept} | {cos} | {dcos} | "
                     f"{np.mean([r['seconds'] for r in rs]):.0f} |")
    lines += _arch_table(dict(groups)) + _drift_table(runs) + _probe_table(runs)
    cfgs = {r["variant"]: r["cfg"] for r in runs}
    lines += ["", "Settings per variant (task still = speed 0 vs speed v; direction = left vs "
              "right; dir4 = right, left, down, up):", ""]
    for v, c in sorted(cfgs.items(), key=lambda kv: order.get(kv[0], 99)):
        lines.append(f"- {v}: " + ", ".join(f"{k}={c[k]}" for k in sorted(c)))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    arch = {r["variant"] for r in runs if r["cfg"].get("arch")}
    rest = {r["variant"] for r in runs} - arch
    if rest:
        _plot_curves(runs, rest, out / "curves.png", order)
    if arch:
        _plot_curves(runs, arch, out / "curves_arch.png", order)
    # seed 0 only: one panel per variant and method stays readable
    sc.plot_alignment([r for r in runs if r["align"] and r["seed"] == 0 and r["variant"] in rest],
                      out / "alignment.png")
    sc.plot_alignment([r for r in runs if r["align"] and r["seed"] == 0 and r["variant"] in arch],
                      out / "alignment_arch.png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sc.study_args(p, "study_motion", 200)
    p.add_argument("--stop-after", type=int, default=0,
                   help="stop a run at its first evaluation at or after this iteration, with "
                   "its state saved (for testing the resumption)")
    p.add_argument("--analyse", default="", metavar="KEYS",
                   help="comma-separated finished skip runs (VARIANT__skip__sS): the "
                   "direction-dependent part of their gradients, pseudo vs exact, at the initial "
                   "and the final weights (see motion_part), into <out>/analysis/")
    p.add_argument("--analyse-batches", type=int, default=16,
                   help="training batches for --analyse (default 16)")
    a = p.parse_args(argv)
    global DATA, STOP_AFTER
    DATA = a.data or DATA
    STOP_AFTER = a.stop_after
    out = a.out
    if a.analyse:
        for key in a.analyse.split(","):
            analyse(out / "quick" if a.quick else out, key, a.analyse_batches)
        return
    if a.quick:
        out = out / "quick"
        a.iters, a.eval_every, a.align_every, a.seeds = a.iters or 40, 20, 10, "0"
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
                cfg.pop("eval_every", None)
            for m in methods:
                if meths and m not in meths:
                    continue
                run_one(out, name, cfg, m, seed, a.eval_every, a.align_every)
    report(out)


if __name__ == "__main__":
    main()
