"""Winograd F(2x2, 3x3): the fast path of conv2d for 3x3 kernels with stride 1 (NHWC).

Shape legend
------------
N          batch
H, W       input height and width;  Ho, Wo  output height and width (Ho = H + 2p - 2)
Cin, Cout  input and output channels
p          symmetric zero padding (0, 1 or 2)
th, tw     output tiles along height and width: ceil(Ho / 2), ceil(Wo / 2)
T          number of tiles, N*th*tw
e          one of the 16 Winograd "frequencies" (a, b) of a 4x4 tile, e = 4a + b

The method (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks"): every 2x2
output tile is A^T [ (G g G^T) (.) (B^T d B) ] A summed over Cin, where d is the 4x4 input tile
and g the 3x3 kernel. Summing over Cin of the element-wise product is, for every e, a GEMM:

    V (16, T, Cin) = B^T d B          input transform (element-wise, from strided views of x)
    U (16, Cin, Cout) = G g G^T       weight transform
    M (16, T, Cout) = V @ U           16 GEMMs with 4/9 of the flops of im2col's one GEMM
    y = A^T M A                       output transform (element-wise)

Backward: dw = G^T [ V^T @ (A dy A^T) ] G (16 GEMMs again, V kept from the forward), and dx is
the forward of dy with the kernel rotated by 180 degrees and Cin/Cout swapped, padding 2-p.
The results equal im2col's up to float rounding (Winograd F(2x2, 3x3) loses about one more bit).
The GEMMs and the output transform run a chunk of images at a time on the CPU (M stays in
cache), all of them at once on a device.

Workspace: with a ``ws`` dict, the padded input, V, M and their dx twins are cached in it, as
the im2col buffers are (see conv.py).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ssmpi import backend

__all__ = ["WinoRes", "wino_fwd", "wino_bwd"]

# G (4x3): the kernel transform; U[a, b] = sum_ij G[a, i] g[i, j] G[b, j] is one GEMM with
# the Kronecker product (16, 9). _GG_ROT does the same for the kernel rotated by 180 degrees.
_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
_GG = np.kron(_G, _G)  # (16 = 4a + b, 9 = 3i + j)
_GG_ROT = _GG[:, ::-1].copy()  # column (i, j) -> (2 - i, 2 - j)


class WinoRes(NamedTuple):
    """What conv2d_bwd needs after a Winograd forward."""

    v: Any  # (16, T, Cin) transformed input tiles (may live in ws)
    w: Any  # (3, 3, Cin, Cout)
    x_shape: tuple
    y_shape: tuple
    pad: int
    has_bias: bool
    ws: dict | None
    op: str


def _buf(ws, name, key, xp, shape, dtype, zero=False):
    """A cached buffer (ws given) or a fresh one; a cached zeroed one keeps its zero border."""
    if ws is not None:
        hit = ws.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
    a = (xp.zeros if zero else xp.empty)(shape, dtype=dtype)
    if ws is not None:
        ws[name] = (key, a)
    return a


def _weights(xp, w, rot=False):
    """U (16, Cin, Cout) = G g G^T for every (Cin, Cout) (g rotated by 180 degrees if rot)."""
    gg = xp.asarray(_GG_ROT if rot else _GG, dtype=w.dtype)
    w2 = xp.ascontiguousarray(w).reshape(9, -1)
    return xp.matmul(gg, w2).reshape(16, w.shape[2], w.shape[3])


def _input_transform(xp, x, p, th, tw, ws, tag):
    """V (16, T, C) = B^T d B for the 4x4 input tiles (stride 2) of x padded by p."""
    n, h, w, c = x.shape
    key = (tuple(x.shape), p, th, tw, str(x.dtype), xp.__name__)
    # the padded input: its border is zeroed once and never written
    xpad = _buf(ws, tag + "pad", key, xp, (n, 2 * th + 2, 2 * tw + 2, c), x.dtype, zero=True)
    xpad[:, p:p + h, p:p + w] = x
    vshape = (4, 4, n, th, tw, c)
    v = _buf(ws, tag + "v", (vshape, str(x.dtype), xp.__name__), xp, vshape, x.dtype)
    t = _buf(ws, tag + "t", key, xp, (4, n, th, tw, c), x.dtype)

    def d(i, j):  # (N, th, tw, C): element (i, j) of every input tile
        return xpad[:, i:i + 2 * th - 1:2, j:j + 2 * tw - 1:2]

    # rows of B^T: [1 0 -1 0], [0 1 1 0], [0 -1 1 0], [0 1 0 -1]
    for a in range(4):
        for j in range(4):  # t[j] = (B^T d)[a, j]
            if a == 0:
                xp.subtract(d(0, j), d(2, j), out=t[j])
            elif a == 1:
                xp.add(d(1, j), d(2, j), out=t[j])
            elif a == 2:
                xp.subtract(d(2, j), d(1, j), out=t[j])
            else:
                xp.subtract(d(1, j), d(3, j), out=t[j])
        xp.subtract(t[0], t[2], out=v[a, 0])  # (B^T d B)[a, b]
        xp.add(t[1], t[2], out=v[a, 1])
        xp.subtract(t[2], t[1], out=v[a, 2])
        xp.subtract(t[1], t[3], out=v[a, 3])
    return v.reshape(16, n * th * tw, c)


def _output_transform(xp, m, s, y):
    """y (n, 2th, 2tw, C) = A^T M A for every tile; M (16, n*th*tw, C), s scratch (2, 4, ...)."""
    n, th2, tw2, c = y.shape
    m = m.reshape(4, 4, n, th2 // 2, tw2 // 2, c)
    s = s.reshape(2, 4, n, th2 // 2, tw2 // 2, c)
    # rows of A^T: [1 1 1 0], [0 1 -1 -1]
    s0, s1 = s[0], s[1]  # (4b, n, th, tw, C)
    xp.add(m[0], m[1], out=s0)
    xp.add(s0, m[2], out=s0)
    xp.subtract(m[1], m[2], out=s1)
    xp.subtract(s1, m[3], out=s1)
    for r, sr in ((0, s0), (1, s1)):
        o = y[:, r::2, 0::2]
        xp.add(sr[0], sr[1], out=o)
        xp.add(o, sr[2], out=o)
        o = y[:, r::2, 1::2]
        xp.subtract(sr[1], sr[2], out=o)
        xp.subtract(o, sr[3], out=o)


# The GEMM and the output transform run a few images at a time, so that each chunk of M is
# still in cache for the output transform (and M and its scratch stay small).
CHUNK_BYTES = 8 << 20
CHUNK_MIN_ROWS = 512


def _chunk(n, tiles_per_image, cout):
    per_image = 16 * tiles_per_image * cout * 4
    nb = max(1, CHUNK_BYTES // max(per_image, 1), -(-CHUNK_MIN_ROWS // max(tiles_per_image, 1)))
    nb = min(n, nb)
    return -(-n // -(-n // nb))  # balanced


def _conv(xp, x, u, p, ws, tag):
    """(y, V): the Winograd convolution of x (N, H, W, Cin) with U (16, Cin, Cout), pad p."""
    n, h, wd, cin = x.shape
    cout = u.shape[2]
    ho, wo = h + 2 * p - 2, wd + 2 * p - 2
    th, tw = -(-ho // 2), -(-wo // 2)
    v = _input_transform(xp, x, p, th, tw, ws, tag)  # (16, T, Cin)
    # a device has no cache to fit in: one batched GEMM over every image (as conv.py's im2col)
    nb = _chunk(n, th * tw, cout) if xp is np else n
    key = (tuple(x.shape), tuple(u.shape), p, nb, str(x.dtype), xp.__name__)
    m = _buf(ws, tag + "m", key, xp, (16, nb * th * tw, cout), x.dtype)
    s = _buf(ws, tag + "s", key, xp, (2, 4, nb * th * tw, cout), x.dtype)
    even = 2 * th == ho and 2 * tw == wo
    y = xp.empty((n, 2 * th, 2 * tw, cout), dtype=x.dtype)
    for n0 in range(0, n, nb):
        n1 = min(n, n0 + nb)
        rows = (n1 - n0) * th * tw
        mc = m[:, :rows]
        xp.matmul(v[:, n0 * th * tw:n1 * th * tw], u, out=mc)
        _output_transform(xp, mc, s[:, :, :rows], y[n0:n1])
    if not even:
        y = xp.ascontiguousarray(y[:, :ho, :wo])
    return y, v


def wino_fwd(op, x, w, b, pad, y_shape, ws):
    """conv2d forward, 3x3, stride 1, padding ``pad``; arguments already validated."""
    xp = backend.get_array_module(x)
    y, v = _conv(xp, x, _weights(xp, w), pad, ws, "wino_")
    if b is not None:
        y += b
    return y, WinoRes(v, w, tuple(x.shape), tuple(y_shape), pad, b is not None, ws, op)


def wino_bwd(res: WinoRes, dy, need_dx):
    """(dx or None, dw, db or None) for a Winograd forward; dy (N, Ho, Wo, Cout) validated."""
    xp = backend.get_array_module(dy)
    n, h, wd, cin = res.x_shape
    _, ho, wo, cout = res.y_shape
    th, tw = -(-ho // 2), -(-wo // 2)
    dtype = res.v.dtype
    dy = xp.ascontiguousarray(dy, dtype=dtype)
    db = dy.reshape(-1, cout).sum(axis=0) if res.has_bias else None
    # dM (16, T, Cout) = A dy A^T for every 2x2 tile of dy (zero beyond Ho, Wo)
    if 2 * th != ho or 2 * tw != wo:
        dyp = xp.zeros((n, 2 * th, 2 * tw, cout), dtype=dtype)
        dyp[:, :ho, :wo] = dy
    else:
        dyp = dy
    # dM is dead once dU is computed: it shares its buffer with the dx path's V (same shape
    # whenever dx has dy's tile grid, e.g. pad 1)
    dshape = (4, 4, n, th, tw, cout)
    dm = _buf(res.ws, "wino_dx_v", (dshape, str(dtype), xp.__name__), xp, dshape, dtype)
    # rows of A: [1 0], [1 1], [1 -1], [0 -1]
    r = [dyp[:, 0::2], None, None, None]  # (N, th, 2tw, Cout) for a = 0..3 (r[3] negated)
    r[1] = dyp[:, 0::2] + dyp[:, 1::2]
    r[2] = dyp[:, 0::2] - dyp[:, 1::2]
    r[3] = dyp[:, 1::2]
    for a in range(4):
        ra = r[a]
        sign = -1 if a == 3 else 1
        e0, e1 = ra[:, :, 0::2], ra[:, :, 1::2]
        if sign > 0:
            dm[a, 0] = e0
            xp.add(e0, e1, out=dm[a, 1])
            xp.subtract(e0, e1, out=dm[a, 2])
            xp.negative(e1, out=dm[a, 3])
        else:
            xp.negative(e0, out=dm[a, 0])
            xp.add(e0, e1, out=dm[a, 1])
            xp.negative(dm[a, 1], out=dm[a, 1])
            xp.subtract(e1, e0, out=dm[a, 2])
            dm[a, 3] = e1
    dm = dm.reshape(16, n * th * tw, cout)
    du = xp.matmul(res.v.transpose(0, 2, 1), dm)  # (16, Cin, Cout)
    gg_t = xp.asarray(_GG.T, dtype=dtype)  # dg[i, j] = sum_ab G[a, i] G[b, j] dU[a, b]
    dw = xp.matmul(gg_t, du.reshape(16, -1)).reshape(res.w.shape)
    if not need_dx:
        return None, dw, db
    # dx: dy convolved with the rotated kernel, channels swapped: U (16, Cout, Cin) as a view
    u_rot = _weights(xp, res.w, rot=True).transpose(0, 2, 1)
    dx, _ = _conv(xp, dy, u_rot, 2 - res.pad, res.ws, "wino_dx_")
    return dx, dw, db
