"""The GPU code paths under mpiexec, on the device-array double (ssmpi.backend_double).

Run as ``mpiexec -n N python -m mpi4py -m pytest --with-mpi -m mpi tests`` (N = 2, 4). On
the double a device array handed to MPI raises, and a host <-> device copy is done only at a
synchronisation: the staging of every message and of the gradient all-reduce must be right
for these runs to give the serial executor's NumPy numbers bitwise. Every collective ends
before an assert (the verdict is broadcast).
"""

import numpy as np
import pytest
from engine_helpers import gpipe_parameters, make_engine
from mpi4py import MPI

from ssmpi import backend
from ssmpi import backend_double as dd
from ssmpi.engine.reducer import GradientReducer
from ssmpi.engine.transport import Comm

WORLD = MPI.COMM_WORLD


def _train(device, comm, mode, fuse, L, stream, replicas, iters=2):
    xp = backend.select(device)
    try:
        eng = make_engine(comm, L=L, mode=mode, fuse=fuse, replicas=replicas, update_every=3,
                          optimizer=dict(name="adam", lr=1e-2), xp=xp)
        T, losses, t = 2 * L + 2, [], 0
        if stream:
            eng.start_stream()
        for it in range(iters):
            rng = np.random.default_rng([it, eng.replica])
            fr = rng.standard_normal((2, T, 8, 8, 3)).astype(np.float32)
            lab = rng.integers(0, 3, 2)
            if stream:
                for s in range(T):
                    t += 1
                    st = eng.stream_step(t, fr[:, s] if eng.is_bottom else None,
                                         lab if eng.is_top else None)
            else:
                st = eng.run_clip(T, fr if eng.is_bottom else None, lab if eng.is_top else None)
                losses += [float(v) for v in st.losses]
        if stream:
            losses = [float(v) for v in st.losses]
        top = eng.placement.rank_of(eng.topo.L, 0)
        losses = comm.bcast(losses if (eng.is_top and eng.replica == 0) else None, root=top)
        return eng.gather_parameters(), losses
    finally:
        backend.select("cpu")


def _compare(P, mode, fuse, L, stream, replicas=1):
    """The pipeline on P x replicas ranks on the double vs the serial executor (replicas
    ranks) on NumPy: (ok, why) on every rank."""
    need = P * replicas
    sub = WORLD.Split(0 if WORLD.rank < need else MPI.UNDEFINED, WORLD.rank)
    ref = WORLD.Split(0 if WORLD.rank < replicas else MPI.UNDEFINED, WORLD.rank)
    if ref != MPI.COMM_NULL:
        ser = _train("cpu", ref, mode, fuse, L, stream, replicas)
        ref.Free()
    if sub != MPI.COMM_NULL:
        par = _train("double", sub, mode, fuse, L, stream, replicas)
        sub.Free()
    ok, why = True, ""
    if WORLD.rank == 0:
        for l in ser[0]:
            if not np.array_equal(ser[0][l], par[0][l]):
                ok, why = False, f"U{l} parameters differ"
                break
        if ok and (ser[1] != par[1] or not ser[1]):
            ok, why = False, f"losses differ: {ser[1][:3]} vs {par[1][:3]}"
    return WORLD.bcast((ok, why), root=0)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode,fuse,stream", [("skip", "concat", False), ("skip", "add", True),
                                              ("sideways", "concat", False)],
                         ids=["skip-reset", "skip-add-stream", "sideways"])
def test_pipeline_on_double_equals_serial_numpy(mode, fuse, stream):
    ok, why = _compare(2, mode, fuse, 4, stream)
    assert ok, why


@pytest.mark.mpi(min_size=4)
@pytest.mark.timeout(300)
@pytest.mark.parametrize("P,L", [(4, 4), (2, 3)])
def test_one_unit_per_rank_and_groups_on_double(P, L):
    ok, why = _compare(P, "skip", "concat", L, False)
    assert ok, why


