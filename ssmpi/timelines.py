"""Sideways, Skip-Sideways, GPipe and backprop timelines, one above the other.

    python -m ssmpi.timelines --ranks 4 --out runs/timelines

runs the same small model (``tiny``: ``--units`` modules, one unit per rank by default)
with four schemes, each in its own ``mpiexec`` (started here, under a timeout), traces a
few training iterations after a warm-up, and writes to ``--out``:

- ``timelines.png``: one panel per scheme, ranks as rows, on one shared time axis (ms from
  the start of each scheme's first traced iteration); compute blue, waiting orange, data
  green, update red;
- ``timelines.json``: the same events for https://ui.perfetto.dev (one process per scheme,
  one thread per rank, each scheme starting at 0);
- ``summary.json``: the numbers printed below, per scheme.

It prints, per scheme, the ranks it uses, the time per iteration (one clip of ``--clip``
frames) and the **idle (bubble) share**: the fraction of rank-time in the traced window
that is not compute, data or update (waiting for messages, or nothing to do), over the
ranks the scheme uses and over all ``--ranks`` ranks (backprop runs on one rank: the other
ranks of the allocation idle).

Schemes (``--schemes``, default all four):

- ``sideways`` / ``skip``: :class:`~ssmpi.engine.executor.Engine` (reset mode, one update
  per clip); every rank computes at every step;
- ``gpipe``: :class:`~ssmpi.baselines.GPipe` (exact backprop, micro-batch = frame, the
  forward of every frame, then the backward): the bubble is visible;
- ``bp``: :class:`~ssmpi.baselines.FrameBP`, per-frame backprop through the same units on
  one rank.

Timing on a laptop with fewer cores than ranks: a rank waiting for its core shows as
compute (the span is longer), so idle shares measured there are not those of one rank
per core. The printout says when ranks outnumber cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

SCHEMES = ("sideways", "skip", "gpipe", "bp")
TITLES = {"sideways": "Sideways", "skip": "Skip-Sideways (k=2)",
          "gpipe": "GPipe (exact backprop, micro-batch = frame)",
          "bp": "backprop (per frame, one rank)"}
BUSY = ("compute", "data", "update")  # everything else in the window is idle


# -- the worker: one scheme under mpiexec ----------------------------------------------------
def _spec_model(spec):
    from .nn import models

    return models.tiny(num_classes=4, units=spec["units"], width=spec["width"],
                       resolution=spec["res"])


def worker(spec: dict, out_path: str, comm) -> int:
    """Run ``spec["scheme"]`` on ``comm``: warm-up iterations, then traced ones; write rank
    0's rows and meta to ``out_path``."""
    import numpy as np

    from . import backend
    from .engine.topology import Placement, Topology
    from .trace import Tracer

    backend.select("cpu")
    scheme, N, T = spec["scheme"], spec["batch"], spec["clip"]
    model = _spec_model(spec)
    rng = np.random.default_rng(0)
    H, W, C = model.in_shape
    frames = rng.standard_normal((N, T, H, W, C)).astype(np.float32)
    labels = rng.integers(0, 4, N)
    opt = dict(name="sgd", lr=1e-3, momentum=0.9)
    rank = comm.rank
    comm.watch.configure(spec["wait_mode"], watchdog_s=120.0)  # no hangs, whatever happens
    tracer = Tracer(rank, enabled=False)
    if scheme in ("sideways", "skip"):
        from .engine.executor import Engine

        topo = Topology(model, mode=scheme, k=2 if scheme == "skip" else 1)
        pl = Placement(topo.L, comm.size)
        runner = Engine(topo, pl, comm, batch=N, optimizer=opt, wait_mode=spec["wait_mode"],
                        tracer=tracer)

        def one():
            runner.run_clip(T, frames if runner.is_bottom else None,
                            labels if runner.is_top else None)
    elif scheme == "gpipe":
        from .baselines import GPipe

        topo = Topology(model, mode="sideways")
        pl = Placement(topo.L, comm.size)
        runner = GPipe(topo, pl, comm, batch=N, optimizer=opt, wait_mode=spec["wait_mode"],
                       tracer=tracer)

        def one():
            runner.run_clip(T, frames if runner.prev is None else None,
                            labels if runner.next is None else None)
    elif scheme == "bp":
        from .baselines import FrameBP

        topo = Topology(model, mode="sideways")  # the same units, chained on one rank
        pl = Placement(topo.L, 1)
        runner = FrameBP(topo, batch=N, optimizer=opt, tracer=tracer)

        def one():
            runner.run_clip(T, frames, labels)
    else:
        raise ValueError(f"unknown scheme {scheme!r}")
    tracer.label = ",".join(f"U{l}" for l in pl.units_of(rank))
    iters = []
    for it in range(spec["warmup"] + spec["iters"]):
        comm.barrier(what="the start of an iteration")  # every scheme starts iterations alike
        tracer.enabled = it >= spec["warmup"]
        t0 = time.perf_counter()
        one()
        iters.append(time.perf_counter() - t0)
        tracer.enabled = False
    rows = tracer.gather(comm)
    if rank == 0:
        meta = dict(scheme=scheme, ranks=comm.size, units=topo.L, model=model.name,
                    placement=pl.describe(), iter_s=iters[spec["warmup"]:])
        Path(out_path).write_text(json.dumps(dict(meta=meta, rows=rows)))
    return 0


