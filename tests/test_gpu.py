"""GPU tests (one process): page-locked staging, copies, timers, dropout, conv, NCCL.

Skipped where CuPy sees no GPU; ``benchmarks/gpu_check.sh`` runs them on a GPU machine (and
the MPI ones, ``tests/test_gpu_mpi.py``, under mpiexec -n 2, 4 and 8 on one GPU).
"""

import numpy as np
import pytest
from engine_helpers import cupy_or_none

from ssmpi import backend
from ssmpi.nn import layers, ops
from ssmpi.trace import Tracer

CP = cupy_or_none()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(CP is None, reason="no CuPy/GPU here")]


@pytest.fixture
def cp():
    backend.select("gpu")
    backend.bind_local_device()
    yield CP
    backend.select("cpu")


def test_pinned_buffers_are_page_locked(cp):
    buf = backend.pinned_empty((3, 4), np.float32)
    base = buf
    while isinstance(base, np.ndarray):
        base = base.base
    owner = getattr(base, "obj", base)  # numpy.frombuffer keeps a memoryview of the memory
    assert "Pinned" in type(owner).__name__, type(owner)


def test_copies_complete_at_synchronize(cp):
    d = cp.arange(12, dtype=cp.float32).reshape(3, 4)
    h = backend.pinned_empty((3, 4), np.float32)
    backend.copy_to_host(d * 2, h, blocking=False)
    backend.synchronize()
    assert np.array_equal(h, np.arange(12, dtype=np.float32).reshape(3, 4) * 2)
    out = cp.zeros((3, 4), cp.float32)
    backend.copy_to_device(h, out)
    backend.synchronize(out)
    h[...] = -1  # reusing the host buffer after the synchronisation is safe
    assert np.array_equal(out.get(), np.arange(12, dtype=np.float32).reshape(3, 4) * 2)


def test_tracer_spans_time_the_kernels(cp):
    a = cp.ones((4096, 4096), cp.float32)
    (a @ a).sum().item()  # warm-up (cuBLAS handle, kernel compilation)
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    tr = Tracer(0)
    with tr.span("matmul"):
        start.record()
        for _ in range(4):
            a = a @ a * cp.float32(1e-4)
        stop.record()
    stop.synchronize()
    gpu_s = cp.cuda.get_elapsed_time(start, stop) / 1e3
    assert tr.events[0][3] >= 0.9 * gpu_s > 0


def test_dropout_mask_on_the_gpu_is_the_reference(cp):
    x = np.ones((8, 1000), np.float32)
    lay = layers.Dropout(0.5, seed=2)
    y, _ = lay.forward(cp.asarray(x))
    key = int(np.random.default_rng(2).integers(0, 2**64, dtype=np.uint64))
    keep = layers.device_uniform(np, x.shape, key) >= np.float32(0.5)
    assert np.array_equal(y.get(), keep * np.float32(2.0))


def test_conv_is_one_gemm_on_the_gpu(cp, monkeypatch):
    from ssmpi.nn.ops import conv

    monkeypatch.setattr(conv, "WINOGRAD", False)
    x = cp.ones((16, 32, 32, 8), cp.float32)
    _, res = ops.conv2d_fwd(x, cp.ones((3, 3, 8, 8), cp.float32), None, pad=1)
    assert res.plan.chunk == 16


def test_nccl_one_rank(cp):
    try:
        backend.check_nccl()
    except backend.BackendError as e:
        pytest.skip(str(e))
    comm = backend.NcclComm(1, backend.nccl_unique_id(), 0)
    a = cp.arange(6, dtype=cp.float32)
    comm.allreduce_sum([a])
    backend.synchronize()
    assert np.array_equal(a.get(), np.arange(6, dtype=np.float32))


def test_binding_follows_the_local_rank(cp, monkeypatch):
    n = cp.cuda.runtime.getDeviceCount()
    monkeypatch.setenv("MPI_LOCALRANKID", str(n + 1))
    assert backend.bind_local_device() == (n + 1) % n
    assert cp.cuda.Device().id == (n + 1) % n
    backend.bind_local_device(0)
