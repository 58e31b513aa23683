"""The learnability probe's temporal model in PyTorch: an independent exact-BPTT reference.

Why: ALGORITHM.md's probe (an independent implementation) reports that exact BPTT of the
4-unit Skip-Sideways temporal model learns 4 motion directions at 32x32 in ~600 iterations;
ssmpi's own BPTT twin of the same model (``experiments/study_motion.py``, ``probe-dir4-*``)
was still at chance at 2000 (fresh clips, lr 5e-4) and 1000 (lr 2e-3). This script rebuilds
that temporal model with torch autograd doing the backprop through time, checks it against
ssmpi's :class:`~ssmpi.engine.bptt.BPTT` (same weights: same losses and gradients), and
then trains it with the initialisations that could explain the gap.

The temporal model (ALGORITHM.md, "One step of one unit"; Skip-Sideways, k = 2, concat):

    gamma_1[t] = x[t]
    gamma_l[t] = concat(h_{l-1}[t-1], h_{l-2}[t-1])        (direct edge first; invalid = 0)
    h_l[t]     = H_l(gamma_l[t])
    J          = mean over the steps t whose top input is valid of xent(h_L[t], y)

Shapes: frames (N, T, H, W, C) as ssmpi stores them, NCHW inside torch; conv weights HWIO in
ssmpi, OIHW in torch; linear weights (in, out) in ssmpi, (out, in) in torch.

Initialisations (``--init``):
  he     He-normal convs, zero biases, Glorot-uniform linear: ssmpi's scheme, drawn by torch
  torch  PyTorch's defaults (kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in)), biases too)
  ssmpi  copied from ssmpi's BPTT with the same seed (the check; also a training run)

Usage (torch is optional for ssmpi; this script needs it; one thread is plenty):

    python experiments/probe_torch.py --check                 # equals ssmpi's BPTT?
    python experiments/probe_torch.py --init torch --iters 1500 --seed 0
    python experiments/probe_torch.py --init he --iters 1500 --seed 0 --lr 5e-4

Prints the test accuracy every ``--eval-every`` iterations and the first iteration >= 0.9,
and appends a JSON line per run to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT))

import study_motion as sm  # noqa: E402  (the study's generator and settings)

# the probe model (jobs/archs/probe.toml): (kind, argument) per module, one list per unit
PROBE = [
    [("conv", 16), ("relu", None), ("maxpool", 2)],
    [("conv", 32), ("relu", None)],
    [("conv", 32), ("relu", None)],
    [("conv", 32), ("relu", None), ("gap", None), ("linear", None)],
]


class Temporal(torch.nn.Module):
    """The Skip-Sideways temporal model of ``units`` (k = 2, concat), unrolled over T steps."""

    def __init__(self, units, cin: int, ncls: int, init: str, seed: int, k: int = 2):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.units, self.k, self.params = units, k, torch.nn.ParameterList()
        self.out_ch = []
        for l, mods in enumerate(units):
            # gamma_l's channels: the direct input, then the shortcut inputs (l-2 ... l-k)
            c = cin if l == 0 else sum(self.out_ch[l - d] for d in range(1, k + 1) if l - d >= 0)
            for kind, arg in mods:
                if kind == "conv":
                    self.params.extend(_init((arg, c, 3, 3), c * 9, init, g))
                    c = arg
                elif kind == "linear":
                    self.params.extend(_init((ncls, c), c, init, g, fan_out=ncls))
                    c = ncls
            self.out_ch.append(c if l < len(units) - 1 else None)
        # each unit's parameters, in order (weight, bias per conv / linear)
        n = [sum(2 for kind, _ in u if kind in ("conv", "linear")) for u in units]
        off = np.cumsum([0] + n)
        self.unit_params = [list(self.params)[off[l]:off[l + 1]] for l in range(len(units))]

    def unit(self, l: int, x, p):
        """H_l: gamma (N, C, H, W) -> h; ``p`` iterates over the parameters in order."""
        for kind, _ in self.units[l]:
            if kind == "conv":
                x = F.conv2d(x, next(p), next(p), padding=1)
            elif kind == "relu":
                x = F.relu(x)
            elif kind == "maxpool":
                x = F.max_pool2d(x, 2)
            elif kind == "gap":
                x = x.mean((2, 3))
            elif kind == "linear":
                w, b = next(p), next(p)
                x = x @ w.t() + b
        return x

    def forward(self, frames, T: int):
        """frames (N, T, C, H, W) -> top outputs of the valid steps [(N, K)] (steps L..T)."""
        L, k = len(self.units), self.k
        prev = [None] * L  # h_l[t-1] (None: invalid, fused as zeros)
        tops = []
        for t in range(T):
            cur = [None] * L
            for l in range(L):
                if l == 0:
                    gamma = frames[:, t]
                else:
                    if prev[l - 1] is None:  # the direct input is invalid: so is h_l
                        continue
                    parts = [prev[l - 1]]
                    for d in range(2, k + 1):
                        if l - d >= 0:
                            s = prev[l - d]
                            parts.append(s if s is not None else
                                         torch.zeros((prev[l - 1].shape[0], self.out_ch[l - d])
                                                     + tuple(prev[l - 1].shape[2:]),
                                                     dtype=prev[l - 1].dtype))
                    gamma = torch.cat(parts, 1)
                cur[l] = self.unit(l, gamma, iter(self.unit_params[l]))
            if cur[L - 1] is not None:
                tops.append(cur[L - 1])
            prev = cur
        return tops


def _init(wshape, fan_in, init, g, fan_out=None):
    """(weight, bias) of a conv (O, I, kh, kw) or linear (O, I) layer under ``init``."""
    if init == "torch":  # kaiming_uniform(a=sqrt(5)) and the matching bias bound
        bound = 1.0 / math.sqrt(fan_in)
        w = (torch.rand(wshape, generator=g) * 2 - 1) * bound
        b = (torch.rand(wshape[0], generator=g) * 2 - 1) * bound
    elif init == "he":
        if len(wshape) == 4:
            w = torch.randn(wshape, generator=g) * math.sqrt(2.0 / fan_in)
        else:
            lim = math.sqrt(6.0 / (fan_in + fan_out))
            w = (torch.rand(wshape, generator=g) * 2 - 1) * lim
        b = torch.zeros(wshape[0])
    else:
        raise ValueError(f"unknown init {init!r}")
    return torch.nn.Parameter(w), torch.nn.Parameter(b)


def copy_from_ssmpi(model: Temporal, bptt) -> None:
    """Load ssmpi's unit parameters (HWIO convs, (in, out) linears) into ``model``."""
    ps = list(model.params)
    i = 0
    for l in range(1, bptt.L + 1):
        for layer in bptt.units[l].layers:
            if "w" not in getattr(layer, "params", {}):
                continue
            w = np.asarray(layer.params["w"], np.float64)
            w = w.transpose(3, 2, 0, 1) if w.ndim == 4 else w.T
            ps[i].data = torch.tensor(w, dtype=ps[i].dtype)
            ps[i + 1].data = torch.tensor(np.asarray(layer.params["b"], np.float64),
                                          dtype=ps[i].dtype)
            i += 2
    assert i == len(ps), (i, len(ps))


