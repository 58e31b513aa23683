"""Performance model: steps/s of Sideways, Skip-Sideways, GPipe and BP from per-unit costs.

    python -m ssmpi.perfmodel                       # validate on benchmarks/results/speed.json
    python -m ssmpi.perfmodel --speed PATH          # (written by benchmarks/bench_speed.py)
    python -m ssmpi.perfmodel --project-only        # the paper's 8-device setting only

Inputs: for every unit U_l its forward time f_l and VJP time b_l for one frame step of the
batch (seconds, measured by :func:`profile_units` or derived from FLOPs), the bytes m_l of
its output message, and a link of bandwidth ``B`` (bytes/s) and latency ``alpha`` (s).
A message of m bytes costs ``alpha + m / B``. A clip has T frames; P ranks hold contiguous
unit groups g_1..g_P (:class:`~ssmpi.topology.Placement`); ``cores`` is how many ranks can
compute at once (P on a cluster; 2 for 8 ranks on this 2-core machine).

Sideways / Skip-Sideways, reset mode (ALGORITHM.md): at step t unit l runs its forward when
its direct input is valid (t >= l) and its VJP when its cotangent is valid (t >= 2L - l)::

    w_p(t)   = sum_{l in g_p} f_l [t >= l] + b_l [t >= 2L - l]           (rank p's work)
    step(t)  = max( max_p w_p(t),  sum_p w_p(t) / cores ) + c(t)
    c(t)     = max over cross-rank edges active at t of (alpha + m / B)   (one exchange/step)
    iteration = sum_{t=1..T} step(t) + update

(the ``sum / cores`` term: ranks that outnumber cores share them, which holds when waiting
ranks yield the core, ``wait_mode=poll``). In stream mode every step is a full step.

GPipe, M = T micro-batches (frames), stage p does F_p = sum f_l, B_p = sum b_l per frame::

    forward  = sum_p F_p + (M - 1) max_p F_p + (P - 1) (alpha + m / B)
    backward = sum_p B_p + (M - 1) max_p B_p + (P - 1) (alpha + m / B)
    iteration = max(forward + backward, M sum_p (F_p + B_p) / cores) + update

BP on one device (per-frame 2D, or causal 3D with its own per-frame costs):
``iteration = T sum_l (f_l + b_l) + update``. Rematerialisation adds one forward:
``T sum_l (2 f_l + b_l)`` (approximately: the last segment is not recomputed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np


@dataclass
class Link:
    """Point-to-point link: bandwidth (bytes/s) and latency (s)."""

    bandwidth: float = 1.4e9  # ~1.3-1.5 GB/s per rank on one machine (DESIGN.md)
    latency: float = 20e-6

    def cost(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth if nbytes > 0 else 0.0


@dataclass
class UnitCost:
    """One unit for one frame step of the batch: forward f, VJP b (s), output message bytes
    (the direct edge; shortcut messages add ``shortcut_bytes``)."""

    f: float
    b: float
    out_bytes: float = 0.0
    shortcut_bytes: float = 0.0


def balanced_groups(L: int, P: int) -> List[List[int]]:
    """The engine's placement: contiguous groups of 1..L, sizes differing by at most one."""
    from .engine.topology import balanced_groups as bg
    return bg(L, P)


def _rank_of(groups):
    return {l: p for p, g in enumerate(groups) for l in g}


def sideways_step_times(costs: Sequence[UnitCost], T: int, P: int, link: Link,
                        cores: Optional[int] = None, stream: bool = False,
                        groups=None) -> List[float]:
    """Predicted seconds of every step t = 1..T of one reset-mode clip (or steady-state
    steps when ``stream``)."""
    L = len(costs)
    groups = groups or balanced_groups(L, P)
    cores = cores or P
    rank = _rank_of(groups)
    out = []
    for t in range(1, T + 1):
        w = [0.0] * len(groups)
        comm = 0.0
        for l in range(1, L + 1):
            c = costs[l - 1]
            fwd = stream or t >= l
            bwd = stream or t >= 2 * L - l
            w[rank[l]] += c.f * fwd + c.b * bwd
            if fwd and l < L and rank.get(l + 1) != rank[l]:
                comm = max(comm, link.cost(c.out_bytes))
            if fwd and l + 1 < L and rank.get(l + 2) != rank[l]:
                comm = max(comm, link.cost(c.shortcut_bytes))
        out.append(max(max(w), sum(w) / cores) + comm)
    return out


