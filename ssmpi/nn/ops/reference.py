"""Slow, obviously-correct loop references for the tests (NumPy only, float64 sums).

Shape legend
------------
N batch; T frames; H, W input size; Ho, Wo output size; Cin, Cout, C channels;
kt, kh, kw kernel extents; s stride; p symmetric zero padding.

Each output pixel is computed by an explicit loop over the kernel window with the padding
handled by an index test, not by any slicing trick shared with the fast ops.
"""

from __future__ import annotations

import numpy as np

__all__ = ["conv2d_ref", "conv3d_causal_ref", "maxpool2d_ref", "avgpool2d_ref"]


def _hw(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def conv2d_ref(x, w, b=None, stride=1, pad=0):
    """x (N, H, W, Cin), w (kh, kw, Cin, Cout), b (Cout,) -> y (N, Ho, Wo, Cout)."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    n, h, wd, cin = x.shape
    kh, kw, _, cout = w.shape
    sh, sw = _hw(stride)
    ph, pw = _hw(pad)
    ho = (h + 2 * ph - kh) // sh + 1
    wo = (wd + 2 * pw - kw) // sw + 1
    y = np.zeros((n, ho, wo, cout))
    for oh in range(ho):
        for ow in range(wo):
            for i in range(kh):
                for j in range(kw):
                    ih = oh * sh + i - ph
                    iw = ow * sw + j - pw
                    if 0 <= ih < h and 0 <= iw < wd:
                        y[:, oh, ow, :] += x[:, ih, iw, :] @ w[i, j]
    if b is not None:
        y += np.asarray(b, dtype=np.float64)
    return y


def conv3d_causal_ref(x, w, b=None, stride=1, pad=0):
    """x (N, T, H, W, Cin), w (kt, kh, kw, Cin, Cout) -> y (N, T, Ho, Wo, Cout).

    y[:, t] = sum over d < kt with t - d >= 0 of conv2d(x[:, t - d], w[kt - 1 - d]).
    """
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    t_len = x.shape[1]
    kt = w.shape[0]
    out = None
    for t in range(t_len):
        acc = None
        for d in range(kt):  # d frames back in time
            if t - d < 0:
                continue
            r = conv2d_ref(x[:, t - d], w[kt - 1 - d], None, stride, pad)
            acc = r if acc is None else acc + r
        if out is None:
            out = np.zeros((x.shape[0], t_len) + acc.shape[1:])
        out[:, t] = acc
    if b is not None:
        out += np.asarray(b, dtype=np.float64)
    return out


def _pool_ref(x, k, stride, reduce):
    x = np.asarray(x, dtype=np.float64)
    stride = k if stride is None else stride
    n, h, w, c = x.shape
    ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
    y = np.zeros((n, ho, wo, c))
    for oh in range(ho):
        for ow in range(wo):
            win = x[:, oh * stride:oh * stride + k, ow * stride:ow * stride + k, :]
            y[:, oh, ow, :] = reduce(win.reshape(n, k * k, c), axis=1)
    return y


def maxpool2d_ref(x, k=2, stride=None):
    """x (N, H, W, C) -> y (N, Ho, Wo, C), max over each k x k window."""
    return _pool_ref(x, k, stride, np.max)


def avgpool2d_ref(x, k, stride=None):
    """x (N, H, W, C) -> y (N, Ho, Wo, C), mean over each k x k window."""
    return _pool_ref(x, k, stride, np.mean)
