"""Skip-Sideways aggregation: fusing a direct and shortcut activations, and the tau maps.

Shape legend
------------
N        batch
H, W     spatial size of the incoming activation h
Ho, Wo   spatial size wanted by the receiving unit (out_hw)
C, Ci    channels (of h, of the i-th fused input)
f        integer max-pool factor H / Ho (= W / Wo)
r        channel tiling factor out_c / C
"""

from __future__ import annotations

from typing import NamedTuple

from ssmpi import backend
from ssmpi.nn.ops import pool

__all__ = ["FuseRes", "TauRes", "fuse_fwd", "fuse_bwd", "tau_out_shape", "tau_fwd", "tau_bwd"]


class FuseRes(NamedTuple):
    mode: str
    sizes: tuple  # concat: the last-axis size of every input; add: (number of inputs,)
    shape: tuple  # shape of y


class TauRes(NamedTuple):
    pool: object  # PoolRes of the max-pool, or None for factor 1
    c: int  # channels of h
    out_c: int  # channels of y
    mode: str  # "same", "tile" or "pad"
    y_shape: tuple


def fuse_fwd(inputs, mode):
    """Aggregate activations arriving at one unit.

    inputs : list of arrays. mode 'concat': shapes (..., Ci) agreeing on all but the last axis,
    y (..., sum Ci). mode 'add': equal shapes, y = sum of inputs (a fresh array).
    """
    op = "fuse_fwd"
    if mode not in ("concat", "add"):
        raise ValueError(f"{op}: mode must be 'concat' or 'add', got {mode!r}")
    if not isinstance(inputs, (list, tuple)) or len(inputs) == 0:
        raise ValueError(f"{op}: inputs must be a non-empty list of arrays")
    xp = backend.get_array_module(*inputs)
    shapes = [tuple(a.shape) for a in inputs]
    dt = inputs[0].dtype
    if any(a.dtype != dt for a in inputs) or dt.kind != "f":
        raise ValueError(f"{op}: inputs must share one floating dtype, got "
                         f"{[str(a.dtype) for a in inputs]} (shapes {shapes})")
    if mode == "concat":
        if any(len(s) != len(shapes[0]) or s[:-1] != shapes[0][:-1] for s in shapes):
            raise ValueError(f"{op}: concat inputs must agree on all but the last axis, "
                             f"got {shapes}")
        y = xp.concatenate(inputs, axis=-1)
        return y, FuseRes(mode, tuple(s[-1] for s in shapes), tuple(y.shape))
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"{op}: add inputs must have equal shapes, got {shapes}")
    y = inputs[0].copy()
    for a in inputs[1:]:
        y += a
    return y, FuseRes(mode, (len(inputs),), shapes[0])


def fuse_bwd(res: FuseRes, dy):
    """VJP of fuse_fwd: dy (like y) -> list with one fresh contiguous cotangent per input."""
    op = "fuse_bwd"
    xp = backend.get_array_module(dy)
    if tuple(dy.shape) != res.shape:
        raise ValueError(f"{op}: dy {tuple(dy.shape)} does not match y {res.shape}")
    if res.mode == "add":
        return [dy.copy() for _ in range(res.sizes[0])]
    out, start = [], 0
    for c in res.sizes:
        out.append(xp.ascontiguousarray(dy[..., start:start + c]))
        start += c
    return out


def _tau_geometry(op, in_shape, out_hw, out_c):
    if len(in_shape) != 4:
        raise ValueError(f"{op}: h must be (N, H, W, C), got {tuple(in_shape)}")
    n, h, w, c = in_shape
    try:
        ho, wo = (int(v) for v in out_hw)
    except (TypeError, ValueError):
        raise ValueError(f"{op}: out_hw must be (Ho, Wo), got {out_hw!r}") from None
    if ho < 1 or wo < 1 or h % ho or w % wo or h // ho != w // wo:
        raise ValueError(f"{op}: cannot map h {tuple(in_shape)} to {ho}x{wo} by one integer "
                         "max-pool factor (upsampling and non-integer factors are not allowed)")
    f = h // ho
    if out_c is None or out_c == c:
        return f, c, "same"
    if not isinstance(out_c, int) or out_c < 1:
        raise ValueError(f"{op}: out_c must be a positive int, got {out_c!r}")
    if out_c % c == 0:
        return f, out_c, "tile"
    if out_c > c:
        return f, out_c, "pad"
    raise ValueError(f"{op}: cannot map {c} channels of h {tuple(in_shape)} to {out_c} "
                     "(neither a multiple nor larger)")


def tau_out_shape(in_shape, out_hw, out_c=None):
    """Shape of tau_fwd's output for an input of shape in_shape (N, H, W, C)."""
    f, oc, _ = _tau_geometry("tau_out_shape", tuple(in_shape), out_hw, out_c)
    n, h, w, c = in_shape
    return (n, h // f, w // f, oc)


def tau_fwd(h, out_hw, out_c=None):
    """Shape-matching map of a shortcut edge.

    h : (N, H, W, C) -> y (N, Ho, Wo, out_c or C): max-pool by f = H/Ho (identity for f = 1,
    y is then h itself when no channel change is needed), then channel tiling (out_c a multiple
    of C: y = [h, h, ..., h] along channels) or zero padding (out_c > C).
    """
    op = "tau_fwd"
    xp = backend.get_array_module(h)
    kind = getattr(getattr(h, "dtype", None), "kind", None)
    if kind != "f":
        raise ValueError(f"{op}: h must be a floating array, got "
                         f"{getattr(h, 'dtype', type(h).__name__)}")
    f, oc, mode = _tau_geometry(op, tuple(h.shape), out_hw, out_c)
    c = h.shape[-1]
    pres = None
    y = h
    if f > 1:
        y, pres = pool.maxpool2d_fwd(h, f)
    if mode == "tile":
        y = xp.tile(y, (1, 1, 1, oc // c))
    elif mode == "pad":
        z = xp.zeros(y.shape[:-1] + (oc,), dtype=y.dtype)
        z[..., :c] = y
        y = z
    return y, TauRes(pres, c, oc, mode, tuple(y.shape))


def tau_bwd(res: TauRes, dy):
    """VJP of tau_fwd: dy (N, Ho, Wo, out_c) -> dh (N, H, W, C)."""
    op = "tau_bwd"
    xp = backend.get_array_module(dy)
    if tuple(dy.shape) != res.y_shape:
        raise ValueError(f"{op}: dy {tuple(dy.shape)} does not match y {res.y_shape}")
    c = res.c
    if res.mode == "tile":
        g = dy.reshape(dy.shape[:-1] + (res.out_c // c, c)).sum(axis=-2)
    elif res.mode == "pad":
        g = xp.ascontiguousarray(dy[..., :c])
    else:
        g = dy
    if res.pool is not None:
        return pool.maxpool2d_bwd(res.pool, g)
    return g.copy() if g is dy else g
