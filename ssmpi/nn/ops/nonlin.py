"""Element-wise non-linearities and dropout.

Shape legend
------------
...     any shape: these ops act element by element; y, dy and dx have the shape of x.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ssmpi import backend
from ssmpi.nn.ops.checks import check_float as _check_float

__all__ = ["ReluRes", "DropoutRes", "relu_fwd", "relu_bwd", "dropout_fwd", "dropout_bwd"]


class ReluRes(NamedTuple):
    mask: Any  # (...) bool, x > 0


class DropoutRes(NamedTuple):
    scale: Any  # (...) keep_mask / (1 - p) in x's dtype, or None for the identity



def _check_dy(op, dy, shape):
    _check_float(op, "dy", dy)
    if tuple(dy.shape) != tuple(shape):
        raise ValueError(f"{op}: dy {tuple(dy.shape)} does not match y {tuple(shape)}")


def relu_fwd(x):
    """y = max(x, 0). x: (...) -> y: (...); the gradient at 0 is 0."""
    xp = backend.get_array_module(x)
    _check_float("relu_fwd", "x", x)
    mask = x > 0
    y = xp.maximum(x, xp.zeros((), dtype=x.dtype))
    return y, ReluRes(mask)


def relu_bwd(res: ReluRes, dy):
    """VJP of relu_fwd: dy (...) -> dx (...)."""
    xp = backend.get_array_module(dy)
    _check_dy("relu_bwd", dy, res.mask.shape)
    return xp.where(res.mask, dy, xp.zeros((), dtype=dy.dtype))


def dropout_fwd(x, p, *, rng, train):
    """Inverted dropout: keep each element with probability 1-p and scale it by 1/(1-p).

    x : (...). rng : numpy.random.Generator (the mask is drawn on the host, then moved to x's
    device). With train=False or p == 0 this is the identity and y is x itself.
    """
    op = "dropout_fwd"
    xp = backend.get_array_module(x)
    _check_float(op, "x", x)
    if not (0.0 <= p < 1.0):
        raise ValueError(f"{op}: p must be in [0, 1), got {p!r} (x {tuple(x.shape)})")
    if not train or p == 0:
        return x, DropoutRes(None)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"{op}: rng must be a numpy.random.Generator, got {type(rng).__name__}")
    keep = rng.random(x.shape, dtype=np.float32) >= np.float32(p)
    scale = xp.asarray(keep.astype(x.dtype)) * x.dtype.type(1.0 / (1.0 - p))
    return x * scale, DropoutRes(scale)


def dropout_bwd(res: DropoutRes, dy):
    """VJP of dropout_fwd: dy (...) -> dx (...); dy itself (not copied) for the identity."""
    if res.scale is None:
        _check_float("dropout_bwd", "dy", dy)
        return dy
    _check_dy("dropout_bwd", dy, res.scale.shape)
    return dy * res.scale