def sideways_iteration(costs, T, P, link=Link(), cores=None, update_s=0.0, groups=None,
                       stream=False) -> float:
    """Seconds per reset-mode iteration (clip of T frames) of Sideways / Skip-Sideways."""
    return sum(sideways_step_times(costs, T, P, link, cores, stream, groups)) + update_s


def gpipe_iteration(costs, T, P, link=Link(), cores=None, update_s=0.0, groups=None,
                    micro: Optional[int] = None) -> float:
    """Seconds per iteration of GPipe on P stages. The clip's work (T frame steps of the
    batch) is split into ``micro`` micro-batches (default T: one frame each; the batch size
    N: one video each, as a video model whose micro-batch is a clip), each costing T / micro
    frame steps; the bubble is (micro + P - 1) / micro."""
    L = len(costs)
    groups = groups or balanced_groups(L, P)
    cores = cores or P
    M = micro or T
    k = T / M  # frame steps per micro-batch
    F = [k * sum(costs[l - 1].f for l in g) for g in groups]
    B = [k * sum(costs[l - 1].b for l in g) for g in groups]
    hop = max((link.cost(k * costs[g[-1] - 1].out_bytes) for g in groups[:-1]), default=0.0)
    fwd = sum(F) + (M - 1) * max(F) + (len(groups) - 1) * hop
    bwd = sum(B) + (M - 1) * max(B) + (len(groups) - 1) * hop
    busy = M * (sum(F) + sum(B)) / min(cores, len(groups))
    return max(fwd + bwd, busy) + update_s


def bp_iteration(costs, T, update_s=0.0, remat: bool = False) -> float:
    """Seconds per iteration of backprop on one device (remat: one extra forward)."""
    per = sum((2 * c.f if remat else c.f) + c.b for c in costs)
    return T * per + update_s


# -- measuring unit costs ------------------------------------------------------------------
def profile_units(topo, batch: int, reps: int = 5, seed: int = 0, dtype=np.float32):
    """Fastest (least disturbed) forward and VJP seconds of every unit of ``topo`` on random
    inputs (in this process, with whatever BLAS threads are set), plus message bytes.
    Returns [UnitCost]."""
    from .engine.unit import Unit
    rng = np.random.default_rng(seed)
    out = []
    for l in range(1, topo.L + 1):
        u = Unit(topo, l, seed=seed, dtype=dtype)
        g = rng.standard_normal((batch,) + tuple(topo.in_shapes[l])).astype(dtype)
        c = rng.standard_normal((batch,) + tuple(topo.out_shapes[l])).astype(dtype)
        tf, tb = [], []
        for r in range(reps + 1):
            t0 = time.perf_counter()
            _, res = u.forward(g, True)
            t1 = time.perf_counter()
            u.backward(res, c, need_dx=l > 1)
            t2 = time.perf_counter()
            if r:
                tf.append(t1 - t0)
                tb.append(t2 - t1)
        item = np.dtype(dtype).itemsize
        outb = batch * int(np.prod(topo.out_shapes[l])) * item
        sc = [e for e in topo.outbound(l) if e.kind == "shortcut"]
        scb = sum(batch * int(np.prod(e.act_shape)) * item for e in sc)
        out.append(UnitCost(float(np.min(tf)), float(np.min(tb)), outb, scb))
    return out


def flop_costs(topo, batch: int, flops_per_s: float, dtype_bytes: int = 4):
    """Unit costs from FLOPs: f = batch * flops / rate, b = 2 f (1 f for U1: no dx)."""
    out = []
    for l in range(1, topo.L + 1):
        fl = _unit_flops(topo, l)
        f = batch * fl / flops_per_s
        outb = batch * int(np.prod(topo.out_shapes[l])) * dtype_bytes
        scb = sum(batch * int(np.prod(e.act_shape)) * dtype_bytes
                  for e in topo.outbound(l) if e.kind == "shortcut")
        out.append(UnitCost(f, f if l == 1 else 2 * f, outb, scb))
    return out


def _unit_flops(topo, l) -> int:
    shape = topo.in_shapes[l]
    total = 0
    for layer in topo.unit_layers(l):
        shape = layer.build(shape)
        total += layer.flops()
    return total


def costs_from_json(items) -> List[UnitCost]:
    return [UnitCost(**d) for d in items]


# -- validation and projection -------------------------------------------------------------
def _step_counts(L: int, l: int, T: int, scheme: str):
    """How many forwards and VJPs unit l runs in one reset-mode iteration of T frames."""
    if scheme == "skip":
        return max(0, T - l + 1), max(0, T - (2 * L - l) + 1)
    return T, T  # GPipe and BP: every frame through every unit, both ways