@pytest.mark.mpi(min_size=4)
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stream", [False, True], ids=["reset", "stream"])
def test_replicas_on_double_equal_serial_numpy(stream):
    """2 replicas x 2 ranks: staged messages and the staged gradient all-reduce."""
    ok, why = _compare(2, "skip", "concat", 4, stream, replicas=2)
    assert ok, why


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(300)
def test_gpipe_on_double_equals_numpy():
    res = gpipe_parameters(WORLD, backend.select, ("cpu", "double"))
    ok = True
    if WORLD.rank == 0:
        ok = all(np.array_equal(res["cpu"][l], res["double"][l]) for l in res["cpu"])
    assert WORLD.bcast(ok, root=0)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(300)
def test_staging_copies_and_synchronisations_per_step():
    """Efficiency, counted on the double (2 ranks, 2 units each): every remote message is one
    device -> host copy straight into its page-locked buffer (no second copy), queued; one
    synchronisation per outbox with remote messages, one per unit for its compute time, one
    per step for the received messages; never a blocking copy inside the step loop."""
    sub = WORLD.Split(0 if WORLD.rank < 2 else MPI.UNDEFINED, WORLD.rank)
    ok = True
    if sub != MPI.COMM_NULL:
        xp = backend.select("double")
        eng = make_engine(sub, L=4, mode="skip", xp=xp)
        tp = eng.transport
        T = 6
        fr = np.zeros((2, T, 8, 8, 3), np.float32)
        eng.start_stream()
        x = xp.asarray(fr[:, 0]) if eng.is_bottom else None
        lab = xp.asarray(np.zeros(2, np.int64)) if eng.is_top else None
        remote_out = [l for l in eng.local if any(
            ch.dst_rank != tp.rank and (ch.edge.src if ch.kind == "act" else ch.edge.dst) == l
            for ch in tp.send_ch.values())]
        n_send = sum(ch.dst_rank != tp.rank for ch in tp.send_ch.values())
        n_recv = sum(ch.src_rank != tp.rank for ch in tp.recv.values())
        dd.reset_counters()
        eng.step(1, x, lab)
        c = dict(dd.counters)
        expect_sync = len(remote_out) + len(eng.local) + (1 if n_recv else 0)
        ok = (c["d2h_async"] == n_send and c["h2d_async"] == n_recv and c["d2h"] == 0
              and (eng.is_top or c["sync"] == expect_sync))
        if not ok:
            print(f"rank {sub.rank}: counters {c}, expected {n_send} sends, {n_recv} "
                  f"receives, {expect_sync} synchronisations")
        backend.select("cpu")
        sub.Free()
    assert all(WORLD.allgather(ok))


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_allreduce_modes_on_double():
    """host: staged (one queued copy per unit each way, two synchronisations); cuda_aware:
    the device buffer goes to MPI (which refuses it here); nccl: a clear error off a GPU."""
    xp = backend.select("double")
    comm = Comm(WORLD)

    class U:
        def __init__(self, l, v):
            self.l, self.grad, self.count = l, xp.asarray(np.full(5, v, np.float32)), 1

        def mean_grad(self):
            pass

    red = GradientReducer(comm, mode="host")
    units = [U(1, WORLD.rank + 1.0), U(2, 2.0 * (WORLD.rank + 1))]
    dd.reset_counters()
    red.reduce(units)
    c = dict(dd.counters)
    s = WORLD.size * (WORLD.size + 1) / 2
    ok = (np.allclose(units[0].grad.get(), s / WORLD.size) and
          np.allclose(units[1].grad.get(), 2 * s / WORLD.size) and c["d2h_async"] == 2 and
          c["h2d_async"] == 2 and c["d2h"] == 0 and c["sync"] == 2)
    with pytest.raises(TypeError):
        GradientReducer(comm, mode="cuda_aware").reduce([U(1, 1.0)])
    with pytest.raises(backend.BackendError, match="needs CuPy on an NVIDIA GPU"):
        GradientReducer(comm, mode="nccl")
    backend.select("cpu")
    assert all(WORLD.allgather(ok)), c
