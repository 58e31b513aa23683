"""A device-array double: CuPy's interface, NumPy's arithmetic, a GPU's rules. For tests.

``SSMPI_DEVICE=double`` (or ``backend.select("double")``) puts this module where CuPy would
be: :mod:`ssmpi.backend` treats it as its ``cupy``, so every GPU code path of ssmpi (host
staging, page-locked buffers, stream synchronisation, device binding) runs on a machine
without a GPU, and breaks where it would break on one. It imports nothing from ssmpi, so a
test can also install it into an older ``ssmpi.backend`` (:func:`install`).

The rules it enforces (each a CUDA/CuPy rule that NumPy code never meets):

1. **A device array is not host memory.** :class:`ndarray` wraps a NumPy array but exposes
   neither the buffer protocol, nor ``__array__`` / ``__array_interface__`` / DLPack:
   mpi4py refuses it (``TypeError: message: expecting buffer or list/tuple``) where an MPI
   that is not CUDA-aware would crash or read garbage from a CuPy array;
   ``numpy.asarray(d)`` raises as in CuPy (use ``d.get()`` / ``asnumpy``); a host array in
   device maths (``d + h``, ``matmul(d, h)``) raises as in CuPy. ``asarray``/``array``
   copy host data to the device.
2. **Host <-> device copies complete at synchronisation points.**

   - ``d.set(h)`` (host -> device, asynchronous in CuPy when ``h`` is page-locked) is
     queued: the device array keeps its old value until the queue is flushed, and the host
     array is read only then. A flush happens at every synchronisation: ``Stream`` /
     ``Device.synchronize``, a blocking ``get``, ``asnumpy``, and every read of a device
     value by the host (``float(d)``, ``bool(d)``, ``d.item()``, ``repr``). Reusing the host
     buffer before synchronising (the next MPI receive into a staging buffer) copies the
     wrong data, or raises :class:`HazardError` when the flush sees that the source
     changed since the copy was queued. Reading the device array before synchronising gives
     its old value: stricter than CUDA, where later kernels on the same stream see the copy;
     on purpose, so that a missing synchronisation changes the numbers *every* time instead
     of once in a million runs. A source in pageable memory is read at once
     (``cudaMemcpyAsync`` stages pageable memory before it returns).
   - ``asarray(h)`` / ``array(h)``: the device array is usable at once (stream order); a
     page-locked ``h`` must not change before the next synchronisation (CuPy copies from it
     asynchronously; pageable memory it stages first): :class:`HazardError` at the flush.
   - ``d.get(out=h, blocking=False)`` (device -> host) leaves ``h`` unwritten until the next
     synchronisation (it copies what ``d`` held when queued, as stream order would);
     ``d.get(out=h)`` (blocking, CuPy's default) flushes the queue and writes ``h`` at once.
3. **Kernels** run at once (eagerly): the double does not model their asynchrony.

:data:`counters` counts copies and synchronisations (tests assert that a step does not copy
or synchronise more than it must). ``cuda.runtime.getDeviceCount()`` is
``$SSMPI_DOUBLE_DEVICES`` (default 1). There is no ``cuda.nccl``, no ``random`` and no
device pointer (``d.data``): code that needs them needs a real GPU.
"""

from __future__ import annotations

import os
import sys
import types
from typing import Any

import numpy as _np

__version__ = "double"

counters = {"h2d": 0, "h2d_async": 0, "d2h": 0, "d2h_async": 0, "sync": 0}


class HazardError(RuntimeError):
    """A host buffer changed while an asynchronous copy from it was still pending."""


def reset_counters():
    for k in counters:
        counters[k] = 0


# -- the stream: pending copies -------------------------------------------------------------
_queue: list = []  # ("h2d", dst ndarray, src host, snapshot | None) or ("d2h", dst host, data)


