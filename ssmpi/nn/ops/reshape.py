"""Space-to-depth: fold b x b spatial blocks into channels.

Shape legend
------------
N     batch
H, W  input height and width (multiples of b)
C     input channels
b     block size

y[n, i, j, (bi*b + bj)*C + c] = x[n, i*b + bi, j*b + bj, c]  (TensorFlow's order).
"""

from __future__ import annotations

from typing import NamedTuple

from ssmpi import backend

__all__ = ["SpaceToDepthRes", "space_to_depth_fwd", "space_to_depth_bwd"]


class SpaceToDepthRes(NamedTuple):
    x_shape: tuple  # (N, H, W, C)
    block: int


def space_to_depth_fwd(x, block):
    """x (N, H, W, C) -> y (N, H/b, W/b, C*b*b), a fresh contiguous array."""
    op = "space_to_depth_fwd"
    xp = backend.get_array_module(x)
    if getattr(x, "ndim", 0) != 4:
        raise ValueError(f"{op}: x must be (N, H, W, C), got {getattr(x, 'shape', x)}")
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ValueError(f"{op}: block must be a positive int, got {block!r}")
    n, h, w, c = x.shape
    if h % block or w % block:
        raise ValueError(f"{op}: x {tuple(x.shape)} is not divisible by block {block}")
    b = block
    y = x.reshape(n, h // b, b, w // b, b, c).transpose(0, 1, 3, 2, 4, 5)
    y = xp.ascontiguousarray(y).reshape(n, h // b, w // b, b * b * c)
    return y, SpaceToDepthRes(tuple(x.shape), b)


def space_to_depth_bwd(res: SpaceToDepthRes, dy):
    """VJP of space_to_depth_fwd: dy (N, H/b, W/b, C*b*b) -> dx (N, H, W, C)."""
    op = "space_to_depth_bwd"
    xp = backend.get_array_module(dy)
    n, h, w, c = res.x_shape
    b = res.block
    if tuple(dy.shape) != (n, h // b, w // b, c * b * b):
        raise ValueError(f"{op}: dy {tuple(dy.shape)} does not match y "
                         f"{(n, h // b, w // b, c * b * b)}")
    dx = dy.reshape(n, h // b, w // b, b, b, c).transpose(0, 1, 3, 2, 4, 5)
    return xp.ascontiguousarray(dx).reshape(n, h, w, c)
