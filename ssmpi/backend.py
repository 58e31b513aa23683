"""Array backend: NumPy on the CPU, CuPy on an NVIDIA GPU.

This is the only module of ssmpi that imports ``cupy``. Everything else asks
``get_array_module(x)`` for the module that owns an array and writes its maths
once, for both.

Selection (``SSMPI_DEVICE`` or :func:`select`):

- ``auto`` (default): CuPy when it imports *and* sees at least one GPU, else NumPy;
- ``cpu``: NumPy, always;
- ``gpu``: CuPy, or a clear :class:`BackendError` when CuPy or a GPU is missing
  (never a silent fallback to the CPU);
- ``double``: the device-array double of :mod:`ssmpi.backend_double` (tests on a machine
  without a GPU: every GPU code path, with CUDA's rules about host buffers and copies).

``select("auto")`` (the config's default) follows ``SSMPI_DEVICE`` when it is set.

On a GPU each rank binds to the device of its node-local rank modulo the number
of visible devices (``bind_local_device``); the programs do it before ``MPI_Init``
(:mod:`ssmpi.program`), so that a CUDA-aware MPI opens its context on that device.

Copies between host and device (:func:`copy_to_host`, :func:`copy_to_device`) and the NCCL
all-reduce (:class:`NcclComm`) are here too, so that the transport and the reducer stay free
of CuPy.
"""

from __future__ import annotations

import os
from typing import Any

import numpy

__all__ = [
    "BackendError",
    "select",
    "xp",
    "is_gpu",
    "get_array_module",
    "asnumpy",
    "asarray",
    "synchronize",
    "pinned_empty",
    "is_device_array",
    "copy_to_host",
    "copy_to_device",
    "local_rank",
    "bind_local_device",
    "device_name",
    "on_device",
    "check_nccl",
    "nccl_unique_id",
    "NcclComm",
    "device_key",
]

DEVICE_CHOICES = ("auto", "cpu", "gpu", "double")


class BackendError(RuntimeError):
    """The requested device cannot be used here."""


_cupy = None  # the cupy module once imported and usable
_xp = None  # the selected array module
_device = None  # "cpu", "gpu" or "double"


def _try_cupy():
    """Import CuPy and count GPUs; return (module or None, reason)."""
    try:
        import cupy  # noqa: PLC0415 - the one import of cupy in ssmpi
    except Exception as e:  # ImportError, or a CUDA library error at import
        return None, f"cupy does not import ({type(e).__name__}: {e})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return None, f"cupy sees no CUDA runtime ({type(e).__name__}: {e})"
    if n < 1:
        return None, "cupy imports but sees no GPU"
    return cupy, ""


def select(device: str | None = None):
    """Choose the array module; returns it. ``device`` None or ``"auto"`` follows
    ``$SSMPI_DEVICE`` when it is set (else auto)."""
    global _cupy, _xp, _device
    device = resolve_device(device)
    if device == "cpu":
        _xp, _device = numpy, "cpu"
        return _xp
    if device == "double":
        from . import backend_double

        _cupy = _xp = backend_double
        _device = "double"
        return _xp
    cp, why = _try_cupy()
    if cp is None:
        if device == "gpu":
            raise BackendError(f"device 'gpu' requested but {why}; use SSMPI_DEVICE=cpu")
        _xp, _device = numpy, "cpu"
        return _xp
    _cupy, _xp, _device = cp, cp, "gpu"
    return _xp


def resolve_device(device: str | None = None) -> str:
    """The device a selection means: ``device``, or ``$SSMPI_DEVICE`` when ``device`` is None
    or ``"auto"``; one of :data:`DEVICE_CHOICES` or a :class:`BackendError`."""
    if device is None or str(device).lower() == "auto":
        device = os.environ.get("SSMPI_DEVICE", "auto") or "auto"
    device = str(device).lower()
    if device not in DEVICE_CHOICES:
        raise BackendError(
            f"SSMPI_DEVICE={device!r} is not one of {', '.join(DEVICE_CHOICES)}"
        )
    return device


def xp():
    """The selected array module (selects with the environment on first use)."""
    if _xp is None:
        select()
    return _xp


def is_gpu() -> bool:
    """True on a GPU (and on the device double, which stands in for one)."""
    xp()
    return _device in ("gpu", "double")


def on_device() -> bool:
    """Like :func:`is_gpu` but never selects: False before any selection (for timers)."""
    return _device in ("gpu", "double")


def get_array_module(*arrays: Any):
    """numpy or cupy, whichever owns the first array that is not None."""
    if _cupy is not None:
        for a in arrays:
            if a is not None and isinstance(a, _cupy.ndarray):
                return _cupy
    return numpy


def asnumpy(a):
    """A NumPy copy (or view) of ``a`` on the host."""
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return _cupy.asnumpy(a)
    return numpy.asarray(a)


def asarray(a, dtype=None):
    """``a`` on the selected device."""
    return xp().asarray(a, dtype=dtype)


def synchronize(a=None) -> None:
    """Wait for the device to finish work on ``a`` (a no-op for NumPy arrays).

    Call before MPI touches a device buffer: CuPy kernels are asynchronous.
    """
    if _cupy is None:
        return
    if a is not None and not isinstance(a, _cupy.ndarray):
        return
    _cupy.cuda.get_current_stream().synchronize()