def _flush():
    """Run every pending copy (a synchronisation point)."""
    global _queue
    counters["sync"] += 1
    if not _queue:
        return
    pending, _queue = _queue, []
    hazard = None
    for op in pending:
        if op[0] == "verify":  # asarray() from page-locked memory read it asynchronously
            _, src, snap = op
            if hazard is None and src.tobytes() != snap.tobytes():
                hazard = (f"device double: the page-locked host array {src.shape} {src.dtype} "
                          f"given to asarray() was overwritten before the copy ran")
        elif op[0] == "h2d":
            _, dst, src, snap = op
            if snap is not None and hazard is None and src.tobytes() != snap.tobytes():
                hazard = (f"device double: the host buffer {src.shape} {src.dtype} of a pending "
                          f"host->device copy was overwritten before the copy ran (a staging "
                          f"buffer reused without synchronize())")
            dst._a[...] = src
        else:
            _, dst, data = op
            _np.copyto(dst, data)
    if hazard:
        raise HazardError(hazard)


class PinnedMemory(bytearray):
    """Page-locked host memory (``cuda.alloc_pinned_memory``): a buffer NumPy can view."""


def _is_pinned(a) -> bool:
    while isinstance(a, _np.ndarray):
        a = a.base
    if isinstance(a, memoryview):  # numpy.frombuffer(memory)
        a = a.obj
    return isinstance(a, PinnedMemory)


# -- wrapping -------------------------------------------------------------------------------
def _host_error(x) -> TypeError:
    return TypeError(f"Unsupported type {type(x)}: a host array in a device operation of the "
                     f"device double (shape {getattr(x, 'shape', '?')}); copy it with "
                     f"asarray() first, as CuPy requires")


def _unwrap(x, allow_host: bool = False):
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, _np.ndarray):
        if not allow_host:
            raise _host_error(x)
        return x
    if isinstance(x, (list, tuple)) and x and any(
            isinstance(v, (ndarray, _np.ndarray, list, tuple)) for v in x):
        return type(x)(_unwrap(v, allow_host) for v in x)
    return x


def _wrap(r):
    if isinstance(r, _np.ndarray):
        return ndarray(r)
    if isinstance(r, _np.generic):  # CuPy reductions give 0-d device arrays
        return ndarray(_np.asarray(r))
    if isinstance(r, tuple) and any(isinstance(v, _np.ndarray) for v in r):
        return tuple(_wrap(v) for v in r)
    if isinstance(r, list) and any(isinstance(v, _np.ndarray) for v in r):
        return [_wrap(v) for v in r]
    return r


def _call(fn, args, kwargs, allow_host: bool = False):
    out = kwargs.get("out")
    a = [_unwrap(v, allow_host) for v in args]
    kw = {k: _unwrap(v, allow_host) for k, v in kwargs.items()}
    r = fn(*a, **kw)
    if out is not None:  # keep the identity of the caller's out array
        outs = out if isinstance(out, tuple) else (out,)
        for o in outs:
            if isinstance(o, ndarray) and r is o._a:
                return o
    return _wrap(r)


_TRANSFER = {"asarray", "array", "asanyarray", "zeros_like", "empty_like", "ones_like",
             "full_like"}
_NO_HOST_READ = {"ctypes", "data", "tobytes", "tofile", "dump", "dumps", "getfield",
                 "setfield", "byteswap", "newbyteorder"}
_HOST_READS = {"item", "tolist"}


