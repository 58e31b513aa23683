"""Losses: softmax cross-entropy (classification) and mean squared error (reconstruction).

Shape legend
------------
N   batch
K   classes
... any shape (mse: y and target agree)

Losses are 0-d arrays of the input's dtype (on the input's device).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ssmpi import backend
from ssmpi.nn.ops.checks import check_float as _check_float

__all__ = ["XentRes", "MseRes", "softmax_xent_fwd", "softmax_xent_bwd", "mse_fwd", "mse_bwd"]


class XentRes(NamedTuple):
    probs: Any  # (N, K) softmax of the logits (used for accuracy too)
    labels: Any  # (N,) int, on the logits' device
    nll: Any = None  # (N,) -log softmax(logits)[label] of every sample (the loss before the mean)


class MseRes(NamedTuple):
    diff: Any  # (...) y - target



def softmax_xent_fwd(logits, labels):
    """Mean over the batch of -log softmax(logits)[label], via log-sum-exp.

    logits : (N, K) float; labels : (N,) int in [0, K). Returns (loss 0-d, XentRes).
    """
    op = "softmax_xent_fwd"
    xp = backend.get_array_module(logits)
    _check_float(op, "logits", logits)
    if logits.ndim != 2:
        raise ValueError(f"{op}: logits must be (N, K), got {tuple(logits.shape)}")
    labels = xp.asarray(labels)
    n, k = logits.shape
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{op}: labels must be integers, got dtype {labels.dtype}")
    if tuple(labels.shape) != (n,):
        raise ValueError(f"{op}: labels {tuple(labels.shape)} do not match logits "
                         f"{tuple(logits.shape)}")
    if n == 0:
        raise ValueError(f"{op}: empty batch, logits {tuple(logits.shape)}")
    if bool(xp.any(labels < 0)) or bool(xp.any(labels >= k)):
        raise ValueError(f"{op}: labels out of range [0, {k}) for logits {tuple(logits.shape)}")
    z = logits - logits.max(axis=1, keepdims=True)  # (N, K) <= 0
    e = xp.exp(z)
    s = e.sum(axis=1, keepdims=True)  # (N, 1) in [1, K]
    lse = xp.log(s)  # (N, 1)
    rows = xp.arange(n)
    picked = z[rows, labels]  # (N,)
    nll = lse[:, 0] - picked  # (N,)
    loss = nll.mean(dtype=logits.dtype)
    probs = e / s
    return xp.asarray(loss, dtype=logits.dtype), XentRes(probs, labels, nll)


def softmax_xent_bwd(res: XentRes, dloss=1.0):
    """VJP of softmax_xent_fwd: dloss (scalar) -> dlogits (N, K) = (probs - onehot) dloss / N."""
    xp = backend.get_array_module(res.probs)
    n = res.probs.shape[0]
    g = res.probs.copy()
    g[xp.arange(n), res.labels] -= 1
    g *= xp.asarray(dloss, dtype=g.dtype) / n
    return g


def mse_fwd(y, target):
    """Mean over all elements of (y - target)^2. y, target : (...) same shape and dtype."""
    op = "mse_fwd"
    _check_float(op, "y", y)
    _check_float(op, "target", target)
    if tuple(y.shape) != tuple(target.shape):
        raise ValueError(f"{op}: y {tuple(y.shape)} and target {tuple(target.shape)} differ")
    if y.size == 0:
        raise ValueError(f"{op}: empty input {tuple(y.shape)}")
    xp = backend.get_array_module(y)
    diff = y - target.astype(y.dtype, copy=False)
    loss = xp.mean(diff * diff, dtype=y.dtype)
    return xp.asarray(loss, dtype=y.dtype), MseRes(diff)


def mse_bwd(res: MseRes, dloss=1.0):
    """VJP of mse_fwd: dloss (scalar) -> dy (...) = 2 (y - target) dloss / size."""
    xp = backend.get_array_module(res.diff)
    d = res.diff
    return d * (xp.asarray(dloss, dtype=d.dtype) * (2.0 / d.size))