def pinned_empty(shape, dtype):
    """A host array for staging device buffers to MPI (page-locked on a GPU, plain on CPU)."""
    dtype = numpy.dtype(dtype)
    if _cupy is None or not is_gpu():
        return numpy.empty(shape, dtype)
    n = int(numpy.prod(shape)) * dtype.itemsize
    mem = _cupy.cuda.alloc_pinned_memory(max(n, 1))
    return numpy.frombuffer(mem, dtype, int(numpy.prod(shape))).reshape(shape)


def is_device_array(a) -> bool:
    """True for an array that lives on a GPU (MPI can read it only if it is CUDA-aware)."""
    return _cupy is not None and isinstance(a, _cupy.ndarray)


def copy_to_host(src, out, blocking: bool = True) -> None:
    """Copy ``src`` into the host array ``out`` (one copy, straight into ``out``).

    ``blocking=True``: ``out`` is complete when this returns (the copy waits for the kernels
    that write ``src``). ``blocking=False``: the copy is queued on the current stream; ``out``
    is complete after :func:`synchronize` (several copies, one synchronisation)."""
    if is_device_array(src):
        if blocking:
            src.get(out=out)
            return
        try:
            src.get(out=out, blocking=False)
        except TypeError:  # CuPy < 13 has no blocking=: a blocking copy is still correct
            src.get(out=out)
    else:
        numpy.copyto(out, src)


def copy_to_device(src, out) -> None:
    """Copy the host array ``src`` into ``out`` (same shape). On a GPU the copy is
    *asynchronous* on the current stream: call :func:`synchronize` before ``src`` is
    written again (e.g. by the next receive into the same staging buffer)."""
    if is_device_array(out):
        out.set(src)
    else:
        numpy.copyto(out, src)


def local_rank() -> int:
    """Node-local rank from the launcher's environment (0 when unknown)."""
    for var in (
        "MPI_LOCALRANKID",  # MPICH / Hydra
        "OMPI_COMM_WORLD_LOCAL_RANK",  # Open MPI
        "SLURM_LOCALID",  # srun
        "MV2_COMM_WORLD_LOCAL_RANK",  # MVAPICH
        "PMI_LOCAL_RANK",
    ):
        v = os.environ.get(var)
        if v is not None and v.strip().isdigit():
            return int(v)
    return 0


def bind_local_device(rank: int | None = None) -> int | None:
    """Bind this process to GPU ``local_rank % n_gpus``; returns the device id or None on CPU."""
    if not is_gpu():
        return None
    n = _cupy.cuda.runtime.getDeviceCount()
    dev = (local_rank() if rank is None else rank) % n
    _cupy.cuda.Device(dev).use()
    return dev


def device_name() -> str:
    """A human-readable description of the selected device."""
    if not is_gpu():
        return "cpu (numpy)"
    if _device == "double":
        return "double (the device-array double of ssmpi.backend_double, on the CPU)"
    dev = _cupy.cuda.Device()
    try:
        props = _cupy.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    except Exception:
        name = "GPU"
    return f"gpu {dev.id} ({name}, cupy {_cupy.__version__})"


def device_key() -> str:
    """Which physical device this process uses ("cpu", or the GPU's PCI bus id)."""
    if _device == "gpu":
        dev = _cupy.cuda.Device()
        try:
            return str(dev.pci_bus_id)
        except Exception:
            return f"gpu {dev.id}"
    return str(_device or "cpu")


# -- NCCL (through CuPy) -------------------------------------------------------------------
def _nccl():
    """``cupy.cuda.nccl``, or a :class:`BackendError` saying why not."""
    if _device != "gpu":
        raise BackendError(f"engine.allreduce = 'nccl' needs CuPy on an NVIDIA GPU, but this "
                           f"rank runs on {device_name() if _xp is not None else 'the cpu'}; "
                           f"use 'host'")
    try:
        from cupy.cuda import nccl  # noqa: PLC0415
    except Exception as e:
        raise BackendError(f"engine.allreduce = 'nccl': CuPy has no NCCL here ({e}); install "
                           f"the NCCL wheel of your CUDA (nvidia-nccl-cu12 / -cu13) or use "
                           f"'host'") from None
    if not getattr(nccl, "available", True):
        raise BackendError("engine.allreduce = 'nccl': CuPy was built without NCCL; use 'host'")
    return nccl


def check_nccl() -> None:
    """Raise :class:`BackendError` (one line, why) unless NCCL can be used here."""
    _nccl()


def nccl_unique_id():
    """A new NCCL unique id (one rank makes it, every rank of the communicator receives it)."""
    return _nccl().get_unique_id()


class NcclComm:
    """An NCCL communicator of ``size`` ranks (every rank on its own GPU: NCCL refuses two
    ranks of one communicator on one device); collectives run on the current stream."""

    def __init__(self, size: int, uid, rank: int):
        self._nccl = _nccl()
        self._comm = self._nccl.NcclCommunicator(int(size), uid, int(rank))

    def allreduce_sum(self, arrays) -> None:
        """In-place sum over the ranks of each device array of ``arrays`` (one NCCL group).
        Queued on the current stream: later kernels see the result, the host must
        :func:`synchronize` before reading it."""
        nc = self._nccl
        codes = {numpy.dtype(numpy.float32): nc.NCCL_FLOAT32,
                 numpy.dtype(numpy.float64): nc.NCCL_FLOAT64}
        stream = _cupy.cuda.get_current_stream().ptr
        nc.groupStart()
        try:
            for a in arrays:
                if not a.flags.c_contiguous:
                    raise ValueError("NCCL all-reduce needs contiguous arrays")
                self._comm.allReduce(a.data.ptr, a.data.ptr, a.size, codes[a.dtype],
                                     nc.NCCL_SUM, stream)
        finally:
            nc.groupEnd()
