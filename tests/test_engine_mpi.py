"""Placement independence under mpiexec (ALGORITHM.md invariant 1).

Run as ``mpiexec -n N python -m mpi4py -m pytest --with-mpi -m mpi tests``. Every rank
rebuilds the serial executor (all units on one rank, no MPI messages) and compares it with
the pipelined run on P ranks (one unit each, or contiguous groups when L > P): losses and
parameters after several updates must be bitwise equal. All communication finishes before
any assert: the verdict is broadcast, then asserted on every rank.
"""

import numpy as np
import pytest
from engine_helpers import make_engine, small_spec
from mpi4py import MPI

from ssmpi import backend
from ssmpi.nn import models

backend.select("cpu")
WORLD = MPI.COMM_WORLD


def _train(comm, mode, fuse, L, stream, replicas=1, iters=3, seed=3, groups=None,
           input_unit=False):
    spec = models.with_input_unit(small_spec(L - 1)) if input_unit else None
    eng = make_engine(comm, L=L, mode=mode, fuse=fuse, replicas=replicas, update_every=3,
                      seed=seed, optimizer=dict(name="adam", lr=1e-2), spec=spec,
                      groups=groups if comm.Get_size() > replicas else None)
    T = 2 * L + 2
    losses = []
    if stream:
        eng.start_stream()
    t = 0
    for it in range(iters):
        rng = np.random.default_rng([it, eng.replica])  # replicas see different data
        fr = rng.standard_normal((2, T, 8, 8, 3)).astype(np.float32)
        lab = rng.integers(0, 3, 2)
        if stream:
            for s in range(T):
                t += 1
                st = eng.stream_step(t, fr[:, s] if eng.is_bottom else None,
                                     lab if eng.is_top else None)
        else:
            st = eng.run_clip(T, fr if eng.is_bottom else None, lab if eng.is_top else None)
            losses += st.losses
    if stream:
        losses = list(st.losses)
    top = eng.placement.rank_of(eng.topo.L, 0)
    losses = comm.bcast(losses if (eng.is_top and eng.replica == 0) else None, root=top)
    return eng.gather_parameters(), losses


def _compare(P, mode, fuse, L, stream, replicas=1, groups=None, input_unit=False):
    """Pipelined on P*replicas ranks vs the serial executor with the same replicas."""
    need = P * replicas
    ok, why = True, ""
    if WORLD.size < need:
        return None
    sub = WORLD.Split(0 if WORLD.rank < need else MPI.UNDEFINED, WORLD.rank)
    ref = WORLD.Split(0 if WORLD.rank < replicas else MPI.UNDEFINED, WORLD.rank)
    if ref != MPI.COMM_NULL:
        ser = _train(ref, mode, fuse, L, stream, replicas, input_unit=input_unit)
        ref.Free()
    if sub != MPI.COMM_NULL:
        par = _train(sub, mode, fuse, L, stream, replicas, groups=groups,
                     input_unit=input_unit)
        sub.Free()
    if WORLD.rank == 0:
        for l in ser[0]:
            if not np.array_equal(ser[0][l], par[0][l]):
                ok, why = False, f"U{l} parameters differ: max |d| = " \
                    f"{np.abs(ser[0][l] - par[0][l]).max():.3e}"
                break
        if ok and ser[1] != par[1]:
            ok, why = False, f"losses differ: {ser[1][:4]} vs {par[1][:4]}"
        if ok and len(ser[1]) == 0:
            ok, why = False, "no loss was computed"
    return WORLD.bcast((ok, why), root=0)


CASES = [("sideways", "concat"), ("skip", "concat"), ("skip", "add"), ("fa-skip", "concat")]


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stream", [False, True], ids=["reset", "stream"])
@pytest.mark.parametrize("mode,fuse", CASES)
@pytest.mark.parametrize("L", [2, 3, 4, 8])
def test_placement_independence(L, mode, fuse, stream):
    P = min(L, WORLD.size)
    res = _compare(P, mode, fuse, L, stream)
    assert res is not None
    ok, why = res
    assert ok, f"L={L} on {P} ranks, {mode}/{fuse}: {why}"


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(300)
@pytest.mark.parametrize("L", [3, 8])
def test_grouped_placement_on_two_ranks(L):
    """Fewer ranks than units: contiguous groups of units per rank."""
    ok, why = _compare(2, "skip", "concat", L, False)
    assert ok, why


@pytest.mark.mpi(min_size=4)
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stream", [False, True], ids=["reset", "stream"])
def test_replicas_times_depth(stream):
    """2 replicas x 2 ranks (4 ranks) equals 2 replicas of the serial executor (2 ranks):
    the gradient allreduce between ranks that own the same units is placement-independent."""
    ok, why = _compare(2, "skip", "concat", 4, stream, replicas=2)
    assert ok, why


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stream", [False, True], ids=["reset", "stream"])
@pytest.mark.parametrize("groups", [[[1, 3], [2, 4]], [[1, 4], [2, 3]], [[1], [2, 3, 4]]])
def test_non_contiguous_placement(groups, stream):
    """Cost-balanced placements put non-neighbouring units on a rank: same results."""
    ok, why = _compare(2, "skip", "concat", 4, stream, groups=groups)
    assert ok, why


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stream", [False, True], ids=["reset", "stream"])
def test_input_unit_placement_independence(stream):
    """The parameter-free input unit and its frame shortcut U1 -> U3 over MPI."""
    P = min(4, WORLD.size)
    ok, why = _compare(P, "skip", "concat", 4, stream, input_unit=True)
    assert ok, why
