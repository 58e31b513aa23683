"""Conv throughput of ssmpi.ops on the VGG8 layers at 112x112, against PyTorch CPU.

Run (OpenBLAS picks its AVX-512 kernel only with the machine's overrides removed):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_ops.py

For every conv layer of VGG8 (batch 8, float32, NHWC, 3x3 pad 1; 2x2 max-pools between the
stages set the sizes) it times the forward, dx and dw of ssmpi.ops.conv2d (with a workspace
``ws``, as layers use it) and reports GFLOP/s; then the whole step: forward + dx + dw of all
convs, the first layer without dx. Each is measured with 1 and 2 BLAS threads (threadpoolctl)
and, where torch is installed, PyTorch's CPU convolution in the same run (NCHW, its default
layout; torch.set_num_threads). The BLAS library and kernel that ran are printed. A table goes
to stdout, JSON to benchmarks/results/ops.json.

dx of a layer is timed as (backward with dx) - (backward without dx); dw as the backward
without dx (dw + db). Per-layer times are the best of --repeat runs after one warm-up; the
whole steps of ssmpi.ops and PyTorch run in alternation, --repeat rounds, and both the best
and the median are reported (the machine may be shared: the best is the least disturbed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssmpi.nn.ops import conv, conv2d_bwd, conv2d_fwd  # noqa: E402

# VGG8 conv layers (name, H=W, Cin, Cout); a 2x2 max-pool precedes 56, 28, 14 and 7.
VGG8 = [
    ("conv1", 112, 3, 64),
    ("conv2", 56, 64, 128),
    ("conv3", 28, 128, 256),
    ("conv4", 28, 256, 256),
    ("conv5", 14, 256, 512),
    ("conv6", 14, 512, 512),
    ("conv7", 7, 512, 512),
]
BATCH = 8
K = 3


def gflop(h, cin, cout, n=BATCH):
    """One GEMM's worth of a 3x3 pad-1 conv: 2 * N*H*W * 9*Cin * Cout / 1e9."""
    return 2.0 * n * h * h * K * K * cin * cout / 1e9


def _once(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_time(fn, repeat):
    """Fastest of ``repeat`` runs after a warm-up (the least disturbed by other processes)."""
    fn()  # warm-up (allocates workspaces, faults pages in)
    return min(_once(fn) for _ in range(repeat))


def interleaved(fns, repeat):
    """Best and median time of each fn, run in alternation so that both see the same load."""
    for fn in fns:
        fn()
    ts = [[] for _ in fns]
    for _ in range(repeat):
        for t, fn in zip(ts, fns):
            t.append(_once(fn))
    return [(min(t), float(np.median(t))) for t in ts]


def make_layers(rng, n=BATCH):
    layers = []
    for name, h, cin, cout in VGG8:
        x = rng.standard_normal((n, h, h, cin)).astype(np.float32)
        w = (rng.standard_normal((K, K, cin, cout)) * np.sqrt(2.0 / (K * K * cin))).astype(
            np.float32)
        b = np.zeros(cout, np.float32)
        dy = rng.standard_normal((n, h, h, cout)).astype(np.float32)
        layers.append((name, h, cin, cout, x, w, b, dy))
    return layers


# ----------------------------------------------------------------------------- ssmpi.ops


def ours_layer(layer, repeat):
    name, h, cin, cout, x, w, b, dy = layer
    ws = {}
    holder = {}

    def fwd():
        holder["y"], holder["res"] = conv2d_fwd(x, w, b, pad=1, ws=ws)

    t_fwd = best_time(fwd, repeat)

    def bwd_dw():
        fwd_res = holder["res"]
        conv2d_bwd(fwd_res, dy, need_dx=False)

    def bwd_full():
        conv2d_bwd(holder["res"], dy, need_dx=True)

    (t_dw, _), (t_full, _) = interleaved([bwd_dw, bwd_full], repeat)
    return t_fwd, max(t_full - t_dw, 0.0), t_dw


def ours_step(layers):
    wss = [{} for _ in layers]

    def step():
        ress = []
        for (name, h, cin, cout, x, w, b, dy), ws in zip(layers, wss):
            ress.append(conv2d_fwd(x, w, b, pad=1, ws=ws)[1])
        for i in reversed(range(len(layers))):
            conv2d_bwd(ress[i], layers[i][7], need_dx=i > 0)

    return step


# ------------------------------------------------------------------------------- PyTorch


def torch_layer(torch, layer, repeat):
    name, h, cin, cout, x, w, b, dy = layer
    F = torch.nn.functional
    tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    tw = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))
    tb = torch.from_numpy(b)
    tdy = torch.from_numpy(np.ascontiguousarray(dy.transpose(0, 3, 1, 2)))
    cb = torch.ops.aten.convolution_backward

    def bwd(mask):
        return lambda: cb(tdy, tx, tw, [cout], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)

    with torch.no_grad():
        t_fwd = best_time(lambda: F.conv2d(tx, tw, tb, padding=1), repeat)
        (t_dw, _), (t_full, _) = interleaved([bwd([False, True, True]),
                                              bwd([True, True, True])], repeat)
    return t_fwd, max(t_full - t_dw, 0.0), t_dw


