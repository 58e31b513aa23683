import numpy as np
import pytest

from ssmpi import backend


def test_cpu_selection_is_numpy(monkeypatch):
    monkeypatch.setenv("SSMPI_DEVICE", "cpu")
    assert backend.select() is np
    assert not backend.is_gpu()
    assert backend.get_array_module(np.zeros(3)) is np
    backend.synchronize(np.zeros(3))  # no-op on numpy
    assert isinstance(backend.asnumpy(np.ones(2)), np.ndarray)


def test_bad_device_value_is_clear_error():
    with pytest.raises(backend.BackendError, match="not one of auto, cpu, gpu"):
        backend.select("tpu")


def test_gpu_request_without_gpu_is_error_not_fallback():
    try:
        import cupy  # noqa: F401
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception:
        n = 0
    if n:
        pytest.skip("a GPU is present here")
    with pytest.raises(backend.BackendError, match="device 'gpu' requested"):
        backend.select("gpu")
    backend.select("cpu")


def test_auto_picks_numpy_without_gpu():
    xp = backend.select("auto")
    if xp is np:
        assert backend.device_name().startswith("cpu")
    backend.select("cpu")


def test_local_rank_from_env(monkeypatch):
    for v in ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID",
              "MV2_COMM_WORLD_LOCAL_RANK", "PMI_LOCAL_RANK"):
        monkeypatch.delenv(v, raising=False)
    assert backend.local_rank() == 0
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert backend.local_rank() == 3
