"""ssmpi.trace under mpiexec: dump gathers every rank's events into one timeline."""

import json

import numpy as np
import pytest
from engine_helpers import make_engine
from mpi4py import MPI

from ssmpi import backend
from ssmpi.trace import Tracer

backend.select("cpu")
WORLD = MPI.COMM_WORLD


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_dump_gathers_all_ranks(tmp_path_factory):
    L = max(2, min(WORLD.size, 4))
    P = min(WORLD.size, L)
    sub = WORLD.Split(0 if WORLD.rank < P else MPI.UNDEFINED, WORLD.rank)
    ok, why = True, ""
    if sub != MPI.COMM_NULL:
        tr = Tracer(rank=sub.rank, label=f"rank{sub.rank}")
        eng = make_engine(sub, L=L, tracer=tr)
        T = 2 * L
        fr = np.zeros((2, T, 8, 8, 3), np.float32)
        eng.run_clip(T, fr if eng.is_bottom else None,
                     np.zeros(2, np.int64) if eng.is_top else None)
        path = sub.bcast(str(tmp_path_factory.mktemp("trace") / "t.json")
                         if sub.rank == 0 else None, root=0)
        out = tr.dump(path, sub, png=False)
        if sub.rank == 0:
            ev = json.load(open(path))["traceEvents"]
            tids = {e["tid"] for e in ev if e["ph"] == "X" and e["cat"] == "compute"}
            if tids != set(range(P)):
                ok, why = False, f"compute events from ranks {tids}, want 0..{P - 1}"
            elif out["events"] != sum(1 for e in ev if e["ph"] == "X"):
                ok, why = False, "event count mismatch"
        else:
            ok = out is None
        sub.Free()
    ok, why = WORLD.bcast((ok, why) if WORLD.rank == 0 else None, root=0)
    assert ok, why
