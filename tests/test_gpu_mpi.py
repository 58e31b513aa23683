"""GPU tests under mpiexec: staging, page-locked buffers, replicas, cuda_aware, NCCL, GPipe.

Run as ``mpiexec -n N python -m mpi4py -m pytest --with-mpi -m mpi tests/test_gpu_mpi.py``
with N = 2, 4 or 8; every rank binds GPU ``local rank % GPUs`` (8 ranks may share one GPU).
Skipped where CuPy sees no GPU. ``cuda_aware`` runs only with ``SSMPI_CUDA_AWARE=1`` (an MPI
that reads device memory; ``benchmarks/gpu_check.sh`` probes for it), NCCL only where the
ranks of a replica group are on different GPUs (NCCL refuses two ranks on one device).

The reference of a GPU pipeline is the serial executor on the same GPU (the same kernels on
the same shapes: equal within 1e-6, normally bitwise), and NumPy's serial run within 1e-4
(cuBLAS and OpenBLAS round differently).
"""

import os

import numpy as np
import pytest
from engine_helpers import cupy_or_none, gpipe_parameters, make_engine
from mpi4py import MPI

from ssmpi import backend
from ssmpi.engine.reducer import GradientReducer
from ssmpi.engine.topology import Placement
from ssmpi.engine.transport import Comm

WORLD = MPI.COMM_WORLD


CP = cupy_or_none()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(CP is None, reason="no CuPy/GPU here")]
CUDA_AWARE = os.environ.get("SSMPI_CUDA_AWARE", "") == "1"


def _use(device):
    xp = backend.select(device)
    backend.bind_local_device()
    return xp


def _train(device, comm, L, replicas=1, stream=False, cuda_aware=False, reducer_mode=None,
           iters=2):
    xp = _use(device)
    try:
        kw = {}
        if reducer_mode is not None:
            pl = Placement(L, comm.Get_size(), replicas=replicas)
            rank = comm.Get_rank()
            sub = Comm(comm).split(pl.position_of(rank), pl.replica_of(rank))
            kw["reducer"] = GradientReducer(sub, mode=reducer_mode)
        eng = make_engine(comm, L=L, mode="skip", replicas=replicas, update_every=3, xp=xp,
                          optimizer=dict(name="adam", lr=1e-2), cuda_aware=cuda_aware, **kw)
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
                losses = [float(v) for v in st.losses]
            else:
                st = eng.run_clip(T, fr if eng.is_bottom else None, lab if eng.is_top else None)
                losses += [float(v) for v in st.losses]
        top = eng.placement.rank_of(eng.topo.L, 0)
        losses = comm.bcast(losses if (eng.is_top and eng.replica == 0) else None, root=top)
        return eng.gather_parameters(), losses
    finally:
        backend.select("cpu")


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _compare(P, L, replicas=1, stream=False, **kw):
    """Pipeline on the GPU (P x replicas ranks) vs the serial executor on the GPU and on
    NumPy (replicas ranks each): (ok, why) on every rank."""
    need = P * replicas
    if WORLD.size < need:
        return True, ""
    sub = WORLD.Split(0 if WORLD.rank < need else MPI.UNDEFINED, WORLD.rank)
    ref = WORLD.Split(0 if WORLD.rank < replicas else MPI.UNDEFINED, WORLD.rank)
    if ref != MPI.COMM_NULL:
        ser_gpu = _train("gpu", ref, L, replicas, stream)
        ser_cpu = _train("cpu", ref, L, replicas, stream)
        ref.Free()
    if sub != MPI.COMM_NULL:
        par = _train("gpu", sub, L, replicas, stream, **kw)
        sub.Free()
    ok, why = True, ""
    if WORLD.rank == 0:
        for l in ser_gpu[0]:
            e_gpu, e_cpu = _rel(par[0][l], ser_gpu[0][l]), _rel(par[0][l], ser_cpu[0][l])
            if e_gpu > 1e-6 or e_cpu > 1e-4:
                ok, why = False, f"U{l}: rel. error {e_gpu:.2e} vs the GPU's serial run, " \
                    f"{e_cpu:.2e} vs NumPy's"
                break
        if ok and (not par[1] or _rel(par[1], ser_gpu[1]) > 1e-6):
            ok, why = False, f"losses {par[1][:3]} vs {ser_gpu[1][:3]}"
    return WORLD.bcast((ok, why), root=0)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(600)
@pytest.mark.parametrize("stream", [False, True], ids=["reset", "stream"])
def test_gpu_pipeline_one_unit_per_rank(stream):
    """The paper's setting: every message staged through page-locked host buffers."""
    ok, why = _compare(WORLD.size, WORLD.size, stream=stream)
    assert ok, why


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(600)
def test_gpu_pipeline_groups_of_units():
    ok, why = _compare(2, 5)
    assert ok, why


@pytest.mark.mpi(min_size=4)
@pytest.mark.timeout(600)
@pytest.mark.parametrize("stream", [False, True], ids=["reset", "stream"])
def test_gpu_replicas_host_allreduce(stream):
    """2 replicas: the gradient all-reduce staged through page-locked host buffers."""
    P = WORLD.size // 2
    ok, why = _compare(P, max(P, 2), replicas=2, stream=stream)
    assert ok, why


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(600)
@pytest.mark.skipif(not CUDA_AWARE, reason="SSMPI_CUDA_AWARE=1 not set (needs a CUDA-aware MPI)")
def test_gpu_cuda_aware():
    P = WORLD.size // 2 if WORLD.size >= 4 else WORLD.size
    R = 2 if WORLD.size >= 4 else 1
    ok, why = _compare(P, max(P, 2), replicas=R, cuda_aware=True)
    assert ok, why


@pytest.mark.mpi(min_size=4)
@pytest.mark.timeout(600)
def test_gpu_replicas_nccl():
    _use("gpu")
    keys = WORLD.allgather((MPI.Get_processor_name(), backend.device_key()))
    try:
        backend.check_nccl()
        have = True
    except backend.BackendError:
        have = False
    backend.select("cpu")
    P = WORLD.size // 2
    # replica groups: rank r and r + P (Placement puts replica 1 after replica 0)
    distinct = all(keys[r] != keys[r + P] for r in range(P))
    if not (all(WORLD.allgather(have)) and distinct):
        pytest.skip("NCCL needs CuPy's NCCL and one GPU per rank of a replica group")
    ok, why = _compare(P, max(P, 2), replicas=2, reducer_mode="nccl")
    assert ok, why


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(600)
def test_gpu_gpipe_staged():
    res = gpipe_parameters(WORLD, _use, ("cpu", "gpu"))
    ok = True
    if WORLD.rank == 0:
        ok = all(_rel(res["gpu"][l], res["cpu"][l]) < 1e-4 for l in res["cpu"])
    assert WORLD.bcast(ok, root=0)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_each_rank_binds_its_local_gpu():
    _use("gpu")
    n = CP.cuda.runtime.getDeviceCount()
    dev = CP.cuda.Device().id
    backend.select("cpu")
    assert dev == backend.local_rank() % n
