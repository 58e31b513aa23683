"""Convolutions as im2col + one GEMM, channels last (NHWC / NTHWC); Winograd for 3x3 stride 1.

Shape legend
------------
N          batch
T          frames (time axis of a clip)
H, W       input height and width
Ho, Wo     output height and width
Cin, Cout  input and output channels
kt, kh, kw kernel extent along time, height and width
S          number of kernel taps: kh*kw (2-D) or kt*kh*kw (causal 3-D)
M          rows of the GEMM: N*Ho*Wo (2-D) or N*T*Ho*Wo (3-D)
K          depth of the GEMM: S*Cin

How it works
------------
Forward: the columns ``cols`` (M, K) = (N, Ho, Wo, S, Cin) hold, for every output position and
every kernel tap, the Cin input values that tap sees. They are built with strided slice copies
straight from ``x``: for each kernel row at once where all its kw taps are inside the image
(the kw*Cin values are contiguous in NHWC, read through an ``as_strided`` window view), and
tap by tap for the border columns. The part of a window that falls into the zero padding is
never written (the buffer is zeroed once when it is allocated), so no padded copy of ``x`` is
made. Then ``y (M, Cout) = cols (M, K) @ w (K, Cout)``, which is already NHWC. On the CPU the
copies and GEMMs run over a few images at a time (``_chunk_images``), so that each chunk of
columns is still in cache when the GEMM reads it; on a GPU (any array module but NumPy) there
is one chunk, the whole batch: one large GEMM instead of many small ones, and no extra
kernel launches.

Backward: ``dw = cols.T @ dy``, ``db = sum(dy)``, and, chunk by chunk, ``dcols = dy @ w.T``
followed by col2im: one strided slice add per tap into ``dx``. ``need_dx=False`` (the bottom
layer of a network) skips dcols and col2im altogether.

2-D 3x3 convolutions with stride 1, padding <= 2 and at least ``WINOGRAD_MIN_CIN`` input
channels take the Winograd F(2x2, 3x3) path instead (``winograd.py``): the same results up to
float rounding with 4/9 of the GEMM flops; on VGG8's layers it is 1.5-1.7x faster than im2col
here. Set ``conv.WINOGRAD = False`` to force im2col everywhere.

Causal 3-D convolution is the same code with a third "spatial" axis, time, padded with kt-1
zero frames on the left only and stride 1, so output frame t sees input frames t-kt+1..t.

Workspace ``ws`` (what is cached)
---------------------------------
``ws`` is an optional dict owned by the caller, one per layer instance. When given, the op
keeps in it, keyed by the full geometry (shapes, strides, pads, dtype):

- ``"cols"``: the (M, K) im2col buffer. Its padding border is zeroed once at allocation and
  never written again, so later forwards only copy the valid windows;
- ``"dcols"``: the buffer for ``dy @ w.T`` of one chunk of images (GEMM written with
  ``out=``);
- ``"plan"``: the per-tap slice table;
- on the Winograd path: ``"wino_pad"`` (the zero-bordered padded input), ``"wino_v"`` (the
  transformed input tiles V, kept for dw), ``"wino_t"``, ``"wino_m"``, ``"wino_s"`` (scratch of
  the transforms and the GEMM output, one chunk), and the same with a ``"wino_dx_"`` prefix for
  the dx convolution (``"wino_dx_v"`` also holds A dy A^T for dw before dx needs it).

Outputs handed to the caller (``y``, ``dx``, ``dw``, ``db``) are always fresh arrays, so they
may be kept, sent over MPI or accumulated into. The residual ``res`` of a forward run with a
``ws`` refers to ``ws["cols"]`` (or ``ws["wino_v"]``): the next forward with the same ``ws``
overwrites it. That is the contract: one forward, then its backward, then the next forward.
With ``ws=None`` everything is freshly allocated and residuals of several forwards can stay
alive at once (GPipe, exact backprop through a clip).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ssmpi import backend
from ssmpi.nn.ops import winograd
from ssmpi.nn.ops.checks import check_float as _check_float

__all__ = [
    "ConvRes",
    "conv2d_fwd",
    "conv2d_bwd",
    "conv3d_causal_fwd",
    "conv3d_causal_bwd",
    "conv_out_size",
]


class _Plan(NamedTuple):
    """Geometry of one convolution; built once per (shapes, strides, pads)."""

    key: tuple
    x_shape: tuple  # (N, *in_sizes, Cin)
    y_shape: tuple  # (N, *out_sizes, Cout)
    ks: tuple  # kernel extents, one per spatial axis
    # per tap: (tap index s, output slices, input slices); taps seeing only padding are left out
    taps: tuple
    has_border: bool  # some tap window reaches into the padding (cols needs zeros)
    full_tap: int | None  # index into taps of a tap whose input slice is all of x, or None
    # im2col copies: ("win", r, out_lead, out_w, in_lead, w_start, sw): the kw taps of kernel row r
    # at once (kw*Cin contiguous values of x per output pixel, interior columns only);
    # ("tap", s, out_sl, in_sl): one tap (the border columns)
    pieces: tuple
    chunk: int  # images per chunk of the GEMM loops


class ConvRes(NamedTuple):
    """What conv2d_bwd / conv3d_causal_bwd need."""

    cols: Any  # (M, K) im2col columns of the forward (may live in ws["cols"])
    w: Any  # (*ks, Cin, Cout) the weights of the forward
    plan: _Plan
    has_bias: bool
    ws: dict | None
    op: str


def conv_out_size(n: int, k: int, stride: int, pad_lo: int, pad_hi: int) -> int:
    """Output extent of a convolution along one axis: floor((n + pads - k) / stride) + 1."""
    return (n + pad_lo + pad_hi - k) // stride + 1


def _pair(op: str, name: str, v, n: int, lo: int) -> tuple:
    """An int or an n-tuple of ints (each >= lo) as an n-tuple."""
    if isinstance(v, (tuple, list)):
        t = tuple(v)
    else:
        t = (v,) * n
    if len(t) != n or not all(isinstance(a, int) and not isinstance(a, bool) for a in t):
        raise ValueError(f"{op}: {name} must be an int or {n} ints, got {v!r}")
    if any(a < lo for a in t):
        raise ValueError(f"{op}: {name} must be >= {lo}, got {v!r}")
    return t



def _axis_taps(n: int, k: int, s: int, plo: int, no: int):
    """For each offset i < k along one axis: (out slice, in slice, full_out, full_in) or None.

    Output index o sees input index o*s + i - plo; it is valid when 0 <= that < n.
    """
    res = []
    for i in range(k):
        o_lo = max(0, -((i - plo) // s))  # ceil((plo - i) / s)
        o_hi = min(no, (n - 1 + plo - i) // s + 1)
        if o_hi <= o_lo:
            res.append(None)
            continue
        start = o_lo * s + i - plo
        stop = (o_hi - 1) * s + i - plo + 1
        full_out = o_lo == 0 and o_hi == no
        full_in = start == 0 and stop == n and (s == 1 or o_hi - o_lo == 1)
        res.append((slice(o_lo, o_hi), slice(start, stop, s), full_out, full_in))
    return res


def _make_plan(op, x_shape, w_shape, strides, pads_lo, pads_hi, device=False) -> _Plan:
    key = (x_shape, w_shape, strides, pads_lo, pads_hi)
    nsp = len(strides)
    n_, in_sizes, cin = x_shape[0], x_shape[1:-1], x_shape[-1]
    ks, cin_w, cout = w_shape[:nsp], w_shape[nsp], w_shape[nsp + 1]
    if cin_w != cin:
        raise ValueError(f"{op}: x {x_shape} has {cin} channels but w {w_shape} expects {cin_w}")
    out_sizes = []
    for n, k, s, lo, hi in zip(in_sizes, ks, strides, pads_lo, pads_hi):
        if k < 1 or n + lo + hi < k:
            raise ValueError(f"{op}: kernel {tuple(ks)} larger than the padded input "
                             f"(x {x_shape}, pads {pads_lo}/{pads_hi})")
        out_sizes.append(conv_out_size(n, k, s, lo, hi))
    per_axis = [_axis_taps(n, k, s, lo, no)
                for n, k, s, lo, no in zip(in_sizes, ks, strides, pads_lo, out_sizes)]
    taps, has_border, full_tap = [], False, None
    tap = 0

    def rec(d, chosen):
        nonlocal tap, has_border, full_tap
        if d == nsp:
            if any(c is None for c in chosen):
                has_border = True
            else:
                if not all(c[2] for c in chosen):
                    has_border = True
                if full_tap is None and all(c[3] for c in chosen):
                    full_tap = len(taps)
                taps.append((tap, tuple(c[0] for c in chosen), tuple(c[1] for c in chosen)))
            tap += 1
            return
        for c in per_axis[d]:
            rec(d + 1, chosen + [c])

    rec(0, [])
    pieces = _pieces(taps, per_axis[-1], ks[-1], strides[-1], pads_lo[-1], out_sizes[-1])
    rows = 1
    for no in out_sizes:
        rows *= no
    kdim = cin
    for k in ks:
        kdim *= k
    chunk = n_ if device else _chunk_images(n_, rows, kdim)  # GPU: no cache to fit in
    return _Plan(key, tuple(x_shape), (n_, *out_sizes, cout), tuple(ks), tuple(taps),
                 has_border, full_tap, pieces, chunk)


# The Winograd F(2x2, 3x3) path (winograd.py) replaces im2col for 3x3 stride-1 2-D convs with
# at least this many input channels (below, im2col's single GEMM is as fast and simpler).
# An odd output size wastes part of the last tile row/column: 7x7 computes 8x8 (1.31x), which
# is slower than im2col; 14x14 and up are even in VGG.
WINOGRAD = True
WINOGRAD_MIN_CIN = 16
WINOGRAD_MAX_WASTE = 1.2

# Chunking: the GEMMs run over a few images at a time so that each chunk of columns is still
# in cache when the GEMM (forward) or col2im (backward) touches it; but not so few rows that
# the GEMM re-packs the weights too often.
_CHUNK_BYTES = 8 << 20
_CHUNK_MIN_ROWS = 1024


def _chunk_images(n: int, rows_per_image: int, kdim: int) -> int:
    per_image = rows_per_image * kdim * 4
    nb = max(1, _CHUNK_BYTES // max(per_image, 1), -(-_CHUNK_MIN_ROWS // max(rows_per_image, 1)))
    nb = min(n, nb)
    n_chunks = -(-n // nb)
    return -(-n // n_chunks)  # balanced chunks


def _pieces(taps, last_axis, kw, sw, pw, wo):
    """The im2col copy list (see _Plan.pieces) from the per-tap slices."""
    rows = {}
    for s, out_sl, in_sl in taps:
        rows.setdefault(s // kw, []).append((s, out_sl, in_sl))
    pieces = []
    for r, row_taps in rows.items():
        # interior output columns: every one of the kw taps of this kernel row is valid
        a, b = 0, wo
        for j in range(kw):
            t = last_axis[j]
            if t is None:
                a, b = 0, -1
                break
            a, b = max(a, t[0].start), min(b, t[0].stop)
        have_win = len(row_taps) == kw and b - a >= 1 and kw > 1
        if have_win:
            _, out_sl, in_sl = row_taps[0]
            pieces.append(("win", r, out_sl[:-1], slice(a, b), in_sl[:-1], a * sw - pw, sw))
        for s, out_sl, in_sl in row_taps:
            j = s % kw
            o = out_sl[-1]
            ranges = [(o.start, min(a, o.stop)), (max(b, o.start), o.stop)] if have_win \
                else [(o.start, o.stop)]
            for u, v in ranges:
                if v <= u:
                    continue
                sl_in = slice(u * sw + j - pw, (v - 1) * sw + j - pw + 1, sw)
                pieces.append(("tap", s, out_sl[:-1] + (slice(u, v),), in_sl[:-1] + (sl_in,)))
    return tuple(pieces)


def _cached(ws, name, key, make):
    """ws[name] when it was made for ``key``, else ``make()`` stored there (ws=None: make())."""
    if ws is None:
        return make()
    hit = ws.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    val = make()
    ws[name] = (key, val)
    return val


def _conv_fwd(op, x, w, b, strides, pads_lo, pads_hi, ws):
    xp = backend.get_array_module(x)
    _check_float(op, "x", x)
    _check_float(op, "w", w, x.dtype)
    if b is not None:
        _check_float(op, "b", b, x.dtype)
        if b.shape != (w.shape[-1],):
            raise ValueError(f"{op}: b {b.shape} must be ({w.shape[-1]},) for w {w.shape}")
    nsp = len(strides)
    if x.ndim != nsp + 2 or w.ndim != nsp + 2:
        raise ValueError(f"{op}: expected x with {nsp + 2} dims and w with {nsp + 2} dims, "
                         f"got x {x.shape} and w {w.shape}")
    key = (tuple(x.shape), tuple(w.shape), strides, pads_lo, pads_hi, str(x.dtype), xp.__name__)
    plan = _cached(ws, "plan", key,
                   lambda: _make_plan(op, tuple(x.shape), tuple(w.shape), strides, pads_lo,
                                      pads_hi, device=xp is not np))
    if _winograd_applies(plan, strides, pads_lo, pads_hi, x.dtype):
        return winograd.wino_fwd(op, x, w, b, pads_lo[0], plan.y_shape, ws)
    y_shape = plan.y_shape
    cin, cout = x.shape[-1], w.shape[-1]
    n_taps = 1
    for k in plan.ks:
        n_taps *= k
    cols_shape = (*y_shape[:-1], n_taps, cin)  # (N, *out, S, Cin)
    m = 1
    for a in y_shape[:-1]:
        m *= a
    kdim = n_taps * cin

    def alloc_cols():
        return (xp.zeros if plan.has_border else xp.empty)(cols_shape, dtype=x.dtype)

    cols = _cached(ws, "cols", key, alloc_cols)
    cols2 = cols.reshape(m, kdim)
    kw = plan.ks[-1]
    cols_rows = cols.reshape(*cols_shape[:-2], n_taps // kw, kw * cin)  # (N, *out, R, kw*Cin)
    x = xp.ascontiguousarray(x)  # the "win" views need (W, Cin) contiguous
    y = xp.empty(y_shape, dtype=x.dtype)
    y2 = y.reshape(m, cout)
    w2 = w.reshape(kdim, cout)
    rows_per_image = m // x.shape[0]
    for n0 in range(0, x.shape[0], plan.chunk):
        c = (slice(n0, min(n0 + plan.chunk, x.shape[0])),)
        _im2col(xp, x, cols, cols_rows, plan.pieces, c, kw, cin)
        r = slice(c[0].start * rows_per_image, c[0].stop * rows_per_image)
        xp.matmul(cols2[r], w2, out=y2[r])
        if b is not None:
            y2[r] += b
    return y, ConvRes(cols2, w, plan, b is not None, ws, op)


def _im2col(xp, x, cols, cols_rows, pieces, c, kw, cin):
    """Copy the windows of the images c of x into cols (N, *out, S, Cin); see _Plan.pieces."""
    for p in pieces:
        if p[0] == "win":
            _, r, out_lead, out_w, in_lead, w_start, sw = p
            base = x[c + in_lead + (slice(w_start, None),)]  # (n, *lead out, W - w_start, Cin)
            view = xp.lib.stride_tricks.as_strided(  # (n, *lead out, n_w, kw*Cin), read only
                base, shape=base.shape[:-2] + (out_w.stop - out_w.start, kw * cin),
                strides=base.strides[:-2] + (sw * base.strides[-2], base.strides[-1]))
            cols_rows[c + out_lead + (out_w, r)] = view
        else:
            _, s, out_sl, in_sl = p
            cols[c + out_sl + (s,)] = x[c + in_sl]


def _winograd_applies(plan: _Plan, strides, pads_lo, pads_hi, dtype) -> bool:
    """Winograd F(2x2, 3x3) for 2-D 3x3 kernels, stride 1, equal pads <= 2, Cin >= the minimum,
    float32 or float64 (float16 would lose too much to the transforms)."""
    if not (WINOGRAD and plan.ks == (3, 3) and strides == (1, 1) and pads_lo == pads_hi
            and dtype.itemsize >= 4
            and pads_lo[0] == pads_lo[1] <= 2 and plan.x_shape[-1] >= WINOGRAD_MIN_CIN):
        return False
    ho, wo = plan.y_shape[1:3]
    waste = (ho + ho % 2) * (wo + wo % 2) / (ho * wo)  # odd sizes compute a padded tile row
    return waste <= WINOGRAD_MAX_WASTE


def _conv_bwd(res, dy, need_dx):
    op = res.op.replace("_fwd", "_bwd")
    y_shape = res.y_shape if isinstance(res, winograd.WinoRes) else res.plan.y_shape
    _check_float(op, "dy", dy)
    if tuple(dy.shape) != y_shape:
        raise ValueError(f"{op}: dy {tuple(dy.shape)} does not match y {y_shape}")
    if isinstance(res, winograd.WinoRes):
        return winograd.wino_bwd(res, dy, need_dx)
    plan, cols2, w = res.plan, res.cols, res.w
    xp = backend.get_array_module(dy)
    dtype = cols2.dtype
    m, kdim = cols2.shape
    cout = plan.y_shape[-1]
    dy2 = xp.ascontiguousarray(dy, dtype=dtype).reshape(m, cout)
    dw = xp.matmul(cols2.T, dy2).reshape(w.shape)
    db = dy2.sum(axis=0) if res.has_bias else None
    if not need_dx:
        return None, dw, db
    # dx, a chunk of images at a time: dcols (rows, K) = dy @ w.T, then col2im from the
    # chunk while it is still in cache
    n = plan.x_shape[0]
    nb = plan.chunk
    rows_per_image = m // n
    cin = plan.x_shape[-1]
    key = plan.key + (str(dtype), xp.__name__)
    dcols = _cached(res.ws, "dcols", key,
                    lambda: xp.empty((nb * rows_per_image, kdim), dtype=dtype))
    w2t = w.reshape(kdim, cout).T
    dx = xp.empty(plan.x_shape, dtype=dtype)
    taps = plan.taps
    first = plan.full_tap
    if first is not None:  # this tap covers all of dx: assign it, add the others
        taps = taps[:first] + taps[first + 1:]
    else:
        dx[...] = 0
    lead = (slice(None),)
    for n0 in range(0, n, nb):
        n1 = min(n0 + nb, n)
        d2 = dcols[:(n1 - n0) * rows_per_image]
        xp.matmul(dy2[n0 * rows_per_image:n1 * rows_per_image], w2t, out=d2)
        d = d2.reshape(n1 - n0, *plan.y_shape[1:-1], kdim // cin, cin)  # (n, *out, S, Cin)
        dxc = dx[n0:n1]
        if first is not None:
            s, out_sl, _ = plan.taps[first]
            dxc[...] = d[lead + out_sl + (s,)]
        for s, out_sl, in_sl in taps:
            dst = dxc[lead + in_sl]
            xp.add(dst, d[lead + out_sl + (s,)], out=dst)
    return dx, dw, db


def conv2d_fwd(x, w, b, *, stride=1, pad=0, ws=None):
    """2-D convolution (cross-correlation), zero padding, NHWC.

    Parameters
    ----------
    x : (N, H, W, Cin) float array
    w : (kh, kw, Cin, Cout), same dtype as x
    b : (Cout,) or None
    stride, pad : int or (sh, sw) / (ph, pw); pad is symmetric zero padding
    ws : dict or None, the caller's per-layer workspace (see the module docstring)

    Returns
    -------
    y : (N, Ho, Wo, Cout), Ho = (H + 2 ph - kh) // sh + 1
    res : ConvRes
    """
    op = "conv2d_fwd"
    strides = _pair(op, "stride", stride, 2, 1)
    pads = _pair(op, "pad", pad, 2, 0)
    return _conv_fwd(op, x, w, b, strides, pads, pads, ws)


def conv2d_bwd(res: ConvRes, dy, *, need_dx=True):
    """VJP of conv2d_fwd.

    dy : (N, Ho, Wo, Cout). Returns (dx (N, H, W, Cin) or None when need_dx is False,
    dw (kh, kw, Cin, Cout), db (Cout,) or None when the forward had no bias).
    """
    return _conv_bwd(res, dy, need_dx)


def conv3d_causal_fwd(x, w, b, *, stride=1, pad=0, ws=None):
    """Causal 3-D convolution, NTHWC: output frame t sees input frames t-kt+1..t.

    Parameters
    ----------
    x : (N, T, H, W, Cin) float array
    w : (kt, kh, kw, Cin, Cout), same dtype as x
    b : (Cout,) or None
    stride, pad : spatial only, int or (sh, sw) / (ph, pw), as in conv2d_fwd. Time has stride 1
        and kt-1 zero frames before frame 0 (none after).
    ws : dict or None, the caller's per-layer workspace (see the module docstring)

    Returns
    -------
    y : (N, T, Ho, Wo, Cout)
    res : ConvRes
    """
    op = "conv3d_causal_fwd"
    strides = _pair(op, "stride", stride, 2, 1)
    pads = _pair(op, "pad", pad, 2, 0)
    if getattr(w, "ndim", 0) != 5:
        raise ValueError(f"{op}: w must be (kt, kh, kw, Cin, Cout), got {getattr(w, 'shape', w)}")
    kt = w.shape[0]
    return _conv_fwd(op, x, w, b, (1,) + strides, (kt - 1,) + pads, (0,) + pads, ws)


def conv3d_causal_bwd(res: ConvRes, dy, *, need_dx=True):
    """VJP of conv3d_causal_fwd.

    dy : (N, T, Ho, Wo, Cout). Returns (dx (N, T, H, W, Cin) or None, dw (kt, kh, kw, Cin, Cout),
    db (Cout,) or None).
    """
    return _conv_bwd(res, dy, need_dx)
