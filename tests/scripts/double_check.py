"""ssmpi's GPU code paths on the device-array double, under mpiexec: equal to NumPy or not?

    mpiexec -n 2 python -m mpi4py tests/scripts/double_check.py engine
    mpiexec -n 4 python -m mpi4py tests/scripts/double_check.py engine --replicas 2
    mpiexec -n 2 python -m mpi4py tests/scripts/double_check.py gpipe

``engine``: Skip-Sideways (L=4, T=10, Adam, 3 clips) pipelined on the world's ranks with
the double vs the serial executor on NumPy (``--replicas R``: R data-parallel replicas, so
the gradients are all-reduced); ``gpipe``: the GPipe baseline on the double vs the same on
NumPy. Rank 0 prints one line, ``double_check <what>: OK`` or ``... FAILED: why``, and the
exit code is 0 or 1; an exception on any rank aborts the job (``python -m mpi4py``).

Written against the import paths of every ssmpi version (``ssmpi.sideways``,
``ssmpi.topology``...), and the double is loaded from *this* checkout's file, so the script
also runs against older code (``PYTHONPATH=<old checkout>``): that is how
``tests/test_double.py`` shows that the double catches the GPU defects of issue 14 in the
code before the fix.
"""

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

from ssmpi import backend, models, topology  # the import paths of every version

W = MPI.COMM_WORLD
SPEC = lambda: models.tiny(num_classes=3, units=4, width=4, resolution=8)  # noqa: E731
DOUBLE_FILE = Path(__file__).resolve().parents[2] / "ssmpi" / "backend_double.py"


def use(device: str):
    """Select NumPy ("cpu") or the double, in this or an older ssmpi.backend."""
    if device == "cpu":
        return backend.select("cpu")
    if "double" in getattr(backend, "DEVICE_CHOICES", ()):
        return backend.select("double")
    spec = importlib.util.spec_from_file_location("ssmpi_device_double", DOUBLE_FILE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.install(backend)


def clips(replica: int, T: int, n: int = 3):
    for it in range(n):
        rng = np.random.default_rng([it, replica])  # replicas see different data
        yield (rng.standard_normal((2, T, 8, 8, 3)).astype(np.float32),
               rng.integers(0, 3, 2))


def engine_run(device: str, comm, replicas: int):
    from ssmpi.sideways import Engine

    xp = use(device)
    topo = topology.Topology(SPEC(), mode="skip", k=2)
    pl = topology.Placement(topo.L, comm.Get_size(), replicas=replicas)
    eng = Engine(topo, pl, comm, batch=2, seed=3, optimizer=dict(name="adam", lr=1e-2), xp=xp)
    T, losses = 10, []
    for fr, lab in clips(eng.replica, T):
        st = eng.run_clip(T, fr if eng.is_bottom else None, lab if eng.is_top else None)
        losses += [float(v) for v in st.losses]
    return eng.gather_parameters(), losses


def gpipe_run(device: str, comm):
    from ssmpi.baselines.gpipe import GPipe

    xp = use(device)
    topo = topology.Topology(SPEC(), mode="sideways")
    pl = topology.Placement(topo.L, comm.Get_size())
    gp = GPipe(topo, pl, comm, batch=2, seed=3, optimizer=dict(name="adam", lr=1e-2), xp=xp)
    first, last = pl.rank_of(1) == comm.Get_rank(), pl.rank_of(topo.L) == comm.Get_rank()
    losses = []
    for fr, lab in clips(0, 6, 2):
        st = gp.run_clip(6, fr if first else None, lab if last else None)
        losses += [float(v) for v in st.losses]
    return gp.gather_parameters(), losses


def verdict(ref, got) -> str:
    """Empty when the parameters are bitwise equal, else why not (rank 0)."""
    for l in sorted(ref[0]):
        if not np.array_equal(ref[0][l], got[0][l]):
            d = np.abs(ref[0][l].astype(np.float64) - got[0][l]).max()
            return f"U{l} parameters differ from NumPy's (max |d| = {d:.3e})"
    return ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("engine", "gpipe"))
    ap.add_argument("--replicas", type=int, default=1)
    a = ap.parse_args()
    if a.what == "engine":
        ref_comm = W.Split(0 if W.rank < a.replicas else MPI.UNDEFINED, W.rank)
        ref = engine_run("cpu", ref_comm, a.replicas) if ref_comm != MPI.COMM_NULL else None
        got = engine_run("double", W, a.replicas)
    else:
        ref = gpipe_run("cpu", W)
        got = gpipe_run("double", W)
    if W.rank == 0:
        why = verdict(ref, got)
        name = f"{a.what}" + (f" --replicas {a.replicas}" if a.replicas > 1 else "")
        print(f"double_check {name} on {W.size} ranks: " + (f"FAILED: {why}" if why else
              "OK (bitwise equal to NumPy)"), flush=True)
        return 1 if why else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