# -- analysis -----------------------------------------------------------------------------------
def shares(rows: List[dict], ranks: int, all_ranks: int) -> dict:
    """Busy and idle time of one scheme's traced window. ``rows``: trace rows (``t0``,
    ``dur`` in s, ``cat``, ``rank``); ``ranks``: ranks the scheme runs on; ``all_ranks``:
    the allocation. Returns window_s, busy_s (compute + data + update, all ranks),
    wait_s, idle (1 - busy / (ranks x window)) and idle_all (over ``all_ranks``)."""
    if not rows:
        return dict(window_s=0.0, busy_s=0.0, wait_s=0.0, idle=float("nan"),
                    idle_all=float("nan"))
    t0 = min(r["t0"] for r in rows)
    t1 = max(r["t0"] + r["dur"] for r in rows)
    window = t1 - t0
    busy = sum(r["dur"] for r in rows if r["cat"] in BUSY)
    wait = sum(r["dur"] for r in rows if r["cat"] == "wait")
    return dict(window_s=window, busy_s=busy, wait_s=wait,
                idle=1 - busy / (ranks * window) if window > 0 else float("nan"),
                idle_all=1 - busy / (all_ranks * window) if window > 0 else float("nan"))


def per_rank(rows: List[dict]) -> Dict[int, Dict[str, float]]:
    """{rank: {category: seconds}} of one scheme."""
    out: Dict[int, Dict[str, float]] = {}
    for r in rows:
        d = out.setdefault(r["rank"], {})
        d[r["cat"]] = d.get(r["cat"], 0.0) + r["dur"]
    return out


def combined_trace(panels: List[dict]) -> dict:
    """One Chrome / Perfetto trace: a process per scheme (in panel order), a thread per
    rank, every scheme starting at t = 0."""
    from .trace import chrome_trace

    events = []
    for pid, p in enumerate(panels):
        for ev in chrome_trace(p["rows"], p["title"])["traceEvents"]:
            ev = dict(ev, pid=pid)
            events.append(ev)
        events.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
                       "args": {"sort_index": pid}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


# -- the driver ---------------------------------------------------------------------------------
def _run_scheme(spec: dict, n: int, timeout: float, env: dict) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.json"
        cmd = ["mpiexec", "-n", str(n), sys.executable, "-m", "ssmpi.timelines", "--worker",
               json.dumps(spec), str(out)]
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"ssmpi.timelines: error: {spec['scheme']} did not finish within "
                             f"{timeout:.0f}s (--timeout)")
        if p.returncode != 0 or not out.exists():
            tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-15:])
            raise SystemExit(f"ssmpi.timelines: error: {spec['scheme']} failed (exit "
                             f"{p.returncode}): {' '.join(cmd[:4])} ...\n{tail}")
        return json.loads(out.read_text())