def calibrate(costs: List[UnitCost], run: dict, scheme: str):
    """Scale every unit's (f, b) so that the model reproduces the per-unit compute seconds
    that ``run`` (a 1-rank bench_speed run) measured inside the executor; the rest of its
    iteration time (update, buffer copies, Python) becomes ``update_s``. Returns
    (costs, update_s). Without per-unit times the costs are returned unchanged."""
    by_unit = (run.get("compute_by_unit") or [{}])[0]
    if not by_unit:
        return costs, 0.0
    L, T = len(costs), run["T"]
    out = list(costs)
    if len(by_unit) == 1 and L > 1:  # one timer for the whole network (BP): one factor
        nf, nb = _step_counts(L, 1, T, scheme)
        model = sum(c.f * nf + c.b * nb for c in costs)
        k = float(next(iter(by_unit.values()))) / model if model > 0 else 1.0
        out = [UnitCost(c.f * k, c.b * k, c.out_bytes, c.shortcut_bytes) for c in costs]
    else:
        for key, m in by_unit.items():
            l = int(key)
            c = costs[l - 1]
            nf, nb = _step_counts(L, l, T, scheme)
            model = c.f * nf + c.b * nb
            k = float(m) / model if model > 0 else 1.0
            out[l - 1] = UnitCost(c.f * k, c.b * k, c.out_bytes, c.shortcut_bytes)
    overhead = max(0.0, 1 / run["steps_per_s"] - sum(float(v) for v in by_unit.values()))
    return out, overhead


def validate(speed: dict) -> List[dict]:
    """Predicted vs measured steps/s for every run recorded by bench_speed.py.

    Unit costs come from the unit profile, calibrated per unit on the scheme's own 1-rank
    run (:func:`calibrate`): the 1-rank rows are therefore calibration points (``cal``),
    the multi-rank rows are predictions. Ranks share ``effective_cores`` (the measured
    throughput of 2 concurrent processes over 1, bench_speed's machine ceiling), not the
    nominal core count: on this VM two vCPUs give ~1.1-1.25x, not 2x."""
    prof = speed["profile"]
    cores = speed.get("effective_cores") or speed.get("cores", 2)
    link = Link(**speed.get("link", {}))
    one = {r["algo"]: r for r in speed["runs"] if r["ranks"] == 1}
    base = {"skip": costs_from_json(prof["skip"]), "gpipe": costs_from_json(prof["sideways"]),
            "bp2d": costs_from_json(prof["bp"])}
    cal = {a: calibrate(c, one[a], "skip" if a == "skip" else "bp") if a in one else (c, 0.0)
           for a, c in base.items()}
    rows = []
    for r in speed["runs"]:
        T, P = r["T"], r["ranks"]
        if r["algo"] not in cal:
            continue
        costs, over = cal[r["algo"]]
        c = 1 if P == 1 else min(cores, P)
        upd = over / c
        if r["algo"] == "skip":
            pred = sideways_iteration(costs, T, P, link, cores=c, update_s=upd)
        elif r["algo"] == "gpipe":
            pred = gpipe_iteration(costs, T, P, link, cores=c, update_s=upd)
        else:
            pred = bp_iteration(costs, T, update_s=upd)
        meas = r["steps_per_s"]
        rows.append({"algo": r["algo"], "ranks": P, "measured": meas, "predicted": 1 / pred,
                     "error_pct": 100 * (1 / pred - meas) / meas,
                     "calibration": P == 1 and bool((r.get("compute_by_unit") or [{}])[0])})
    return rows


# Table 5 of the paper (steps/s, K600, 32 frames, 224x224, batch 8)
PAPER_TABLE5 = {"skip 1": 2.3, "skip 2": 3.6, "skip 8": 7.2, "gpipe 8": 4.2,
                "gpipe 8 (M=8 clips)": 4.2, "bp3d 1": 1.9,
                "bp3d-remat 1": 1.5, "causal3d 1": 2.4}