class ndarray:
    """A device array of the double: NumPy maths, no host buffer (see the module doc)."""

    __slots__ = ("_a",)
    __array_priority__ = 100.0
    __hash__ = None

    def __init__(self, a):
        if not isinstance(a, _np.ndarray):
            raise TypeError("double.ndarray wraps a numpy array; use double.asarray()")
        self._a = a

    # what numpy and MPI look for: refused
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed (device double); "
                        "use .get() or asnumpy()")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return _call(getattr(ufunc, method), inputs, kwargs)

    def __array_function__(self, func, types_, args, kwargs):
        return _call(func, args, kwargs, allow_host=func.__name__ in _TRANSFER)

    # metadata (no copy, no synchronisation)
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray(self._a.T))

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(v) for v in self._a)

    def __getattr__(self, name):
        if name.startswith("__") or name in _NO_HOST_READ:
            raise AttributeError(f"device double: ndarray has no {name!r} (device memory)")
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr)
        if name in _HOST_READS:
            def host_read(*args, **kw):
                _flush()
                return attr(*args, **kw)
            return host_read

        def method(*args, **kw):
            return _call(attr, args, kw)
        return method

    def __getitem__(self, key):
        return _wrap(self._a[_unwrap(key)])

    def __setitem__(self, key, value):
        # CuPy copies a host value into the device array (synchronously)
        self._a[_unwrap(key)] = _unwrap(value, allow_host=True)

    # the host reads a value: a synchronisation
    def _host_value(self):
        _flush()
        return self._a

    def __bool__(self):
        return bool(self._host_value())

    def __float__(self):
        return float(self._host_value())

    def __int__(self):
        return int(self._host_value())

    def __complex__(self):
        return complex(self._host_value())

    def __format__(self, spec):
        return format(self._host_value(), spec)

    def __repr__(self):
        return "double." + repr(self._host_value())

    __str__ = __repr__

    # copies between host and device
    def get(self, stream=None, order="C", out=None, blocking=True):
        """Device -> host. Blocking (the default): synchronises, then copies; with
        ``blocking=False`` ``out`` is written at the next synchronisation."""
        if out is not None:
            if not isinstance(out, _np.ndarray):
                raise TypeError(f"get(out=): out must be a numpy.ndarray, got {type(out)}")
            if out.shape != self.shape:
                raise ValueError(f"get(out=): shape mismatch {out.shape} != {self.shape}")
            if out.dtype != self.dtype:
                raise TypeError(f"get(out=): dtype mismatch {out.dtype} != {self.dtype}")
        if not blocking:
            if out is None:
                raise ValueError("get(blocking=False) needs out=")
            counters["d2h_async"] += 1
            _queue.append(("d2h", out, self._a.copy()))
            return out
        _flush()
        counters["d2h"] += 1
        if out is None:
            return _np.array(self._a, order=order, copy=True)
        _np.copyto(out, self._a)
        return out

    def set(self, arr, stream=None):
        """Host -> device, asynchronous: done at the next synchronisation."""
        if not isinstance(arr, _np.ndarray):
            raise TypeError(f"set(): a numpy.ndarray is required, got {type(arr)}")
        if arr.shape != self.shape:
            raise ValueError(f"set(): shape mismatch {arr.shape} != {self.shape}")
        if arr.dtype != self.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if not self._a.flags.c_contiguous:
            raise RuntimeError("set(): cannot set to a non-contiguous device array")
        counters["h2d_async"] += 1
        if _is_pinned(arr):  # read at the flush: the worst case of an asynchronous copy
            _queue.append(("h2d", self, arr, arr.copy()))
        else:  # pageable memory is staged before cudaMemcpyAsync returns
            _queue.append(("h2d", self, arr.copy(), None))


def _binop(name):
    op = getattr(_np.ndarray, name)

    def f(self, other):
        if isinstance(other, _np.ndarray):
            raise _host_error(other)
        r = op(self._a, other._a if isinstance(other, ndarray) else other)
        if r is NotImplemented:
            return r
        if name.startswith("__i"):
            return self
        return _wrap(r)
    f.__name__ = name
    return f


for _n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or",
           "xor", "lshift", "rshift"):
    for _p in ("__{}__", "__r{}__", "__i{}__"):
        setattr(ndarray, _p.format(_n), _binop(_p.format(_n)))
for _n in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(ndarray, f"__{_n}__", _binop(f"__{_n}__"))
for _n in ("neg", "pos", "abs", "invert"):
    setattr(ndarray, f"__{_n}__", (lambda op: lambda self: _wrap(op(self._a)))(
        getattr(_np.ndarray, f"__{_n}__")))


# -- the module's array functions -----------------------------------------------------------
def _from_host(a, dtype, order, ndmin=0, blocking=False):
    """A host object on the device. CuPy stages pageable memory through a page-locked buffer
    before the (asynchronous) copy, so the source may be reused at once; a page-locked
    source is copied from directly: it must not change before the next synchronisation."""
    counters["h2d"] += 1
    d = ndarray(_np.array(a, dtype=dtype, copy=True, order=order or "K", ndmin=ndmin))
    if isinstance(a, _np.ndarray) and _is_pinned(a):
        _queue.append(("verify", a, a.copy()))
    if blocking:
        _flush()
    return d