def report(results: List[dict], all_ranks: int) -> str:
    """The table printed at the end (results: summary dicts)."""
    lines = [f"{'scheme':<10} {'ranks':>5} {'ms/iter':>9} {'busy ms':>9} {'wait ms':>9} "
             f"{'idle':>6} {'idle of ' + str(all_ranks):>10}"]
    for r in results:
        lines.append(f"{r['scheme']:<10} {r['ranks']:>5} {1e3 * r['iter_s']:>9.1f} "
                     f"{1e3 * r['busy_s']:>9.1f} {1e3 * r['wait_s']:>9.1f} "
                     f"{100 * r['idle']:>5.0f}% {100 * r['idle_all']:>9.0f}%")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ssmpi.timelines", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split(
        "\n\n", 1)[1])
    ap.add_argument("--ranks", type=int, default=4, help="ranks of the pipelines (default 4)")
    ap.add_argument("--units", type=int, default=0, help="model units (default: = ranks)")
    ap.add_argument("--out", default="runs/timelines", help="output folder")
    ap.add_argument("--schemes", default=",".join(SCHEMES),
                    help=f"comma-separated subset of {','.join(SCHEMES)}")
    ap.add_argument("--iters", type=int, default=2, help="traced iterations (default 2)")
    ap.add_argument("--warmup", type=int, default=1, help="untraced iterations first")
    ap.add_argument("--clip", type=int, default=8, help="frames per clip (default 8)")
    ap.add_argument("--batch", type=int, default=4, help="clips per batch (default 4)")
    ap.add_argument("--width", type=int, default=16, help="channels of the first conv")
    ap.add_argument("--res", type=int, default=32, help="frame size (default 32x32)")
    ap.add_argument("--wait-mode", choices=("poll", "block"), default="poll")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per scheme")
    ap.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        from . import program

        spec, out = json.loads(a.worker[0]), a.worker[1]
        return program.run("ssmpi.timelines", lambda comm, stopper: worker(spec, out, comm))
    schemes = [s.strip() for s in a.schemes.split(",") if s.strip()]
    bad = [s for s in schemes if s not in SCHEMES]
    if bad or not schemes:
        ap.error(f"--schemes: {','.join(bad) or 'none'} not in {','.join(SCHEMES)}")
    units = a.units or max(a.ranks, 2)
    if a.ranks < 1 or units < a.ranks:
        ap.error(f"--ranks must be in 1..{units} (at most one rank per unit; --units {units})")
    for name in ("iters", "clip", "batch", "width", "res"):
        if getattr(a, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if a.warmup < 0:
        ap.error("--warmup must be >= 0")
    if shutil.which("mpiexec") is None:
        sys.stderr.write("ssmpi.timelines: error: mpiexec not found (pip install -e '.[test]' "
                         "or load your MPI)\n")
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    base = dict(units=units, width=a.width, res=a.res, batch=a.batch, clip=a.clip,
                iters=a.iters, warmup=a.warmup, wait_mode=a.wait_mode)
    panels, results = [], []
    for s in schemes:
        n = 1 if s == "bp" else a.ranks
        sys.stdout.write(f"== {s} on {n} rank(s) ...\n")
        sys.stdout.flush()
        res = _run_scheme(dict(base, scheme=s), n, a.timeout, env)
        meta, rows = res["meta"], res["rows"]
        sh = shares(rows, n, a.ranks)
        iter_s = sum(meta["iter_s"]) / len(meta["iter_s"])
        results.append(dict(scheme=s, ranks=n, iter_s=iter_s, placement=meta["placement"],
                            model=meta["model"], per_rank=per_rank(rows), **sh))
        panels.append(dict(title=f"{TITLES[s]}: {n} rank(s), idle {100 * sh['idle']:.0f}%",
                           rows=rows))
    (out / "timelines.json").write_text(json.dumps(combined_trace(panels)))
    png = out / "timelines.png"
    note = ""
    try:
        from .trace import stacked_gantt_png

        stacked_gantt_png(panels, png, title=f"{results[0]['model']}, batch {a.batch}, clip "
                          f"of {a.clip} frames, {a.iters} iteration(s)")
    except ImportError as err:
        png, note = None, f" (no PNG: matplotlib is not importable: {err})"
    (out / "summary.json").write_text(json.dumps(dict(
        ranks=a.ranks, cores=os.cpu_count(), settings=base, schemes=results), indent=1))
    sys.stdout.write(report(results, a.ranks) + "\n")
    cores = os.cpu_count() or 1
    if a.ranks > cores:
        sys.stdout.write(f"note: {a.ranks} ranks on {cores} cores: compute spans include "
                         "time spent waiting for a core\n")
    sys.stdout.write(f"timelines: {png or ''}{note} and {out / 'timelines.json'} (open in "
                     "https://ui.perfetto.dev); numbers: " + str(out / "summary.json") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
