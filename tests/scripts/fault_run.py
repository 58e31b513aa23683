"""A short pipelined run that fails on purpose: ``raise`` or ``hang`` on one rank.

    mpiexec -n 4 python tests/scripts/fault_run.py --fail raise --rank 2 --step 5
"""

import argparse
import time

import numpy as np
from mpi4py import MPI

from ssmpi import backend, failure
from ssmpi.engine.executor import Engine
from ssmpi.engine.topology import Placement, Topology
from ssmpi.nn import models

ap = argparse.ArgumentParser()
ap.add_argument("--fail", choices=["raise", "hang", "none"], default="raise")
ap.add_argument("--rank", type=int, default=1)
ap.add_argument("--step", type=int, default=5)
ap.add_argument("--watchdog", type=float, default=0.0)
a = ap.parse_args()

backend.select("cpu")
comm = MPI.COMM_WORLD
failure.install(comm)
topo = Topology(models.tiny(units=comm.size, width=4, resolution=8), mode="skip")
eng = Engine(topo, Placement(topo.L, comm.size), comm, batch=2, watchdog_s=a.watchdog)
orig = eng.step


def step(t, *args, **kw):
    if comm.rank == a.rank and t == a.step:
        if a.fail == "raise":
            raise RuntimeError(f"injected failure at step {t}")
        if a.fail == "hang":
            time.sleep(3600)
    return orig(t, *args, **kw)


eng.step = step
T = 12
rng = np.random.default_rng(0)
for it in range(3):
    fr = rng.standard_normal((2, T, 8, 8, 3)).astype(np.float32)
    eng.run_clip(T, fr if eng.is_bottom else None, np.array([0, 1]) if eng.is_top else None)
if comm.rank == 0:
    print("finished", flush=True)