def torch_step(torch, layers):
    F = torch.nn.functional
    xs, ws_, bs, dys = [], [], [], []
    for i, (name, h, cin, cout, x, w, b, dy) in enumerate(layers):
        xs.append(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
                  .requires_grad_(i > 0))
        ws_.append(torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))
                   .requires_grad_(True))
        bs.append(torch.from_numpy(b.copy()).requires_grad_(True))
        dys.append(torch.from_numpy(np.ascontiguousarray(dy.transpose(0, 3, 1, 2))))

    def step():
        ys = [F.conv2d(x, w, b, padding=1) for x, w, b in zip(xs, ws_, bs)]
        torch.autograd.backward(ys, dys)
        for t in xs + ws_ + bs:
            t.grad = None

    return step


# ---------------------------------------------------------------------------------- main


def blas_description():
    infos = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    return [{k: i.get(k) for k in ("internal_api", "version", "architecture", "filepath")}
            for i in infos]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per figure")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-layers", action="store_true", help="only the whole step")
    ap.add_argument("--im2col", action="store_true",
                    help="force the im2col path everywhere (no Winograd for 3x3 stride 1)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" /
                                         "ops.json"))
    args = ap.parse_args(argv)
    if args.im2col:
        conv.WINOGRAD = False

    torch = None
    if not args.no_torch:
        try:
            import torch  # noqa: PLC0415 - optional, the benchmark's reference only
        except ImportError:
            torch = None

    blas = blas_description()
    env = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                          "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    print(f"numpy {np.__version__}, python {platform.python_version()}, "
          f"{os.cpu_count()} cpus, torch {getattr(torch, '__version__', 'absent')}")
    for b in blas:
        print(f"BLAS: {b['internal_api']} {b['version']}, kernel {b['architecture']} "
              f"({Path(b['filepath']).name})")
    print(f"env: {env}")
    if env["OPENBLAS_CORETYPE"]:
        print(f"NOTE: OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']} forces that kernel; run "
              "with `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE` for the native one.")

    layers = make_layers(np.random.default_rng(0))
    total_gf = sum(3 * gflop(h, cin, cout) for _, h, cin, cout, *_ in layers) \
        - gflop(*VGG8[0][1:])
    algo = "im2col" if not conv.WINOGRAD else (
        f"winograd F(2x2,3x3) where Cin >= {conv.WINOGRAD_MIN_CIN} and the size is even-ish, "
        "else im2col")
    print(f"conv algorithm: {algo}; GFLOP/s below count the direct convolution's flops "
          "(2*N*Ho*Wo*9*Cin*Cout), so Winograd layers show 'effective' rates")
    results = {"algo": algo, "blas": blas, "env": env, "batch": BATCH, "numpy": np.__version__,
               "torch": getattr(torch, "__version__", None), "step_gflop": total_gf, "runs": []}

    for nt in args.threads:
        run = {"threads": nt, "layers": []}
        with threadpool_limits(limits=nt, user_api="blas"):
            if torch is not None:
                torch.set_num_threads(nt)
            print(f"\n=== {nt} BLAS thread(s) ===")
            if not args.no_layers:
                hdr = (f"{'layer':7} {'HxW':>7} {'Cin':>4} {'Cout':>4} {'GFLOP':>6} | "
                       f"{'fwd':>13} {'dx':>13} {'dw':>13} | torch ms f/dx/dw   | ratio")
                print(hdr)
                print("-" * len(hdr))
                for layer in layers:
                    name, h, cin, cout = layer[:4]
                    gf = gflop(h, cin, cout)
                    ours = ours_layer(layer, args.repeat)
                    th = torch_layer(torch, layer, args.repeat) if torch is not None else None
                    cells = " ".join(f"{t * 1e3:6.1f}ms{gf / t if t else 0:4.0f}G"
                                     if t > 0 else f"{'-':>13}" for t in ours)
                    tcell, ratio = "", ""
                    if th is not None:
                        tcell = "/".join(f"{t * 1e3:.1f}" for t in th)
                        ratio = f"{sum(th) / sum(ours):.2f}x"
                    print(f"{name:7} {h:>3}x{h:<3} {cin:>4} {cout:>4} {gf:6.2f} | {cells} | "
                          f"{tcell:18} | {ratio}")
                    run["layers"].append({
                        "name": name, "hw": h, "cin": cin, "cout": cout, "gflop": gf,
                        "ours_s": dict(zip(("fwd", "dx", "dw"), ours)),
                        "torch_s": dict(zip(("fwd", "dx", "dw"), th)) if th else None})
            fns = [ours_step(layers)] + ([torch_step(torch, layers)] if torch else [])
            times = interleaved(fns, max(args.repeat, 3))
            (t_ours, t_ours_med) = times[0]
            run["step_ours_s"] = {"best": t_ours, "median": t_ours_med}
            line = (f"whole step ({total_gf:.1f} GFLOP, conv1 without dx), best (median) of "
                    f"{max(args.repeat, 3)}: ssmpi.ops {t_ours * 1e3:.0f} ms "
                    f"({t_ours_med * 1e3:.0f}), {total_gf / t_ours:.0f} GFLOP/s")
            if torch is not None:
                (t_torch, t_torch_med) = times[1]
                run["step_torch_s"] = {"best": t_torch, "median": t_torch_med}
                run["ratio_vs_torch"] = t_torch / t_ours
                line += (f"; PyTorch {t_torch * 1e3:.0f} ms ({t_torch_med * 1e3:.0f}), "
                         f"{total_gf / t_torch:.0f} GFLOP/s\n  -> ssmpi.ops at "
                         f"{t_torch / t_ours:.2f}x PyTorch's speed (medians: "
                         f"{t_torch_med / t_ours_med:.2f}x)")
            print(line)
        results["runs"].append(run)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
