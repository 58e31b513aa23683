"""The measurements of ``benchmarks/gpu_check.sh`` (one GPU): conv vs cuDNN, frames/s, losses.

    python benchmarks/gpu_bench.py conv --device gpu --out conv.json
    python benchmarks/gpu_bench.py fps --device gpu --ranks 8 --batch 1 --out fps1.json
    python benchmarks/gpu_bench.py losses runs/gpu/metrics.jsonl runs/cpu/metrics.jsonl --out l.json

``conv``: every conv layer of VGG8 (``bench_ops.VGG8``: 112x112, 3x3 pad 1, batch 8, float32)
forward + dx + dw (the first layer without dx), ssmpi's CuPy code (with a workspace, as the
layers run it; Winograd on and off) against PyTorch's ``conv2d`` forward + backward on the
same card (cuDNN, ``cudnn.benchmark``; NCHW and channels-last; fp32 with TF32 off, and TF32
on for reference). Each time is the median of ``--repeat`` synchronised runs after warm-ups;
the ratio is ssmpi / the faster cuDNN layout (the issue's target: <= 1.5).

``fps``: Skip-Sideways in stream mode (no resets, updates every T steps) on ``--ranks``
ranks sharing the GPU(s): frames/s = batch x T / iteration time (median), per-rank compute
and wait shares, and with ``--trace`` a timeline (spans synchronised on the GPU).

``losses``: the per-iteration training losses of two runs (``metrics.jsonl``): the largest
relative difference over the first ``--n`` iterations and whether it is within ``--rtol``.

``--device double`` (or ``cpu``) runs the same code on the CPU at small sizes: how the
script is tested on a machine without a GPU (PyTorch then runs on the CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from bench_ops import VGG8  # noqa: E402


# -- conv -----------------------------------------------------------------------------------
def _median_time(fn, sync, repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _layers(width: float, res: int):
    out = []
    for name, h, cin, cout in VGG8:
        h = max(2, h * res // 112)
        cin = cin if name == "conv1" else max(1, int(cin * width))
        out.append((name, h, cin, max(1, int(cout * width))))
    return out


def conv(a) -> dict:
    from ssmpi import backend
    from ssmpi.nn.ops import conv as conv_mod
    from ssmpi.nn.ops import conv2d_bwd, conv2d_fwd

    xp = backend.select(a.device)
    backend.bind_local_device()
    on_gpu = a.device == "gpu"
    rng = np.random.default_rng(0)
    res = {"device": backend.device_name(), "batch": a.batch, "width": a.width, "res": a.res,
           "layers": []}
    try:
        import torch
    except ImportError:
        torch = None
    tdev = "cuda" if on_gpu else "cpu"
    if torch is not None:
        torch.backends.cudnn.benchmark = True
        res["torch"] = f"{torch.__version__}, cuDNN {torch.backends.cudnn.version()}"
    totals = {}
    for name, h, cin, cout in _layers(a.width, a.res):
        need_dx = name != "conv1"
        x = xp.asarray(rng.standard_normal((a.batch, h, h, cin)).astype(np.float32))
        w = xp.asarray((rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin))
                       .astype(np.float32))
        b = xp.zeros(cout, np.float32)
        dy = xp.asarray(rng.standard_normal((a.batch, h, h, cout)).astype(np.float32))
        row = {"layer": name, "h": h, "cin": cin, "cout": cout,
               "gflop": 3 * common_gflop(a.batch, h, cin, cout) * (1 if need_dx else 2 / 3)}
        for wino in (True, False):
            conv_mod.WINOGRAD = wino
            ws = {}

            def step():
                y, r = conv2d_fwd(x, w, b, pad=1, ws=ws)
                conv2d_bwd(r, dy, need_dx=need_dx)

            row["ssmpi_wino_ms" if wino else "ssmpi_im2col_ms"] = 1e3 * _median_time(
                step, backend.synchronize, a.repeat)
        conv_mod.WINOGRAD = True
        if torch is not None:
            sync = torch.cuda.synchronize if on_gpu else (lambda: None)
            for fmt in ("nchw", "nhwc"):
                for tf32 in ((False, True) if on_gpu else (False,)):
                    torch.backends.cudnn.allow_tf32 = tf32
                    mf = torch.channels_last if fmt == "nhwc" else torch.contiguous_format
                    xt = torch.randn(a.batch, cin, h, h, device=tdev).to(memory_format=mf)
                    xt.requires_grad_(need_dx)
                    wt = torch.randn(cout, cin, 3, 3, device=tdev).to(memory_format=mf)
                    wt.requires_grad_(True)
                    bt = torch.zeros(cout, device=tdev, requires_grad=True)
                    dyt = torch.randn(a.batch, cout, h, h, device=tdev).to(memory_format=mf)

                    def tstep():
                        y = torch.nn.functional.conv2d(xt, wt, bt, padding=1)
                        y.backward(dyt)

                    key = f"torch_{fmt}" + ("_tf32" if tf32 else "") + "_ms"
                    row[key] = 1e3 * _median_time(tstep, sync, a.repeat)
            torch.backends.cudnn.allow_tf32 = True
            row["cudnn_fp32_ms"] = min(row["torch_nchw_ms"], row["torch_nhwc_ms"])
        for k, v in row.items():
            if k.endswith("_ms"):
                totals[k] = totals.get(k, 0.0) + v
        res["layers"].append(row)
    res["total"] = totals
    best = min(totals["ssmpi_wino_ms"], totals["ssmpi_im2col_ms"])
    res["ssmpi_best_ms"] = best
    res["ssmpi_best"] = "winograd" if best == totals["ssmpi_wino_ms"] else "im2col"
    if "cudnn_fp32_ms" in totals:
        res["ratio_vs_cudnn_fp32"] = best / totals["cudnn_fp32_ms"]
        res["target_1_5x"] = res["ratio_vs_cudnn_fp32"] <= 1.5
    lines = [f"conv fwd+dx+dw, VGG8 layers {a.res}x{a.res} width {a.width}, batch {a.batch}, "
             f"{res['device']}; torch {res.get('torch', 'not installed')}"]
    cols = [k for k in ("ssmpi_wino_ms", "ssmpi_im2col_ms", "torch_nchw_ms", "torch_nhwc_ms",
                        "torch_nchw_tf32_ms", "torch_nhwc_tf32_ms") if k in totals]
    rows = [tuple([r["layer"]] + [r[k] for k in cols]) for r in res["layers"]]
    rows.append(tuple(["total"] + [totals[k] for k in cols]))
    lines.append(common.table(rows, ["layer"] + [c[:-3] + " ms" for c in cols]))
    if "ratio_vs_cudnn_fp32" in res:
        lines.append(f"ssmpi best ({res['ssmpi_best']}) / PyTorch "
                     f"{'cuDNN' if on_gpu else 'CPU'} fp32, best layout: "
                     f"{res['ratio_vs_cudnn_fp32']:.2f}x (target <= 1.5x: "
                     f"{'met' if res['target_1_5x'] else 'NOT met'})")
    res["text"] = "\n".join(lines)
    return res


def common_gflop(n, h, cin, cout):
    return 2.0 * n * h * h * 9 * cin * cout / 1e9


# -- frames/s -------------------------------------------------------------------------------
def fps(a) -> dict:
    model = {"name": "vgg8", "num_classes": 51, "width": a.width, "resolution": a.res}
    spec = {"algo": "engine", "mode": "skip", "model": model, "batch": a.batch, "T": a.T,
            "iters": a.iters, "warmup": 1, "stream": True, "update_every": a.T,
            "wait_mode": a.wait_mode, "device": a.device,
            "optimizer": {"name": "sgd", "lr": 1e-3, "momentum": 0.9}}
    if a.trace:
        spec.update(trace=str(a.trace), trace_title=f"Skip-Sideways VGG8 {a.res}x{a.res} "
                    f"batch {a.batch}, {a.ranks} ranks, {a.device}")
    t0 = time.perf_counter()
    r = common.run_worker(a.ranks, spec, timeout=a.timeout)
    it = r["iter_median_s"]
    per = r["per_rank"]
    res = {"device": a.device, "ranks": a.ranks, "batch": a.batch, "T": a.T, "res": a.res,
           "width": a.width, "wait_mode": a.wait_mode, "iter_s": r["iter_s"],
           "frames_per_s": a.batch * a.T / it, "steps_per_s": a.T / it,
           "compute_share": [p["compute_s"] / p["iter_s"] for p in per],
           "wait_share": [p["wait_s"] / p["iter_s"] for p in per],
           "wall_s": time.perf_counter() - t0}
    if a.trace and Path(a.trace).is_file():
        ev = json.loads(Path(a.trace).read_text())["traceEvents"]
        cats = {}
        for e in ev:
            if e.get("ph") == "X":
                cats[e["cat"]] = cats.get(e["cat"], 0.0) + e["dur"] / 1e6
        res["trace_seconds_by_category"] = cats
        res["trace"] = r.get("trace")
    res["text"] = (f"Skip-Sideways VGG8 {a.res}x{a.res} width {a.width}, batch {a.batch}, "
                   f"{a.ranks} ranks ({a.device}, wait {a.wait_mode}): "
                   f"{res['frames_per_s']:.1f} frames/s ({res['steps_per_s']:.1f} steps/s); "
                   f"wait share per rank {[round(x, 2) for x in res['wait_share']]}")
    return res


# -- losses ---------------------------------------------------------------------------------
def _losses(path) -> list:
    rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    return [(x["iteration"], x["loss"]) for x in rows if "iteration" in x and "loss" in x]


def losses(a) -> dict:
    la, lb = dict(_losses(a.a)), dict(_losses(a.b))
    its = sorted(set(la) & set(lb))[:a.n]
    rel = [abs(la[i] - lb[i]) / max(abs(lb[i]), 1e-30) for i in its]
    worst = max(rel) if rel else float("nan")
    res = {"a": str(a.a), "b": str(a.b), "iterations_compared": len(its), "rtol": a.rtol,
           "max_rel_diff": worst, "agree": bool(rel) and worst <= a.rtol and len(its) == a.n,
           "per_iteration": [(i, la[i], lb[i], r) for i, r in zip(its, rel)],
           "first_over": next((i for i, r in zip(its, rel) if r > a.rtol), None),
           "final": {"a": la.get(max(la)) if la else None, "b": lb.get(max(lb)) if lb else None}}
    res["text"] = (f"losses {a.a} vs {a.b}: {len(its)} iterations, max relative difference "
                   f"{worst:.2e} (tolerance {a.rtol:g}: "
                   f"{'agree' if res['agree'] else 'DO NOT agree'}"
                   + (f", first over it at iteration {res['first_over']}"
                      if res["first_over"] else "") + ")")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("conv")
    c.add_argument("--device", default="gpu")
    c.add_argument("--batch", type=int, default=8)
    c.add_argument("--width", type=float, default=1.0)
    c.add_argument("--res", type=int, default=112)
    c.add_argument("--repeat", type=int, default=10)
    f = sub.add_parser("fps")
    f.add_argument("--device", default="gpu")
    f.add_argument("--ranks", type=int, default=8)
    f.add_argument("--batch", type=int, default=1)
    f.add_argument("--T", type=int, default=16)
    f.add_argument("--iters", type=int, default=3)
    f.add_argument("--width", type=float, default=1.0)
    f.add_argument("--res", type=int, default=112)
    f.add_argument("--wait-mode", default="poll")
    f.add_argument("--trace", default=None)
    f.add_argument("--timeout", type=float, default=300)
    lo = sub.add_parser("losses")
    lo.add_argument("a")
    lo.add_argument("b")
    lo.add_argument("--n", type=int, default=50)
    lo.add_argument("--rtol", type=float, default=1e-4)
    for p in (c, f, lo):
        p.add_argument("--out", default=None, help="JSON result")
    a = ap.parse_args(argv)
    res = {"conv": conv, "fps": fps, "losses": losses}[a.what](a)
    print(res["text"], flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
