"""Real-time learning: Skip-Sideways VGG8 at batch 1 fed by a 25 fps camera.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_realtime.py [--quick]

The engine runs in stream mode (no reset; each unit updates every ``--update-every`` steps)
on ``--ranks`` ranks (8 = one unit per rank; on this 2-core machine they share the cores,
``wait_mode=poll``). Frame i "arrives" at t0 + i / fps. At each step the bottom rank takes a
frame: policy ``drop`` takes the newest arrived frame and drops older unprocessed ones (a
live system), ``queue`` takes the oldest unprocessed one (a buffer that grows when the
pipeline is slower than the camera). When no new frame has arrived the bottom rank sleeps
until it does. Reported: sustained steps/s (frames processed per second), frames dropped,
frames still queued at the end and the largest backlog, and per-frame latency: from a
frame's arrival to the end of the top unit's step on it (the direct path: L - 1 steps after
the bottom unit took it; median and 90th percentile after 2L warm-up steps).
JSON: benchmarks/results/realtime.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="width 0.25, 60 steps")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--res", type=int, default=112)
    ap.add_argument("--fps", type=float, default=25.0)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--update-every", type=int, default=8)
    ap.add_argument("--policies", default="drop,queue")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.quick:
        a.width, a.steps = 0.25, 60
    env = common.environment()
    print(f"BLAS: {env['blas']}  (OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']})")
    model = {"name": "vgg8", "num_classes": 51, "width": a.width, "resolution": a.res}
    runs = []
    for pol in a.policies.split(","):
        spec = {"algo": "realtime", "mode": "skip", "model": model, "batch": 1, "T": 16,
                "fps": a.fps, "steps": a.steps, "policy": pol, "wait_mode": "poll",
                "update_every": a.update_every}
        r = common.run_worker(a.ranks, spec)
        r.pop("spec", None)
        runs.append(dict(r, policy=pol))
        print(f"  {pol}: {r['sustained_fps']:.1f} steps/s", flush=True)
    rows = [(x["policy"], x["fps_in"], x["sustained_fps"], x["step_ms"], x["dropped"],
             x["queued_at_end"], x["queue_max"], x["latency_ms_median"], x["latency_ms_p90"])
            for x in runs]
    print(f"\nSkip-Sideways VGG8 width {a.width}, {a.res}x{a.res}, batch 1, {a.ranks} ranks, "
          f"{a.steps} steps, camera {a.fps:g} fps")
    print(common.table(rows, ["policy", "fps in", "steps/s", "ms/step", "dropped",
                              "queued at end", "max backlog", "latency ms (median)",
                              "latency ms (p90)"]))
    ok = all(x["sustained_fps"] >= 0.97 * a.fps for x in runs)
    print(f"keeps up with {a.fps:g} fps: {'yes' if ok else 'no'}")
    res = {"env": env, "args": vars(a), "runs": runs, "keeps_up": ok}
    print("wrote", common.save("realtime", res, a.out))


if __name__ == "__main__":
    main()
