"""Shared pieces of the benchmarks: BLAS report, mpiexec workers, tables, JSON results.

Every benchmark runs its measurements in fresh ``mpiexec -n N python benchmarks/common.py
worker SPEC`` subprocesses (one BLAS thread per rank: ``OMP_NUM_THREADS=1
OPENBLAS_NUM_THREADS=1``); the worker runs one algorithm as SPEC (JSON) says and writes one
JSON result from rank 0. Algorithms (``spec["algo"]``):

=============  =============================================================================
``engine``     Sideways / Skip-Sideways (``spec["mode"]``), reset mode clips or ``stream``
``gpipe``      :class:`ssmpi.baselines.GPipe`, same units on the same ranks
``framebp``    :class:`ssmpi.baselines.FrameBP` (per-frame 2D backprop, one rank)
``causal3d``   :class:`ssmpi.baselines.CausalBP` (``segment`` set: rematerialisation)
``realtime``   the engine in stream mode fed at ``fps`` (see bench_realtime.py)
=============  =============================================================================

Timing: each timed iteration starts after a polling barrier (ranks that wait yield the
core); its time is rank 0's wall time from the barrier to the end of its clip, and the
iteration ends with another polling barrier. Memory (``spec["memory"]``): ``tracemalloc``
peak of every rank over model construction and all iterations; the input clip is allocated
before tracing starts (it belongs to the data loader and is the same for every method).
NumPy reports its data allocations to tracemalloc, so the peak covers parameters,
optimizer state, message buffers, workspaces and activations.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))


# -- environment ---------------------------------------------------------------------------
def blas_description() -> str:
    """Which BLAS library, kernel (architecture) and thread count NumPy uses here."""
    from threadpoolctl import threadpool_info
    infos = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    if not infos:
        return "no BLAS found by threadpoolctl"
    return "; ".join(f"{i.get('internal_api')} {i.get('version')} kernel "
                     f"{i.get('architecture')} threads {i.get('num_threads')}" for i in infos)


def environment() -> dict:
    return {"blas": blas_description(), "numpy": np.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
            "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE"),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def worker_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


GEMM_LOOP = (
    "import numpy as np, time\n"
    "a = np.random.rand(1024, 1024).astype(np.float32)\n"
    "a @ a\n"
    "t = time.perf_counter()\n"
    "for _ in range(30):\n"
    "    a @ a\n"
    "print(time.perf_counter() - t)\n")


def machine_ceiling() -> float:
    """Throughput of 2 concurrent single-threaded GEMM processes / 1 process: what two
    ranks can gain at most on this machine (1.0 = the cores do not scale, 2.0 = ideal).
    The performance model uses it as the machine's effective core count."""
    env = worker_env()

    def run(k):
        ps = [subprocess.Popen([sys.executable, "-c", GEMM_LOOP], stdout=subprocess.PIPE,
                               text=True, env=env) for _ in range(k)]
        return max(float(p.communicate()[0]) for p in ps)

    one = min(run(1) for _ in range(2))
    two = min(run(2) for _ in range(2))
    return 2 * one / two


def run_worker(n: int, spec: dict, timeout: float = 900) -> dict:
    """Run ``spec`` on ``n`` ranks in a fresh ``mpiexec``; return rank 0's result dict."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.json"
        cmd = ["mpiexec", "-n", str(n), sys.executable, "-m", "mpi4py",
               str(Path(__file__).resolve()), "worker", json.dumps(spec), str(out)]
        p = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True,
                           timeout=timeout)
        if p.returncode != 0 or not out.exists():
            raise RuntimeError(f"worker failed (exit {p.returncode}): {' '.join(cmd)}\n"
                               f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        return json.loads(out.read_text())


def shape_args(ap, *, width: float, res: int, batch: int, iters: int):
    """The options of the VGG8 benchmarks' model and run shape: --width (channel multiplier),
    --res (frame size), --batch, --iters (timed iterations) and --out (the JSON's path)."""
    ap.add_argument("--width", type=float, default=width, help=f"VGG8 width (default {width})")
    ap.add_argument("--res", type=int, default=res, help=f"frame size (default {res})")
    ap.add_argument("--batch", type=int, default=batch, help=f"clips per batch (default {batch})")
    ap.add_argument("--iters", type=int, default=iters,
                    help=f"timed iterations (default {iters})")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/)")


def save(name: str, results: dict, path=None) -> Path:
    path = Path(path) if path else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    return path


