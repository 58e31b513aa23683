"""The gradient reducer over replicas (ssmpi.engine.reducer), under mpiexec -n >= 2.

    mpiexec -n 2 python -m mpi4py -m pytest --with-mpi -m mpi tests/test_reducer_mpi.py

Every rank runs the same assertions after all communication has finished.
"""

import numpy as np
import pytest
from engine_helpers import make_engine
from mpi4py import MPI

from ssmpi import backend
from ssmpi.engine.reducer import GradientReducer
from ssmpi.engine.transport import Comm

backend.select("cpu")
WORLD = MPI.COMM_WORLD


def _pair():
    """A communicator of ranks 0 and 1 (None elsewhere)."""
    sub = WORLD.Split(0 if WORLD.rank < 2 else MPI.UNDEFINED, WORLD.rank)
    return None if sub == MPI.COMM_NULL else sub


class _U:  # what the reducer touches on a unit
    def __init__(self, l, grad, count):
        self.l, self.grad, self.count = l, np.array(grad, np.float64), count

    def mean_grad(self):
        if self.count > 1:
            self.grad /= self.count


@pytest.mark.mpi(min_size=2)
def test_mean_over_every_valid_step_of_every_replica():
    """Unequal counts: g = (S_0 + S_1) / (n_0 + n_1); a unit with no valid step on any
    replica takes no step; one replica's count 0 still gets the other's mean."""
    comm = _pair()
    if comm is None:
        return
    r = comm.rank
    S = {1: [[3.0, 6.0], [1.0, 1.0]], 2: [[0.0, 0.0], [0.0, 0.0]], 3: [[0.0, 0.0], [4.0, 8.0]]}
    n = {1: [3, 1], 2: [0, 0], 3: [0, 2]}
    units = [_U(l, S[l][r], n[l][r]) for l in (1, 2, 3)]
    steps = GradientReducer(Comm(comm)).reduce(units)
    assert steps == {1: True, 2: False, 3: True}
    np.testing.assert_allclose(units[0].grad, [4.0 / 4, 7.0 / 4], rtol=1e-15)
    np.testing.assert_allclose(units[2].grad, [2.0, 4.0], rtol=1e-15)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("stream", [False, True])
def test_two_replicas_on_the_same_data_equal_one(stream):
    """Replicas that see the same clips train exactly like one replica, in reset mode and in
    stream mode, where units fill the pipeline with zero valid steps at first (earlier,
    replicas made those units take an optimizer step with a zero gradient: Adam moved)."""
    comm = _pair()
    if comm is None:
        return
    L, T = 4, 6

    def train(c, replicas):
        eng = make_engine(c, L=L, replicas=replicas, update_every=2, seed=1,
                          optimizer=dict(name="adam", lr=1e-2))
        if stream:
            eng.start_stream()
        t = 0
        for it in range(3):
            rng = np.random.default_rng(it)  # the same data on both replicas
            fr = rng.standard_normal((2, T, 8, 8, 3)).astype(np.float32)
            lab = rng.integers(0, 3, 2)
            if stream:
                for s in range(T):
                    t += 1
                    eng.stream_step(t, fr[:, s], lab)
            else:
                eng.run_clip(T, fr, lab)
        return eng.parameters()

    two = train(comm, 2)
    one = train(MPI.COMM_SELF, 1)
    same = all(np.array_equal(two[l], one[l]) for l in one)
    assert comm.allreduce(int(same), op=MPI.MIN) == 1
    assert same


@pytest.mark.mpi(min_size=2)
def test_communicators_are_released():
    """Comm.free and Engine.close release the communicators they made: 2500 splits and
    watched duplicates in one process, beyond MPICH's ~2000 context ids, do not run out
    (before, every engine with replicas leaked its replica group's communicator)."""
    comm = _pair()
    if comm is None:
        return
    world = Comm(comm)
    for _ in range(2500):
        sub = world.split(0, comm.rank)
        sub.free()
        dup = comm.Dup()
        mine = Comm(dup)  # not predefined: it duplicates dup for its watch
        mine.free()
        dup.Free()
    assert sub.mpi == MPI.COMM_NULL and mine.watch.pcomm == MPI.COMM_NULL
    world.free()  # frees its watch's duplicate, never the communicator it was given
    assert comm != MPI.COMM_NULL
    with make_engine(Comm(comm), L=2, replicas=2) as eng:
        group = eng._split
        assert group.mpi != MPI.COMM_NULL
    assert group.mpi == MPI.COMM_NULL and eng.reducer.replicas == 2
    comm.Free()