class TwoFrame(Temporal):
    """ALGORITHM.md's first baseline: the same units as a plain CNN (direct edges only, no
    delays) fed two consecutive frames stacked along channels; one prediction per pair."""

    def __init__(self, units, cin: int, ncls: int, init: str, seed: int):
        super().__init__(units, 2 * cin, ncls, init, seed, k=1)

    def forward(self, frames, T: int):
        """frames (N, T, C, H, W) -> [(N, K)] for the T - 1 pairs (t - 1, t)."""
        N, _, C, H, W = frames.shape
        x = torch.cat([frames[:, :T - 1], frames[:, 1:T]], 2).reshape(N * (T - 1), 2 * C, H, W)
        for l in range(len(self.units)):
            x = self.unit(l, x, iter(self.unit_params[l]))
        return list(x.reshape(N, T - 1, -1).unbind(1))


def loss_and_probs(model, frames, labels, T):
    """(J, mean softmax over the valid steps (N, K)); frames (N, T, H, W, C) numpy."""
    x = torch.as_tensor(np.ascontiguousarray(frames[:, :T].transpose(0, 1, 4, 2, 3)),
                        dtype=model.params[0].dtype)
    y = torch.as_tensor(labels, dtype=torch.long)
    tops = model(x, T)
    J = sum(F.cross_entropy(z, y) for z in tops) / len(tops)
    probs = sum(F.softmax(z, 1) for z in tops) / len(tops)
    return J, probs


def cfg_of(a) -> dict:
    return dict(sm.ARCH, arch="probe", lr=a.lr, fresh=True, T=a.T, background=a.background)


