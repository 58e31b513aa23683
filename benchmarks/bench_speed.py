"""Table 5 on this machine: training steps/s at a fixed batch and clip length.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_speed.py [--quick]

One "step" is one training iteration of the paper: a clip of T frames (reset mode for
Sideways), forward and backward passes, one update. Measured, each in a fresh ``mpiexec``
with one BLAS thread per rank (benchmarks/common.py):

- Skip-Sideways (k=2, concat) on 1 (serial executor), 2, 4, 8 ranks (``wait_mode=poll``);
- GPipe (ssmpi.baselines.GPipe, micro-batch = frame) on the same ranks and units;
- per-frame 2D BP (ssmpi.baselines.FrameBP, one unit) and causal 3D BP through the clip
  (ssmpi.baselines.CausalBP, kt = 3), with and without rematerialisation, on 1 rank.

Ratios are to Skip-Sideways on 1 rank measured in the same run. Ranks beyond the core count
share cores (8 ranks on 2 cores here). The script also profiles every unit's forward and VJP
in this process (one BLAS thread) for the performance model (``python -m ssmpi.perfmodel``
reads benchmarks/results/speed.json).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="64x64, T=16, one timed iteration")
    common.shape_args(ap, width=0.25, res=112, batch=8, iters=2)
    ap.add_argument("--T", type=int, default=32, help="clip length (>= 2L for full pipelines)")
    ap.add_argument("--ranks", default="1,2,4,8")
    ap.add_argument("--segment", type=int, default=4, help="remat segment (frames)")
    a = ap.parse_args(argv)
    if a.quick:
        a.res, a.T, a.iters = 64, 16, 1
    env = common.environment()
    print(f"BLAS: {env['blas']}  (OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']})")
    model = {"name": "vgg8", "num_classes": 51, "width": a.width, "resolution": a.res}
    base = {"model": model, "batch": a.batch, "T": a.T, "iters": a.iters, "warmup": 1}
    ranks = [int(r) for r in a.ranks.split(",")]
    plan = [("skip", n, dict(algo="engine", mode="skip")) for n in ranks]
    plan += [("gpipe", n, dict(algo="gpipe")) for n in ranks]
    plan += [("bp2d", 1, dict(algo="framebp", mode="bp")),
             ("causal3d", 1, dict(algo="causal3d", kt=3)),
             ("causal3d-remat", 1, dict(algo="causal3d", kt=3, segment=a.segment))]
    runs = []
    for name, n, extra in plan:
        r = common.run_worker(n, dict(base, **extra))
        sps = 1 / r["iter_median_s"]
        runs.append({"algo": name, "ranks": n, "T": a.T, "steps_per_s": sps,
                     "iter_s": r["iter_s"], "blas": r["blas"],
                     "wait_s": [p["wait_s"] for p in r["per_rank"]],
                     "compute_s": [p["compute_s"] for p in r["per_rank"]],
                     "compute_by_unit": [p.get("compute_by_unit", {}) for p in r["per_rank"]]})
        print(f"  {name} on {n} rank(s): {sps:.3f} steps/s", flush=True)
    ceiling = common.machine_ceiling()
    print(f"machine ceiling: 2 single-threaded GEMM processes run {ceiling:.2f}x the "
          "throughput of one (the performance model's effective core count)", flush=True)
    ref = next(x for x in runs if x["algo"] == "skip" and x["ranks"] == 1)["steps_per_s"]
    rows = [(x["algo"], x["ranks"], x["steps_per_s"], x["steps_per_s"] * a.T,
             x["steps_per_s"] / ref) for x in runs]
    print(f"\nVGG8 width {a.width}, {a.res}x{a.res}, batch {a.batch}, clip T={a.T}, float32, "
          f"{os.cpu_count()} cores")
    print(common.table(rows, ["scheme", "ranks", "steps/s", "frames/s", "vs skip 1 rank"]))
    # unit profile for the performance model (this process, one BLAS thread)
    from threadpoolctl import threadpool_limits

    from ssmpi.engine.topology import Topology
    from ssmpi.nn import models
    from ssmpi.perfmodel import profile_units
    spec = models.vgg8(num_classes=51, width=a.width, resolution=a.res)
    with threadpool_limits(1, user_api="blas"):
        prof = {m: [asdict(c) for c in profile_units(Topology(spec, mode=m), a.batch)]
                for m in ("skip", "sideways", "bp")}
    res = {"env": env, "args": vars(a), "runs": runs, "profile": prof, "cores": os.cpu_count(),
           "effective_cores": ceiling,
           "blas": runs[0]["blas"],
           "model_desc": f"vgg8 width {a.width} {a.res}px batch {a.batch} T {a.T}"}
    print("wrote", common.save("speed", res, a.out))


if __name__ == "__main__":
    main()
