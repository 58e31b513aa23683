"""GPipe under mpiexec: exact gradients (the per-frame backprop gradient averaged over the
clip, computed serially on every rank) and identical training.

Run as ``mpiexec -n N python -m mpi4py -m pytest --with-mpi -m mpi tests/test_baselines_mpi.py``
(N = 2, 4). All communication finishes before any assert: the verdict is broadcast.
"""

import numpy as np
import pytest
from engine_helpers import rel_err, small_spec
from mpi4py import MPI

from ssmpi import backend
from ssmpi.baselines import FrameBP, GPipe
from ssmpi.engine.topology import Placement, Topology

backend.select("cpu")
WORLD = MPI.COMM_WORLD


def _data(T, it):
    rng = np.random.default_rng([11, it])
    return rng.standard_normal((2, T, 8, 8, 3)), rng.integers(0, 3, 2)


def _verdict(check):
    ok, why = (check() if WORLD.rank == 0 else (True, ""))
    return WORLD.bcast((ok, why), root=0)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("wait_mode", ["poll", "block"])
@pytest.mark.parametrize("L", [4, 5])
def test_gpipe_gradient_equals_serial_backprop(L, wait_mode):
    P = min(WORLD.size, L)
    sub = WORLD.Split(0 if WORLD.rank < P else MPI.UNDEFINED, WORLD.rank)
    topo = Topology(small_spec(L), mode="sideways")
    T = 6
    fr, lab = _data(T, 0)
    grads = None
    if sub != MPI.COMM_NULL:
        gp = GPipe(topo, Placement(topo.L, P), sub, batch=2, seed=4, dtype=np.float64,
                   wait_mode=wait_mode)
        gp.run_clip(T, fr if gp.prev is None else None, lab if gp.next is None else None,
                    update=False)
        grads = gp.gather_gradients()
        sub.Free()
    ref = FrameBP(topo, batch=2, seed=4, dtype=np.float64)
    ref.run_clip(T, fr, lab, update=False)
    want = ref.gradients()

    def check():
        for l in range(1, topo.L + 1):
            e = rel_err(grads[l], want[l])
            if not e < 1e-12:
                return False, f"U{l}: relative error {e:.3e}"
        return True, ""

    ok, why = _verdict(check)
    assert ok, why


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_gpipe_training_equals_serial_training():
    """Three Adam updates on all ranks: parameters and losses equal FrameBP's (float64)."""
    topo = Topology(small_spec(4), mode="sideways")
    P = min(WORLD.size, topo.L)
    sub = WORLD.Split(0 if WORLD.rank < P else MPI.UNDEFINED, WORLD.rank)
    opt = dict(name="adam", lr=1e-2)
    T = 5
    params, losses = None, []
    if sub != MPI.COMM_NULL:
        gp = GPipe(topo, Placement(topo.L, P), sub, batch=2, seed=1, dtype=np.float64,
                   optimizer=opt)
        for it in range(3):
            fr, lab = _data(T, it)
            st = gp.run_clip(T, fr if gp.prev is None else None,
                             lab if gp.next is None else None)
            losses += st.losses
        params = gp.gather_parameters()
        losses = sub.bcast(losses, root=P - 1)
        sub.Free()
    ref = FrameBP(topo, batch=2, seed=1, dtype=np.float64, optimizer=opt)
    rl = []
    for it in range(3):
        fr, lab = _data(T, it)
        rl += ref.run_clip(T, fr, lab)
    want = ref.parameters()

    def check():
        if not np.allclose(losses, rl, rtol=1e-12, atol=0):
            return False, f"losses differ: {losses[:3]} vs {rl[:3]}"
        for l in want:
            e = rel_err(params[l], want[l])
            if not e < 1e-12:
                return False, f"U{l} parameters: relative error {e:.3e}"
        return True, ""

    ok, why = _verdict(check)
    assert ok, why
