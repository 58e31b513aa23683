"""Finite-difference check of a VJP, in float64, along random directions.

Shape legend
------------
inputs   a list of arrays x_i of any shapes
y        the output of f (any shape, a 0-d loss included)
v_i      a random direction with the shape of x_i
dy       a cotangent with the shape of y

For every input i with a cotangent, the check compares

    analytic = < vjp(dy)_i , v_i >
    numeric  = < (f(.., x_i + eps v_i, ..) - f(.., x_i - eps v_i, ..)) / (2 eps) , dy >

and fails when |analytic - numeric| > atol + rtol * |numeric|, printing both numbers.
"""

from __future__ import annotations

import numpy as np

from ssmpi import backend

__all__ = ["check_vjp"]


def _dot(xp, a, b):
    return float(xp.sum(xp.asarray(a, dtype=xp.float64) * xp.asarray(b, dtype=xp.float64)))


def check_vjp(f, inputs, dy=None, *, eps=1e-6, rtol=1e-6, atol=1e-9, rng, n_dirs=1):
    """Assert that f's VJP matches central finite differences.

    Parameters
    ----------
    f : callable, ``f(*inputs) -> (y, vjp)`` where ``vjp(dy)`` returns a sequence with one
        cotangent per input (None for an input that is not differentiated, e.g. labels).
    inputs : list of arrays (NumPy or CuPy); floating ones are cast to float64 first.
    dy : cotangent of y; random normal when None (1.0 for a 0-d y).
    eps, rtol, atol : step and tolerances.
    rng : numpy.random.Generator for the directions (and dy).
    n_dirs : random directions per input.

    Returns the list of (input index, analytic, numeric) that were compared.
    """
    xp = backend.get_array_module(*inputs)
    xs = [xp.asarray(a, dtype=xp.float64) if getattr(a, "dtype", None) is not None
          and a.dtype.kind == "f" else a for a in inputs]
    y, vjp = f(*xs)
    if dy is None:
        if getattr(y, "ndim", 0) == 0:
            dy = xp.asarray(1.0)
        else:
            dy = xp.asarray(rng.standard_normal(y.shape))
    dy = xp.asarray(dy, dtype=xp.float64)
    grads = list(vjp(dy))
    if len(grads) != len(xs):
        raise AssertionError(f"check_vjp: vjp returned {len(grads)} cotangents for "
                             f"{len(xs)} inputs")
    results = []
    for i, (x, g) in enumerate(zip(xs, grads)):
        if g is None:
            continue
        if tuple(g.shape) != tuple(x.shape):
            raise AssertionError(f"check_vjp: cotangent {i} has shape {tuple(g.shape)}, "
                                 f"input has {tuple(x.shape)}")
        for _ in range(n_dirs):
            v = xp.asarray(rng.standard_normal(x.shape))
            plus = list(xs)
            minus = list(xs)
            plus[i] = x + eps * v
            minus[i] = x - eps * v
            yp = f(*plus)[0]
            ym = f(*minus)[0]
            numeric = _dot(xp, (xp.asarray(yp, dtype=xp.float64)
                                - xp.asarray(ym, dtype=xp.float64)) / (2 * eps), dy)
            analytic = _dot(xp, g, v)
            results.append((i, analytic, numeric))
            if not np.abs(analytic - numeric) <= atol + rtol * np.abs(numeric):
                raise AssertionError(
                    f"check_vjp: input {i} (shape {tuple(x.shape)}): analytic <vjp(dy), v> = "
                    f"{analytic!r}, numeric finite difference = {numeric!r}, "
                    f"|diff| = {abs(analytic - numeric):.3e} > atol {atol:g} + rtol {rtol:g}")
    return results