def table(rows, headers) -> str:
    """A plain text table (list of row tuples)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(c):
    if isinstance(c, float):
        return f"{c:.3g}" if abs(c) < 100 else f"{c:.0f}"
    return str(c)


# -- the worker ----------------------------------------------------------------------------
def build_model(spec: dict):
    from ssmpi.nn import models
    m = spec.get("model", {"name": "vgg8"})
    kw = {k: v for k, v in m.items() if k != "name"}
    return models.get_model(m.get("name", "vgg8"), **kw)


def _poll_barrier(comm):
    from mpi4py import MPI
    req = comm.Ibarrier()
    sleep = 2e-5
    while not MPI.Request.Test(req):
        time.sleep(sleep)
        sleep = min(2 * sleep, 1e-3)


def worker(spec: dict, out_path: str):
    import tracemalloc

    from mpi4py import MPI

    from ssmpi import backend
    from ssmpi.engine.topology import Placement, Topology
    backend.select(spec.get("device", "cpu"))  # "gpu": benchmarks/gpu_check.sh
    backend.bind_local_device()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    algo = spec["algo"]
    N, T = spec.get("batch", 8), spec.get("T", 8)
    iters, warmup = spec.get("iters", 2), spec.get("warmup", 1)
    model = build_model(spec)
    H, W, C = model.in_shape
    rng = np.random.default_rng(0)
    frames = rng.standard_normal((N, T, H, W, C)).astype(np.float32)
    labels = rng.integers(0, max(model.num_classes, 1), N)
    tracer = None
    if spec.get("trace"):
        from ssmpi.trace import Tracer
        tracer = Tracer(rank, label=spec.get("trace_label", ""))
    if spec.get("memory"):
        tracemalloc.start()
    opt = spec.get("optimizer", {"name": "sgd", "lr": 1e-3, "momentum": 0.9})
    result = {"spec": spec, "ranks": size}
    per_rank = {}
    comp_by_unit = {}

    if algo in ("engine", "realtime"):
        from ssmpi.engine.executor import Engine
        topo = Topology(model, mode=spec.get("mode", "skip"), k=spec.get("k", 2),
                        fuse=spec.get("fuse", "concat"))
        pl = Placement(topo.L, size, groups=spec.get("groups"))
        eng = Engine(topo, pl, comm, batch=N, seed=0, optimizer=opt,
                     wait_mode=spec.get("wait_mode", "poll"), tracer=tracer,
                     update_every=spec.get("update_every", T))
        bottom, top = eng.is_bottom, eng.is_top
        if algo == "realtime":
            result.update(_realtime(eng, spec, frames, labels, comm))
            _finish(result, per_rank, comm, out_path, tracer, spec)
            return
        stream = spec.get("stream", False)

        def one(it):
            if stream:  # T steps of a montage stream (no reset), updates every T steps
                t0 = it * T
                st = eng.stats()  # cumulative since start_stream: return this iteration's part
                c0, w0 = dict(st.compute_s), st.wait_s
                for s in range(T):
                    st = eng.stream_step(t0 + s + 1, frames[:, s] if bottom else None,
                                         labels if top else None)
                return ({l: v - c0.get(l, 0.0) for l, v in st.compute_s.items()},
                        st.wait_s - w0)
            st = eng.run_clip(T, frames if bottom else None, labels if top else None)
            return st.compute_s, st.wait_s
        if stream:
            eng.start_stream()
    elif algo == "gpipe":
        from ssmpi.baselines import GPipe
        topo = Topology(model, mode="sideways")
        gp = GPipe(topo, Placement(topo.L, size), comm, batch=N, seed=0, optimizer=opt,
                   wait_mode=spec.get("wait_mode", "poll"), tracer=tracer)

        def one(it):
            st = gp.run_clip(T, frames if gp.prev is None else None,
                             labels if gp.next is None else None)
            return st.compute_s, st.wait_s
    elif algo == "framebp":
        from ssmpi.baselines import FrameBP
        fb = FrameBP(Topology(model, mode=spec.get("mode", "bp")), batch=N, optimizer=opt,
                     tracer=tracer)

        def one(it):
            fb.compute_s = {}
            fb.run_clip(T, frames, labels)
            return fb.compute_s, 0.0
    elif algo == "causal3d":
        from ssmpi.baselines import CausalBP, causal3d
        m = dict(spec.get("model", {"name": "vgg8"}))
        base = m.pop("name", "vgg8")
        cb = CausalBP(causal3d(base, kt=spec.get("kt", 3), **m), batch=N, optimizer=opt,
                      segment=spec.get("segment"))

        def one(it):
            t0 = time.perf_counter()
            cb.run_clip(T, frames, labels)
            return {1: time.perf_counter() - t0}, 0.0
    else:
        raise ValueError(f"unknown algo {algo!r}")

    times, wait_s, comp = [], 0.0, {}
    for it in range(warmup + iters):
        _poll_barrier(comm)
        if it == warmup and tracer is not None:
            tracer.clear()
        t0 = time.perf_counter()
        c, w = one(it)
        dt = time.perf_counter() - t0
        _poll_barrier(comm)
        if it >= warmup:
            times.append(dt)
            wait_s += w
            for l, v in c.items():
                comp[l] = comp.get(l, 0.0) + v
    comp_by_unit = {int(l): v / iters for l, v in comp.items()}
    per_rank = {"compute_s": sum(comp_by_unit.values()), "wait_s": wait_s / iters,
                "compute_by_unit": comp_by_unit, "iter_s": float(np.median(times))}
    result.update(iter_s=times, iter_median_s=float(np.median(times)),
                  iter_best_s=float(np.min(times)))
    _finish(result, per_rank, comm, out_path, tracer, spec)


def _finish(result, per_rank, comm, out_path, tracer, spec):
    import resource
    import tracemalloc
    if tracemalloc.is_tracing():
        per_rank["peak_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    per_rank["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    allr = comm.gather(per_rank, root=0)
    if tracer is not None and spec.get("trace"):
        info = tracer.dump(spec["trace"], comm, title=spec.get("trace_title", ""))
        if comm.Get_rank() == 0:
            result["trace"] = info
    if comm.Get_rank() == 0:
        result["per_rank"] = allr
        result["blas"] = blas_description()
        Path(out_path).write_text(json.dumps(result))


# -- real-time feeding ---------------------------------------------------------------------
def _realtime(eng, spec, frames, labels, comm):
    """Feed frames at ``fps`` in stream mode. Frame i arrives at t_start + i / fps. At every
    step the bottom rank takes the next frame: ``policy="drop"`` takes the newest arrived
    frame and drops older unprocessed ones, ``"queue"`` takes the oldest (a queue that
    grows when the pipeline is slower than the camera); either waits (sleeping) while no
    new frame has arrived. The top unit at step t works on the frame the bottom unit took at
    step t - L + 1 (the direct path, ALGORITHM.md); its latency is measured from that
    frame's arrival to the end of the top unit's step."""
    fps, steps, policy = spec.get("fps", 25.0), spec.get("steps", 100), spec.get("policy", "drop")
    L = eng.L
    bottom, top = eng.is_bottom, eng.is_top
    T = frames.shape[1]
    taken = []  # bottom: (step, frame index, arrival time)
    done = {}  # top: step -> end time of its compute
    eng.start_stream()
    _poll_barrier(comm)
    t_start = comm.bcast(time.perf_counter() + 0.05, root=0)
    nxt = 0
    dropped = 0
    for t in range(1, steps + 1):
        x = None
        if bottom:
            now = time.perf_counter()
            arrived = int((now - t_start) * fps)  # frames 0..arrived-1 are here
            if arrived <= nxt:  # wait for frame nxt
                time.sleep(max(0.0, t_start + nxt / fps + 1e-6 - now) + 1e-6)
                arrived = nxt + 1
            if policy == "drop":
                i = arrived - 1
                dropped += i - nxt
            else:
                i = nxt
            nxt = i + 1
            taken.append((t, i, t_start + i / fps, arrived - nxt))
            x = frames[:, i % T]
        eng.stream_step(t, x, labels if top else None)
        if top:
            done[t] = time.perf_counter()
    t_end = time.perf_counter()
    taken = comm.bcast(taken if bottom else None, root=eng.placement.rank_of(1))
    done = comm.bcast(done if top else None, root=eng.placement.rank_of(L))
    arrival = {s: a for s, _, a, _ in taken}
    lat = [done[t] - arrival[t - L + 1] for t in done if t - L + 1 in arrival]
    warm = lat[2 * L:] if len(lat) > 4 * L else lat
    queue = [q for *_, q in taken]
    last_frame = taken[-1][1] if taken else 0
    return {"fps_in": fps, "steps": steps, "policy": policy,
            "sustained_fps": steps / (t_end - t_start),
            "frames_arrived": int((t_end - t_start) * fps), "frames_taken": len(taken),
            "dropped": dropped,
            "queued_at_end": max(0, int((t_end - t_start) * fps) - 1 - last_frame),
            "queue_max": max(queue) if queue else 0,
            "latency_ms_median": 1e3 * float(np.median(warm)) if warm else None,
            "latency_ms_p90": 1e3 * float(np.percentile(warm, 90)) if warm else None,
            "step_ms": 1e3 * (t_end - t_start) / steps}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        worker(json.loads(sys.argv[2]), sys.argv[3])
    else:
        print(__doc__)
        print("BLAS:", blas_description())
