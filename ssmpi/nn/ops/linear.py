"""Fully connected layer.

Shape legend
------------
N     batch
Din   input features
Dout  output features
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ssmpi import backend
from ssmpi.nn.ops.checks import check_float as _check_float

__all__ = ["LinearRes", "linear_fwd", "linear_bwd"]


class LinearRes(NamedTuple):
    x: Any  # (N, Din)
    w: Any  # (Din, Dout)
    has_bias: bool



def linear_fwd(x, w, b):
    """y = x @ w + b.

    x : (N, Din), w : (Din, Dout), b : (Dout,) or None. Returns y (N, Dout) and a LinearRes.
    """
    op = "linear_fwd"
    xp = backend.get_array_module(x)
    _check_float(op, "x", x)
    _check_float(op, "w", w, x.dtype)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"{op}: x {tuple(x.shape)} and w {tuple(w.shape)} do not match "
                         "((N, Din) and (Din, Dout))")
    if b is not None:
        _check_float(op, "b", b, x.dtype)
        if tuple(b.shape) != (w.shape[1],):
            raise ValueError(f"{op}: b {tuple(b.shape)} must be ({w.shape[1]},) for w "
                             f"{tuple(w.shape)}")
    y = xp.matmul(x, w)
    if b is not None:
        y += b
    return y, LinearRes(x, w, b is not None)


def linear_bwd(res: LinearRes, dy, *, need_dx=True):
    """VJP of linear_fwd: dy (N, Dout) -> (dx (N, Din) or None, dw (Din, Dout), db (Dout,)).

    db is None when the forward had no bias.
    """
    op = "linear_bwd"
    xp = backend.get_array_module(dy)
    _check_float(op, "dy", dy)
    n, dout = res.x.shape[0], res.w.shape[1]
    if tuple(dy.shape) != (n, dout):
        raise ValueError(f"{op}: dy {tuple(dy.shape)} does not match y {(n, dout)}")
    dy = dy.astype(res.x.dtype, copy=False)
    dw = xp.matmul(res.x.T, dy)
    db = dy.sum(axis=0) if res.has_bias else None
    dx = xp.matmul(dy, res.w.T) if need_dx else None
    return dx, dw, db
