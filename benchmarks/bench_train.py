"""Does the training program add hidden overhead? Trainer vs the bare engine, same model.

Runs, one after the other, with the same model, batch, clip length and rank count:
  1. the bare engine: ``Engine.run_clip`` on in-memory random clips (no data reader, no
     metrics, no progress bar);
  2. the trainer: ``python -m ssmpi.train`` on a synthetic dataset of the same frame size,
     reading HDF5 shards through the prefetch thread, logging metrics every iteration.
Both report steady-state frames/s (median over iterations after a warm-up); the ratio
trainer / engine is the figure of merit (target >= 0.9).

    python benchmarks/bench_train.py                  # tiny model, 8 ranks (4 units x 2)
    python benchmarks/bench_train.py --model vgg8 --width 0.25 --res 112 --ranks 8 --units 8

Prints a table and writes benchmarks/results/train.json. One BLAS thread per rank.
The machine's OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are left as they are (both runs share
them, so the ratio is fair).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")

ENGINE_SCRIPT = r"""
import json, sys, time
import numpy as np
from mpi4py import MPI
from ssmpi import backend
from ssmpi.config import load_config
from ssmpi.train import build_model
from ssmpi.engine.topology import Topology, Placement
from ssmpi.engine.executor import Engine
backend.select("cpu")
cfg = load_config(None, sys.argv[2:])
comm = MPI.COMM_WORLD
res = int(sys.argv[1])
spec = build_model(cfg, 4, (res, res))
topo = Topology(spec, mode=cfg.engine.mode, k=cfg.engine.k, fuse=cfg.engine.fuse)
pl = Placement(topo.L, comm.size, replicas=cfg.engine.replicas)
eng = Engine(topo, pl, comm, batch=cfg.data.batch_size, seed=0,
             optimizer=dict(name="adam", lr=cfg.optim.lr))
T, N = cfg.data.clip_len, cfg.data.batch_size
rng = np.random.default_rng(pl.replica_of(comm.rank))
clip = rng.standard_normal((N, T, res, res, 3)).astype(np.float32)
labels = rng.integers(0, 4, N)
times = []
for it in range(cfg.run.iterations):
    t0 = time.perf_counter()
    eng.run_clip(T, clip if eng.is_bottom else None, labels if eng.is_top else None)
    times.append(time.perf_counter() - t0)
if comm.rank == 0:
    print(json.dumps(times))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--units", type=int, default=4)
    ap.add_argument("--width", type=float, default=16)
    ap.add_argument("--res", type=int, default=16)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--clip", type=int, default=16)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    a = ap.parse_args(argv)
    sets = [f"model.name={a.model}", f"model.units={a.units}", f"model.width={a.width}",
            f"engine.replicas={a.replicas}", f"data.batch_size={a.batch}",
            f"data.clip_len={a.clip}", f"run.iterations={a.iterations}", "engine.mode=skip",
            "run.progress=false", "data.flip=false"]
    frames_per_it = a.batch * a.clip * a.replicas
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "motion"
        subprocess.run([sys.executable, "-m", "data_prep.synthetic", "motion", str(data),
                        "--size", str(a.res), "--frames", str(a.clip), "--videos", "256",
                        "--test-videos", "16", "--shards", str(max(2, a.replicas)), "--quiet"],
                       check=True, env=ENV, cwd=ROOT)
        script = Path(tmp) / "engine_loop.py"
        script.write_text(ENGINE_SCRIPT)
        t0 = time.perf_counter()
        p = subprocess.run(["mpiexec", "-n", str(a.ranks), sys.executable, str(script),
                            str(a.res)] + sets, capture_output=True, text=True, env=ENV,
                           cwd=ROOT, check=True)
        engine_times = json.loads(p.stdout.strip().splitlines()[-1])
        t_engine = time.perf_counter() - t0
        args = sum((["--set", s] for s in sets), []) + [
            "--set", f"data.root={data}", "--set", f"run.out_dir={tmp}", "--set", "run.name=b",
            "--set", "run.eval_batches=1"]
        t0 = time.perf_counter()
        subprocess.run(["mpiexec", "-n", str(a.ranks), sys.executable, "-m", "ssmpi.train",
                        *args], capture_output=True, text=True, env=ENV, cwd=ROOT, check=True)
        t_train = time.perf_counter() - t0
        lines = [json.loads(x) for x in (Path(tmp) / "b" / "metrics.jsonl").read_text()
                 .splitlines()]
        train_times = [m["step_s"] for m in lines if "step_s" in m]
    e = statistics.median(engine_times[a.warmup:])
    t = statistics.median(train_times[a.warmup:])
    res = dict(model=a.model, units=a.units, width=a.width, res=a.res, ranks=a.ranks,
               replicas=a.replicas, batch=a.batch, clip=a.clip,
               engine_frames_per_s=frames_per_it / e, trainer_frames_per_s=frames_per_it / t,
               ratio=e / t, engine_wall_s=t_engine, trainer_wall_s=t_train)
    print(f"{'':<10} {'s/iteration':>12} {'frames/s':>10}")
    print(f"{'engine':<10} {e:>12.4f} {frames_per_it / e:>10.1f}")
    print(f"{'trainer':<10} {t:>12.4f} {frames_per_it / t:>10.1f}")
    print(f"trainer / engine throughput: {e / t:.3f} (target >= 0.9); "
          f"{a.ranks} ranks, {a.model} units={a.units} width={a.width} {a.res}x{a.res}, "
          f"batch {a.batch} x {a.clip} frames x {a.replicas} replicas")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