def asarray(a, dtype=None, order=None, *, blocking=False):
    """``a`` on the device (a host array is copied there; a device array kept)."""
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == _np.dtype(dtype) else a.astype(dtype)
    return _from_host(a, dtype, order, blocking=blocking)


def array(a, dtype=None, copy=True, order="K", ndmin=0, *, blocking=False):
    if isinstance(a, ndarray):
        return _wrap(_np.array(a._a, dtype=dtype, copy=copy, order=order, ndmin=ndmin))
    return _from_host(a, dtype, order, ndmin, blocking)


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    """A host copy of ``a`` (a synchronisation)."""
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out, blocking=blocking)
    return _np.asarray(a, order=order)


def get_array_module(*args):
    for a in args:
        if isinstance(a, ndarray):
            return sys.modules[__name__]
    return _np


def _wrapped(fn, name):
    allow = name in _TRANSFER

    def f(*args, **kwargs):
        return _call(fn, args, kwargs, allow_host=allow)
    f.__name__ = name
    f.__doc__ = f"numpy.{name} on the device double"
    return f


class _Namespace(types.SimpleNamespace):
    pass


lib = _Namespace(stride_tricks=_Namespace(
    as_strided=_wrapped(_np.lib.stride_tricks.as_strided, "as_strided")))
linalg = _Namespace(**{n: _wrapped(getattr(_np.linalg, n), n)
                       for n in ("norm", "solve", "inv", "svd", "eigh", "qr", "det")})


_MISSING = object()


def __getattr__(name: str):  # numpy's functions, wrapped; numpy's types and constants
    if name.startswith("__"):
        raise AttributeError(name)
    obj = getattr(_np, name, _MISSING)
    if obj is _MISSING or isinstance(obj, types.ModuleType):
        raise AttributeError(f"the device double has no {name!r} (it needs a real GPU)")
    if isinstance(obj, type) or not callable(obj):
        return obj
    f = _wrapped(obj, name)
    globals()[name] = f
    return f


# -- the cuda namespace (what ssmpi.backend uses) -------------------------------------------
class Stream:
    ptr = 0

    def synchronize(self):
        _flush()


_STREAM = Stream()
_device_id = 0


def _n_devices() -> int:
    return int(os.environ.get("SSMPI_DOUBLE_DEVICES", "1") or 1)


class Device:
    def __init__(self, device: Any = None):
        self.id = _device_id if device is None else int(device)

    def use(self):
        global _device_id
        if not 0 <= self.id < _n_devices():
            raise ValueError(f"device double: no device {self.id} (there are {_n_devices()})")
        _device_id = self.id

    def synchronize(self):
        _flush()

    def __enter__(self):
        self._prev = _device_id
        self.use()
        return self

    def __exit__(self, *exc):
        Device(self._prev).use()
        return False


def _get_device_properties(i):
    return {"name": b"ssmpi device double", "totalGlobalMem": 0, "multiProcessorCount": 0}


def _alloc_pinned_memory(nbytes: int) -> PinnedMemory:
    return PinnedMemory(int(nbytes))


cuda = _Namespace(
    Stream=Stream,
    Device=Device,
    get_current_stream=lambda: _STREAM,
    alloc_pinned_memory=_alloc_pinned_memory,
    is_available=lambda: True,
    runtime=_Namespace(getDeviceCount=_n_devices, getDevice=lambda: _device_id,
                       getDeviceProperties=_get_device_properties,
                       deviceSynchronize=_flush),
)

def install(backend_module):
    """Make ``backend_module`` (an ``ssmpi.backend``, also an older one) use the double as
    its CuPy on a "gpu" device; returns this module."""
    this = sys.modules[__name__]
    backend_module._cupy = this
    backend_module._xp = this
    backend_module._device = "gpu"
    return this
