"""Pooling, channels last (NHWC), no padding.

Shape legend
------------
N       batch
H, W    input height and width
Ho, Wo  output height and width: Ho = (H - k) // stride + 1
C       channels
k       square pooling window (k x k)

Windows are visited tap by tap (k*k strided slices of x), so any stride works, overlapping
(stride < k) included; the backward accumulates tap by tap.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ssmpi import backend

__all__ = [
    "PoolRes",
    "maxpool2d_fwd",
    "maxpool2d_bwd",
    "avgpool2d_fwd",
    "avgpool2d_bwd",
    "global_avgpool_fwd",
    "global_avgpool_bwd",
]


class PoolRes(NamedTuple):
    """What the pooling VJPs need."""

    x_shape: tuple  # (N, H, W, C)
    k: int
    stride: int
    arg: Any  # maxpool: (N, Ho, Wo, C) uint8 index of the winning tap (first max); else None
    dtype: Any


def _check(op, x, k, stride):
    kind = getattr(getattr(x, "dtype", None), "kind", None)
    if kind != "f":
        raise ValueError(f"{op}: x must be a floating array, got dtype "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim != 4:
        raise ValueError(f"{op}: x must be (N, H, W, C), got shape {x.shape}")
    if stride is None:
        stride = k
    for name, v in (("k", k), ("stride", stride)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{op}: {name} must be a positive int, got {v!r}")
    k, stride = int(k), int(stride)
    if k * k > 255:
        raise ValueError(f"{op}: window {k}x{k} too large (at most 15x15)")
    n, h, w, c = x.shape
    if k > h or k > w:
        raise ValueError(f"{op}: window {k}x{k} larger than the input {x.shape}")
    ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
    return k, stride, ho, wo


def _taps(k, stride, ho, wo):
    """(tap index, slice of x) for the k*k taps of the window."""
    for i in range(k):
        for j in range(k):
            yield i * k + j, (slice(None), slice(i, i + stride * (ho - 1) + 1, stride),
                              slice(j, j + stride * (wo - 1) + 1, stride))


def _check_dy(op, res, dy, y_shape):
    kind = getattr(getattr(dy, "dtype", None), "kind", None)
    if kind != "f":
        raise ValueError(f"{op}: dy must be a floating array")
    if tuple(dy.shape) != tuple(y_shape):
        raise ValueError(f"{op}: dy {tuple(dy.shape)} does not match y {tuple(y_shape)} "
                         f"(x {res.x_shape})")


def maxpool2d_fwd(x, k=2, stride=None):
    """Max pooling over k x k windows.

    x : (N, H, W, C). stride defaults to k. Returns y (N, Ho, Wo, C) and a PoolRes whose
    ``arg`` records the first maximal tap of every window (ties send the gradient there).
    """
    op = "maxpool2d_fwd"
    xp = backend.get_array_module(x)
    k, stride, ho, wo = _check(op, x, k, stride)
    taps = list(_taps(k, stride, ho, wo))
    y = x[taps[0][1]].copy()
    arg = xp.zeros(y.shape, dtype=xp.uint8)
    for t, sl in taps[1:]:
        v = x[sl]
        better = v > y  # strict: an equal later value does not win
        xp.copyto(y, v, where=better)
        xp.copyto(arg, xp.uint8(t), where=better)
    return y, PoolRes(tuple(x.shape), k, stride, arg, x.dtype)


def maxpool2d_bwd(res: PoolRes, dy):
    """VJP of maxpool2d_fwd: dy (N, Ho, Wo, C) -> dx (N, H, W, C)."""
    op = "maxpool2d_bwd"
    xp = backend.get_array_module(dy)
    _check_dy(op, res, dy, res.arg.shape)
    n, h, w, c = res.x_shape
    ho, wo = res.arg.shape[1:3]
    dy = dy.astype(res.dtype, copy=False)
    dx = xp.zeros(res.x_shape, dtype=res.dtype)
    zero = xp.zeros((), dtype=res.dtype)
    for t, sl in _taps(res.k, res.stride, ho, wo):
        g = xp.where(res.arg == t, dy, zero)
        if res.stride >= res.k:  # windows do not overlap: each dx entry is hit once
            dx[sl] = g
        else:
            dst = dx[sl]
            xp.add(dst, g, out=dst)
    return dx


def avgpool2d_fwd(x, k, stride=None):
    """Average pooling over k x k windows (no padding).

    x : (N, H, W, C). stride defaults to k. Returns y (N, Ho, Wo, C) and a PoolRes.
    """
    op = "avgpool2d_fwd"
    k, stride, ho, wo = _check(op, x, k, stride)
    taps = list(_taps(k, stride, ho, wo))
    y = x[taps[0][1]].copy()
    for _, sl in taps[1:]:
        y += x[sl]
    y *= 1.0 / (k * k)
    return y, PoolRes(tuple(x.shape), k, stride, None, x.dtype)


def avgpool2d_bwd(res: PoolRes, dy):
    """VJP of avgpool2d_fwd: dy (N, Ho, Wo, C) -> dx (N, H, W, C)."""
    op = "avgpool2d_bwd"
    xp = backend.get_array_module(dy)
    n, h, w, c = res.x_shape
    k, stride = res.k, res.stride
    ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
    _check_dy(op, res, dy, (n, ho, wo, c))
    g = dy.astype(res.dtype) * (1.0 / (k * k))  # a fresh array: dy is never mutated
    dx = xp.zeros(res.x_shape, dtype=res.dtype)
    for _, sl in _taps(k, stride, ho, wo):
        dst = dx[sl]
        xp.add(dst, g, out=dst)
    return dx


def global_avgpool_fwd(x):
    """Mean over the spatial axes: x (N, H, W, C) -> y (N, C)."""
    op = "global_avgpool_fwd"
    kind = getattr(getattr(x, "dtype", None), "kind", None)
    if kind != "f" or x.ndim != 4:
        raise ValueError(f"{op}: x must be a floating (N, H, W, C) array, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    y = x.mean(axis=(1, 2), dtype=x.dtype)
    return y, PoolRes(tuple(x.shape), 0, 0, None, x.dtype)


def global_avgpool_bwd(res: PoolRes, dy):
    """VJP of global_avgpool_fwd: dy (N, C) -> dx (N, H, W, C)."""
    op = "global_avgpool_bwd"
    xp = backend.get_array_module(dy)
    n, h, w, c = res.x_shape
    _check_dy(op, res, dy, (n, c))
    dx = xp.empty(res.x_shape, dtype=res.dtype)
    dx[...] = (dy.astype(res.dtype) * (1.0 / (h * w)))[:, None, None, :]
    return dx
