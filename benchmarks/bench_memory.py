"""Table 4 on this machine: per-rank peak memory vs clip length, and the largest batch that fits.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_memory.py [--quick]

Each point is a fresh ``mpiexec`` process group (benchmarks/common.py) that builds the model
and trains ``--iters`` clips of T frames; the figure is the ``tracemalloc`` peak of the rank
(the largest over ranks), which NumPy's data allocations report to. The input clip is
allocated before tracing starts (it is the data loader's, the same for every method).

Schemes, T in {32, 64, 128, 256} (``--Ts``):

- Sideways and Skip-Sideways (k=2, concat), reset mode, serial executor on 1 rank (one
  device, as Table 4) and on ``--ranks`` ranks (per-rank peak);
- GPipe on ``--ranks`` ranks (micro-batch = frame: every stage keeps all T frames' residuals);
- BP causal 3D (kt = 3) through the clip on 1 rank, and with rematerialisation (segments
  of ``--segment`` frames).

Largest batch for a memory budget (``--budget-mb``): at T = max(Ts), each scheme runs at
batch 1 and batch 2; per-sample slope = peak(2) - peak(1), fixed part = peak(1) - slope, and
the largest batch is floor((budget - fixed) / slope).

Targets: Sideways/Skip-Sideways peak at T=256 <= 1.05x T=32; BP causal 3D >= 4x.
JSON: benchmarks/results/memory.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="T in {32, 256} only, fewer schemes")
    common.shape_args(ap, width=0.25, res=64, batch=2, iters=1)
    ap.add_argument("--Ts", default="32,64,128,256")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--segment", type=int, default=16)
    ap.add_argument("--budget-mb", type=float, default=1024.0)
    a = ap.parse_args(argv)
    if a.quick:
        a.Ts = "32,256"
    env = common.environment()
    print(f"BLAS: {env['blas']}  (OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']})")
    Ts = [int(t) for t in a.Ts.split(",")]
    model = {"name": "vgg8", "num_classes": 51, "width": a.width, "resolution": a.res}
    schemes = [
        ("sideways", 1, dict(algo="engine", mode="sideways")),
        ("skip", 1, dict(algo="engine", mode="skip")),
        (f"skip/{a.ranks}r", a.ranks, dict(algo="engine", mode="skip")),
        (f"gpipe/{a.ranks}r", a.ranks, dict(algo="gpipe")),
        ("bp-causal3d", 1, dict(algo="causal3d", kt=3)),
        ("bp-causal3d-remat", 1, dict(algo="causal3d", kt=3, segment=a.segment)),
    ]
    if a.quick:
        schemes = [s for s in schemes if s[0] != "sideways"]
    MB = 1 << 20
    peaks = {}
    for name, n, extra in schemes:
        for T in Ts:
            spec = dict(extra, model=model, batch=a.batch, T=T, iters=a.iters, warmup=0,
                        memory=True)
            r = common.run_worker(n, spec)
            peaks[(name, T)] = max(p["peak_bytes"] for p in r["per_rank"])
            print(f"  {name} T={T}: {peaks[(name, T)] / MB:.1f} MiB", flush=True)
    rows = []
    for name, _, _ in schemes:
        row = [name] + [peaks[(name, T)] / MB for T in Ts]
        row.append(peaks[(name, Ts[-1])] / peaks[(name, Ts[0])])
        rows.append(row)
    print(f"\nper-rank tracemalloc peak (MiB), VGG8 width {a.width}, {a.res}x{a.res}, "
          f"batch {a.batch}")
    print(common.table(rows, ["scheme"] + [f"T={T}" for T in Ts] + [f"T{Ts[-1]}/T{Ts[0]}"]))
    # largest batch that fits the budget, at the longest clip
    Tmax = Ts[-1]
    fits = []
    for name, n, extra in schemes:
        p = {}
        for b in (1, 2):
            spec = dict(extra, model=model, batch=b, T=Tmax, iters=1, warmup=0, memory=True)
            p[b] = max(q["peak_bytes"] for q in common.run_worker(n, spec)["per_rank"])
        slope = max(p[2] - p[1], 1)
        fixed = p[1] - slope
        nmax = int((a.budget_mb * MB - fixed) // slope)
        fits.append((name, slope / MB, fixed / MB, max(nmax, 0)))
    print(f"\nlargest batch in {a.budget_mb:.0f} MiB per rank at T={Tmax}")
    print(common.table(fits, ["scheme", "MiB/sample", "fixed MiB", "largest batch"]))
    targets = {}
    for name in ("sideways", "skip", f"skip/{a.ranks}r"):
        if (name, Tmax) in peaks:
            v = peaks[(name, Tmax)] / peaks[(name, Ts[0])]
            targets[f"{name} T{Tmax}/T{Ts[0]} <= 1.05"] = (v, v <= 1.05)
    v = peaks[("bp-causal3d", Tmax)] / peaks[("bp-causal3d", Ts[0])]
    targets[f"bp-causal3d T{Tmax}/T{Ts[0]} >= 4"] = (v, v >= 4)
    for k, (v, ok) in targets.items():
        print(f"target {k}: {v:.3f} -> {'met' if ok else 'NOT met'}")
    res = {"env": env, "args": vars(a), "method": "tracemalloc peak per rank, max over ranks",
           "peaks_bytes": {f"{k[0]} T={k[1]}": v for k, v in peaks.items()},
           "largest_batch": [dict(zip(["scheme", "mib_per_sample", "fixed_mib", "batch"], f))
                             for f in fits],
           "targets": {k: {"value": v, "met": ok} for k, (v, ok) in targets.items()}}
    print("wrote", common.save("memory", res, a.out))


if __name__ == "__main__":
    main()