def project_paper(flops_per_s: float = 20e12, link: Link = Link(10e9, 10e-6)) -> Dict:
    """The paper's Table 5 setting from FLOPs: VGG16 (2 modules per unit, 8 units), 224x224,
    batch 8, T = 32, on 1, 2 and 8 devices of ``flops_per_s`` each, linked by ``link``;
    causal 3D VGG16 (kt = 3) by BP on one device. Returns steps/s per scheme."""
    from .baselines.causal3d import causal3d
    from .engine.topology import Topology
    from .nn.models import vgg16
    spec = vgg16(num_classes=600, resolution=224)
    skip = Topology(spec, mode="skip", k=2, modules_per_unit=2)
    side = Topology(spec, mode="sideways", modules_per_unit=2)
    bp = Topology(spec, mode="bp")
    N, T = 8, 32
    cs, cg, cb = (flop_costs(t, N, flops_per_s) for t in (skip, side, bp))
    c3 = causal3d("vgg16", kt=3, num_classes=600, resolution=224)
    from .baselines.causal3d import build_layers
    fl3 = sum(ly.flops() for ly in build_layers(c3, dtype=np.float32))
    f3 = N * fl3 / flops_per_s
    c3costs = [UnitCost(f3, 2 * f3)]
    out = {"skip 1": 1 / sideways_iteration(cs, T, 1, link),
           "skip 2": 1 / sideways_iteration(cs, T, 2, link),
           "skip 8": 1 / sideways_iteration(cs, T, 8, link),
           "gpipe 8": 1 / gpipe_iteration(cg, T, 8, link),
           "gpipe 8 (M=8 clips)": 1 / gpipe_iteration(cg, T, 8, link, micro=N),
           "bp2d 1": 1 / bp_iteration(cb, T),
           "causal3d 1": 1 / bp_iteration(c3costs, T),
           "causal3d-remat 1": 1 / bp_iteration(c3costs, T, remat=True)}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="ssmpi performance model")
    ap.add_argument("--speed", default=str(Path(__file__).resolve().parents[1] / "benchmarks" /
                                           "results" / "speed.json"))
    ap.add_argument("--project-only", action="store_true")
    ap.add_argument("--device-tflops", type=float, default=20.0,
                    help="sustained TFLOP/s of one device for the projection")
    ap.add_argument("--link-gbs", type=float, default=10.0, help="link GB/s for the projection")
    a = ap.parse_args(argv)
    if not a.project_only:
        p = Path(a.speed)
        if not p.exists():
            print(f"{p} not found: run benchmarks/bench_speed.py first (or --project-only)")
        else:
            speed = json.loads(p.read_text())
            rows = validate(speed)
            print(f"validation on {p} ({speed.get('model_desc', '')}, measured on "
                  f"{speed.get('cores', 2)} cores; BLAS {speed.get('blas', '?')})")
            print(f"effective cores {speed.get('effective_cores') or speed.get('cores', 2):.2f}; "
                  "1-rank rows marked cal calibrate the unit costs, the others are predictions")
            print(f"{'scheme':<8}{'ranks':>6}{'measured':>11}{'predicted':>11}{'error %':>9}")
            for r in rows:
                print(f"{r['algo']:<8}{r['ranks']:>6}{r['measured']:>11.3f}"
                      f"{r['predicted']:>11.3f}{r['error_pct']:>9.1f}"
                      + ("  cal" if r["calibration"] else ""))
            pred = [abs(r["error_pct"]) for r in rows if not r["calibration"]]
            if pred:
                print(f"prediction error (non-calibration rows): mean |error| "
                      f"{np.mean(pred):.1f}%, max {np.max(pred):.1f}%")
    proj = project_paper(a.device_tflops * 1e12, Link(a.link_gbs * 1e9, 10e-6))
    print(f"\nprojection: paper's Table 5 setting (VGG16 224x224, batch 8, T=32), devices of "
          f"{a.device_tflops:g} TFLOP/s, link {a.link_gbs:g} GB/s")
    print(f"{'scheme':<22}{'steps/s':>9}{'paper':>8}{'ratio to skip 1':>17}{'paper ratio':>13}")
    for k, v in proj.items():
        pp = PAPER_TABLE5.get(k)
        pr = f"{pp / PAPER_TABLE5['skip 1']:.2f}" if pp else "-"
        print(f"{k:<22}{v:>9.2f}{(pp if pp else '-'):>8}{v / proj['skip 1']:>17.2f}{pr:>13}")
    s8 = proj["skip 8"]
    print(f"skip 8 / gpipe 8: {s8 / proj['gpipe 8']:.2f} (micro-batch = frame), "
          f"{s8 / proj['gpipe 8 (M=8 clips)']:.2f} (micro-batch = clip; paper 1.71); "
          f"skip 8 / BP 2D 1: {s8 / proj['bp2d 1']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
