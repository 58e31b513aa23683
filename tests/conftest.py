"""Shared fixtures: the array module (NumPy always, the device-array double always, CuPy where
a GPU is present)."""

import os

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from engine_helpers import cupy_or_none  # noqa: E402

from ssmpi import backend  # noqa: E402

_CUPY = cupy_or_none()
XP_PARAMS = [pytest.param(np, id="numpy"), pytest.param("double", id="double")]
XP_PARAMS.append(
    pytest.param(_CUPY, id="cupy", marks=pytest.mark.gpu)
    if _CUPY is not None
    else pytest.param(None, id="cupy", marks=pytest.mark.skip(reason="no CuPy/GPU here"))
)


@pytest.fixture(params=XP_PARAMS)
def xp(request):
    """The array module under test: numpy, and cupy where a GPU is available."""
    mod = request.param
    if mod == "double":  # CuPy's rules on the CPU (ssmpi.backend_double)
        yield backend.select("double")
        backend.select("cpu")
    elif mod is not None and mod is not np:
        backend.select("gpu")
        yield mod
        backend.select("cpu")
    else:
        yield np


def to_numpy(a):
    return backend.asnumpy(a)