def check(a) -> int:
    """Same weights as ssmpi's BPTT twin (float64): same per-step losses and gradients."""
    from ssmpi.engine.bptt import BPTT
    cfg = dict(cfg_of(a))
    # a float64 twin of the study's BPTT (same topology and seed)
    bp = BPTT(sm.build("bptt", dict(cfg), a.seed, 4).topo, seed=a.seed, dtype=np.float64, xp=np)
    model = Temporal(PROBE, 3, 4, "he", 0).double()
    copy_from_ssmpi(model, bp)
    b = next(sm.fresh_batches(cfg, a.seed))
    st = bp.run_clip(cfg["T"], b.frames.astype(np.float64), b.labels, update=False)
    J, probs = loss_and_probs(model, b.frames.astype(np.float64), b.labels, cfg["T"])
    J.backward()
    J0 = float(J.detach())
    worst = abs(J0 - float(np.mean(st.losses))) / abs(J0)
    print(f"loss: torch {J0:.12f}  ssmpi {float(np.mean(st.losses)):.12f}  rel {worst:.1e}")
    ps, i = list(model.params), 0
    for l in range(1, bp.L + 1):
        u = bp.units[l]
        for j, layer in enumerate(u.layers):
            if "w" not in getattr(layer, "params", {}):
                continue
            # ssmpi's gradient of this layer: views of the unit's flat grad vector
            gw, gb = (np.asarray(u._grad_views[(j, n)]) for n in ("w", "b"))
            tw = ps[i].grad.numpy()
            tw = tw.transpose(2, 3, 1, 0) if tw.ndim == 4 else tw.T
            for name, mine, ref in (("w", gw, tw), ("b", gb, ps[i + 1].grad.numpy())):
                rel = np.abs(mine - ref).max() / max(np.abs(ref).max(), 1e-300)
                worst = max(worst, rel)
                print(f"U{l} {type(layer).__name__}.{name}: max rel diff {rel:.1e}")
            i += 2
    pr = np.abs(np.asarray(st.probs) - probs.detach().numpy()).max()
    print(f"clip probabilities: max abs diff {pr:.1e}")
    ok = worst < 1e-9 and pr < 1e-9
    print("AGREE" if ok else "DISAGREE")
    return 0 if ok else 1


def train(a) -> dict:
    torch.manual_seed(a.seed)
    cfg = cfg_of(a)
    if a.init == "ssmpi":
        model = Temporal(PROBE, 3, 4, "he", a.seed)
        copy_from_ssmpi(model, sm.build("bptt", dict(cfg), a.seed, 4))
    elif a.model == "twoframe":
        model = TwoFrame(PROBE, 3, 4, a.init, a.seed)
    else:
        model = Temporal(PROBE, 3, 4, a.init, a.seed)
    opt = torch.optim.Adam(model.params, lr=a.lr, eps=1e-8)
    test_b = list(islice(sm.fresh_batches(cfg, a.seed + 10_000), a.test // cfg["batch"]))
    gen = sm.fresh_batches(cfg, a.seed)
    curve, first, t0 = [], None, time.time()
    for it in range(1, a.iters + 1):
        b = next(gen)
        J, _ = loss_and_probs(model, b.frames, b.labels, cfg["T"])
        opt.zero_grad()
        J.backward()
        opt.step()
        if it % a.eval_every == 0:
            with torch.no_grad():
                hit = sum(int((loss_and_probs(model, tb.frames, tb.labels, cfg["T"])[1]
                               .argmax(1).numpy() == tb.labels).sum()) for tb in test_b)
            acc = hit / (len(test_b) * cfg["batch"])
            curve.append((it, round(acc, 4), round(float(J.detach()), 4)))
            print(f"it {it:5d}  train loss {float(J.detach()):.3f}  test acc {acc:.3f}  "
                  f"({time.time() - t0:.0f} s)", flush=True)
            if first is None and acc >= 0.9:
                first = it
                if a.stop_at_first:
                    break
    res = dict(model=a.model, background=a.background, init=a.init, lr=a.lr, seed=a.seed,
               T=cfg["T"], first_0p9=first, curve=curve, seconds=round(time.time() - t0, 1))
    if a.out:
        with open(a.out, "a") as fh:
            fh.write(json.dumps(res) + "\n")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with ssmpi's BPTT and exit")
    ap.add_argument("--init", choices=("he", "torch", "ssmpi"), default="torch")
    ap.add_argument("--model", choices=("temporal", "twoframe"), default="temporal",
                    help="the Skip-Sideways temporal model (exact BPTT) or the two-frame CNN")
    ap.add_argument("--background", choices=("texture", "flat", "dynamic"), default="texture",
                    help="the generator's background (data_prep.synthetic.motion_video)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--T", type=int, default=16)
    ap.add_argument("--iters", type=int, default=1500)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--test", type=int, default=512, help="fresh test clips (multiple of 16)")
    ap.add_argument("--stop-at-first", action="store_true", help="stop at the first >= 0.9")
    ap.add_argument("--out", default="", help="append a JSON line per run here")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.check:
        return check(a)
    r = train(a)
    print(f"first >= 0.9: {r['first_0p9']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
