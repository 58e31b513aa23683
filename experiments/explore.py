"""Serial (one process) Sideways / Skip-Sideways training on a synthetic motion dataset, for
quick exploration of regimes: the engine with every unit on this rank (placement does not
change the mathematics, ALGORITHM.md invariant 1).

    python experiments/explore.py /tmp/motion --mode skip --lr 1e-3 --iters 1500 --batch 16
    python experiments/explore.py /tmp/motion32 --arch jobs/archs/probe.toml --T 16 --lr 5e-4
"""

from __future__ import annotations

import study_common  # noqa: F401  isort: skip  (first: one BLAS thread, the repo on sys.path)

import argparse
import json
import time

import numpy as np
from mpi4py import MPI
from study_motion import evaluate  # clip accuracy on the test split

from ssmpi import data
from ssmpi.engine.bptt import BPTT
from ssmpi.engine.executor import Engine
from ssmpi.engine.topology import Placement, Topology
from ssmpi.nn import architecture, models


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("--mode", default="skip")
    p.add_argument("--fuse", default="concat")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--arch", default="", help="an architecture file (jobs/archs/*.toml) "
                   "instead of the tiny model")
    p.add_argument("--units", type=int, default=4)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--T", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    ds = data.open_dataset(a.root, "train")
    if a.arch:
        d = architecture.load_arch_file(a.arch)
        spec = models.custom(d["units"], ds.num_classes, resolution=ds.frame_shape[0],
                             name=d["name"])
    else:
        spec = models.tiny(ds.num_classes, units=a.units, width=a.width,
                           resolution=ds.frame_shape[0])
    opt = dict(name="adam", lr=a.lr, clip=a.clip, warmup=a.warmup)
    if a.mode == "bptt":
        eng = BPTT(Topology(spec, mode="skip", k=a.k, fuse=a.fuse), seed=a.seed, optimizer=opt)
    else:
        topo = Topology(spec, mode=a.mode, k=a.k, fuse=a.fuse)
        eng = Engine(topo, Placement(topo.L, 1), MPI.COMM_WORLD, batch=a.batch, seed=a.seed,
                     optimizer=opt)
    ld = data.ClipLoader(ds, batch_size=a.batch, clip_len=a.T, train=True, flip=False,
                         seed=a.seed)
    it, t0, hist, losses = 0, time.perf_counter(), [], []
    ep = 0
    while it < a.iters:
        for b in ld.epoch(ep):
            st = eng.run_clip(a.T, b.frames, b.labels)
            losses.append(st.loss)
            it += 1
            if it % a.eval_every == 0 or it == a.iters:
                acc = evaluate(eng, a.mode, a.root, a.T, a.batch)
                hist.append((it, round(acc, 3), round(float(np.mean(losses[-50:])), 3)))
                print(json.dumps(dict(it=it, acc=hist[-1][1], loss=hist[-1][2],
                                      s=round(time.perf_counter() - t0, 1))), flush=True)
            if it >= a.iters:
                break
        ep += 1
    ld.close()


if __name__ == "__main__":
    main()
