"""Weight initialisers (NumPy arrays on the host; move them to the device yourself).

Shape legend
------------
shape    any tuple, e.g. (kh, kw, Cin, Cout) for a conv, (Din, Dout) for a linear layer
fan_in   inputs feeding one output: kh*kw*Cin (conv), Din (linear)
fan_out  outputs fed by one input: kh*kw*Cout (conv), Dout (linear)

Draws are made in float64 and then cast, so a seed gives the same weights in every dtype
(up to rounding).
"""

from __future__ import annotations

import numpy as np

__all__ = ["he_normal", "glorot_uniform"]


def _check(op, rng, **fans):
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"{op}: rng must be a numpy.random.Generator, got {type(rng).__name__}")
    for name, v in fans.items():
        if not v > 0:
            raise ValueError(f"{op}: {name} must be positive, got {v!r}")


def he_normal(shape, fan_in, rng, dtype=np.float32):
    """N(0, 2/fan_in) draws of the given shape (He et al. 2015, for ReLU nets)."""
    _check("he_normal", rng, fan_in=fan_in)
    std = np.sqrt(2.0 / fan_in)
    return (rng.standard_normal(shape) * std).astype(dtype)


def glorot_uniform(shape, fan_in, fan_out, rng, dtype=np.float32):
    """U(-a, a) draws with a = sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio 2010)."""
    _check("glorot_uniform", rng, fan_in=fan_in, fan_out=fan_out)
    a = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-a, a, size=shape).astype(dtype)
