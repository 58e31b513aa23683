"""Layers with parameters, built from the hand-written ops in :mod:`ssmpi.ops`.

Shape legend (per-sample shapes exclude the batch axis N):
    image activations  (N, H, W, C)   NHWC, channels last
    vectors            (N, D)
    conv weights       (kh, kw, Cin, Cout)
    linear weights     (Din, Dout)

A layer infers its input size at :meth:`Layer.build` from the per-sample input shape, so
that the same description serves every fusion mode (concat widens a unit's input).
``build(in_shape, rng=None)`` computes shapes only; with an ``rng`` it also draws the
parameters (NumPy, then moved to the selected device by the unit).

Each layer owns a small workspace dict ``ws`` that ops may use to reuse buffers between
calls (one forward, then its backward, then the next forward: see ``ssmpi/ops/conv.py``).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np

from .. import backend
from . import ops
from .ops.nonlin import DropoutRes

Shape = Tuple[int, ...]


class Layer:
    """A differentiable map with (possibly no) parameters."""

    name = "layer"

    def __init__(self):
        self.params: Dict[str, object] = {}
        self.in_shape: Optional[Shape] = None
        self.out_shape: Optional[Shape] = None
        self.ws: dict = {}

    def build(self, in_shape: Shape, rng: Optional[np.random.Generator] = None,
              dtype=np.float32) -> Shape:
        """Set shapes from the per-sample ``in_shape``; draw parameters when ``rng`` is given."""
        self.in_shape = tuple(in_shape)
        self.out_shape = self._out_shape(self.in_shape)
        if rng is not None:
            self.params = self._init_params(rng, dtype)
        return self.out_shape

    def _out_shape(self, in_shape: Shape) -> Shape:
        return in_shape

    def _init_params(self, rng, dtype) -> Dict[str, np.ndarray]:
        return {}

    def forward(self, x, train: bool = True):
        """``x`` (N, *in_shape) -> ``(y, res)`` with y (N, *out_shape)."""
        raise NotImplementedError

    def backward(self, res, dy, need_dx: bool = True):
        """``dy`` (N, *out_shape) -> ``(dx or None, {param name: gradient}``)."""
        raise NotImplementedError

    def _wb(self, dw, db) -> Dict[str, object]:
        """{"w": dw} and, with a bias, {"b": db}: the gradients of a weight layer."""
        return {"w": dw, "b": db} if getattr(self, "bias", False) else {"w": dw}

    def flops(self) -> int:
        """Forward multiply-adds x 2 per sample (0 for cheap elementwise layers)."""
        return 0

    def describe(self) -> str:
        return self.name


class Conv2d(Layer):
    """2D convolution (+ bias), He-normal initialised, zero padding."""

    name = "conv"

    def __init__(self, cout: int, k: int = 3, stride: int = 1, pad: Optional[int] = None,
                 bias: bool = True):
        super().__init__()
        self.cout, self.k, self.stride = int(cout), int(k), int(stride)
        self.pad = (self.k // 2) if pad is None else int(pad)
        self.bias = bias

    def _out_shape(self, in_shape):
        if len(in_shape) != 3:
            raise ValueError(f"conv: expects a (H, W, C) input, got per-sample shape {in_shape}")
        h, w, _ = in_shape
        ho = (h + 2 * self.pad - self.k) // self.stride + 1
        wo = (w + 2 * self.pad - self.k) // self.stride + 1
        if ho < 1 or wo < 1:
            raise ValueError(f"conv: kernel {self.k} larger than padded input {in_shape}")
        return (ho, wo, self.cout)

    def _init_params(self, rng, dtype):
        cin = self.in_shape[2]
        fan_in = self.k * self.k * cin
        p = {"w": ops.he_normal((self.k, self.k, cin, self.cout), fan_in, rng, dtype)}
        if self.bias:
            p["b"] = np.zeros((self.cout,), dtype=dtype)
        return p

    def forward(self, x, train=True):
        return ops.conv2d_fwd(x, self.params["w"], self.params.get("b"), stride=self.stride,
                              pad=self.pad, ws=self.ws)

    def backward(self, res, dy, need_dx=True):
        dx, dw, db = ops.conv2d_bwd(res, dy, need_dx=need_dx)
        return dx, self._wb(dw, db)

    def flops(self):
        ho, wo, co = self.out_shape
        return 2 * ho * wo * co * self.k * self.k * self.in_shape[2]

    def describe(self):
        return f"conv{self.k}x{self.k}/{self.stride}-{self.cout}"


class ReLU(Layer):
    name = "relu"

    def forward(self, x, train=True):
        return ops.relu_fwd(x)

    def backward(self, res, dy, need_dx=True):
        return ops.relu_bwd(res, dy), {}


class Identity(Layer):
    """y = x (a copy: the caller may reuse x's buffer). The parameter-free *input unit*
    (:func:`ssmpi.models.with_input_unit`) is made of it."""

    name = "identity"

    def forward(self, x, train=True):
        return x.copy(), None

    def backward(self, res, dy, need_dx=True):
        return (dy if need_dx else None), {}


class MaxPool2d(Layer):
    name = "maxpool"

    def __init__(self, k: int = 2, stride: Optional[int] = None):
        super().__init__()
        self.k = int(k)
        self.stride = self.k if stride is None else int(stride)

    def _out_shape(self, in_shape):
        h, w, c = in_shape
        if h < self.k or w < self.k:
            raise ValueError(f"maxpool: kernel {self.k} larger than input {in_shape}")
        return ((h - self.k) // self.stride + 1, (w - self.k) // self.stride + 1, c)

    def forward(self, x, train=True):
        return ops.maxpool2d_fwd(x, self.k, self.stride)

    def backward(self, res, dy, need_dx=True):
        return ops.maxpool2d_bwd(res, dy), {}

    def describe(self):
        return f"maxpool{self.k}"


class GlobalAvgPool(Layer):
    name = "gap"

    def _out_shape(self, in_shape):
        return (in_shape[-1],)

    def forward(self, x, train=True):
        return ops.global_avgpool_fwd(x)

    def backward(self, res, dy, need_dx=True):
        return ops.global_avgpool_bwd(res, dy), {}


class Linear(Layer):
    """Fully connected layer, Glorot-uniform initialised."""

    name = "linear"

    def __init__(self, dout: int, bias: bool = True):
        super().__init__()
        self.dout, self.bias = int(dout), bias

    def _out_shape(self, in_shape):
        if len(in_shape) != 1:
            raise ValueError(f"linear: expects a (D,) input, got per-sample shape {in_shape}")
        return (self.dout,)

    def _init_params(self, rng, dtype):
        din = self.in_shape[0]
        p = {"w": ops.glorot_uniform((din, self.dout), din, self.dout, rng, dtype)}
        if self.bias:
            p["b"] = np.zeros((self.dout,), dtype=dtype)
        return p

    def forward(self, x, train=True):
        return ops.linear_fwd(x, self.params["w"], self.params.get("b"))

    def backward(self, res, dy, need_dx=True):
        dx, dw, db = ops.linear_bwd(res, dy, need_dx=need_dx)
        return dx, self._wb(dw, db)

    def flops(self):
        return 2 * self.in_shape[0] * self.dout

    def describe(self):
        return f"linear-{self.dout}"


class Dropout(Layer):
    """Inverted dropout. ``rng`` (a NumPy Generator, saved in checkpoints) decides every mask:
    on the CPU the mask is drawn from it directly (:func:`ops.dropout_fwd`); on a GPU it gives
    one 64-bit key per call and the mask is computed on the device from that key
    (:func:`device_uniform`), so no host mask crosses the bus at every step, and a resumed run
    draws the same masks."""

    name = "dropout"

    def __init__(self, p: float, seed: int = 0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout: p must be in [0, 1), got {p}")
        self.p = float(p)
        self.rng = np.random.default_rng(seed)

    def forward(self, x, train=True):
        xp = backend.get_array_module(x)
        if xp is np or not train or self.p == 0:
            return ops.dropout_fwd(x, self.p, rng=self.rng, train=train)
        if getattr(x.dtype, "kind", None) != "f":
            raise ValueError(f"dropout: x must be a floating array, got dtype {x.dtype}")
        key = int(self.rng.integers(0, 2**64, dtype=np.uint64))
        keep = device_uniform(xp, x.shape, key) >= np.float32(self.p)
        scale = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - self.p))
        return x * scale, DropoutRes(scale)

    def backward(self, res, dy, need_dx=True):
        return ops.dropout_bwd(res, dy), {}


class SpaceToDepth(Layer):
    name = "s2d"

    def __init__(self, block: int = 2):
        super().__init__()
        self.block = int(block)

    def _out_shape(self, in_shape):
        h, w, c = in_shape
        b = self.block
        if h % b or w % b:
            raise ValueError(f"space_to_depth: input {in_shape} not divisible by block {b}")
        return (h // b, w // b, c * b * b)

    def forward(self, x, train=True):
        return ops.space_to_depth_fwd(x, self.block)

    def backward(self, res, dy, need_dx=True):
        return ops.space_to_depth_bwd(res, dy), {}

    def describe(self):
        return f"s2d{self.block}"


def _mix32(x, xp):
    """A bijective 32-bit integer hash (Wellons' lowbias32), elementwise on uint32 arrays."""
    x = x ^ (x >> 16)
    x = x * xp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * xp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def device_uniform(xp, shape, key: int):
    """Uniform float32 numbers in [0, 1) of ``shape``, computed on ``xp``'s device from a
    64-bit ``key``: a counter-based hash of the element index (two rounds of a 32-bit mixer,
    each keyed with one half of ``key``; 24 bits per number). The same numbers for every
    array module, so the NumPy value is the reference of the GPU one."""
    n = 1
    for d in shape:
        n *= int(d)
    if n >= 2**32:
        raise ValueError(f"dropout: {n} elements do not fit the 32-bit counter")
    k0 = int(_mix32(np.array([key & 0xFFFFFFFF], np.uint32), np)[0])  # on the host
    i = xp.arange(n, dtype=xp.uint32)
    h = _mix32(i + xp.uint32(k0), xp)
    h = _mix32(h ^ xp.uint32((key >> 32) & 0xFFFFFFFF), xp)
    return ((h >> 8).astype(xp.float32) * xp.float32(2.0 ** -24)).reshape(shape)


def count_params(layers) -> int:
    return sum(int(math.prod(p.shape)) for layer in layers for p in layer.params.values())
