"""Pooling: forward vs loop references and PyTorch, VJPs vs finite differences, errors."""

import numpy as np
import pytest

from ssmpi import backend
from ssmpi.nn.ops import (
    avgpool2d_bwd,
    avgpool2d_fwd,
    global_avgpool_bwd,
    global_avgpool_fwd,
    maxpool2d_bwd,
    maxpool2d_fwd,
)
from ssmpi.nn.ops.gradcheck import check_vjp
from ssmpi.nn.ops.reference import avgpool2d_ref, maxpool2d_ref

# (N, H, W, C, k, stride)
POOL_CASES = [
    (2, 8, 6, 3, 2, None),
    (1, 7, 7, 2, 2, None),  # odd size: the last row / column is dropped
    (2, 9, 9, 2, 3, None),
    (1, 7, 8, 2, 3, 2),  # overlapping windows
    (1, 6, 6, 3, 3, 1),
    (2, 5, 5, 1, 1, 1),
]


def _distinct(rng, xp, shape):
    """Values with gaps >= 1e-3 between any two, so finite differences never cross a tie."""
    v = rng.permutation(int(np.prod(shape))).reshape(shape) * 1e-2
    return xp.asarray(v + rng.uniform(-1e-3, 1e-3, size=shape))


@pytest.mark.parametrize("case", POOL_CASES)
def test_maxpool_forward_and_vjp(xp, case):
    n, h, w, c, k, s = case
    rng = np.random.default_rng(0)
    x = _distinct(rng, xp, (n, h, w, c))
    y, _ = maxpool2d_fwd(x, k, s)
    np.testing.assert_array_equal(backend.asnumpy(y), maxpool2d_ref(backend.asnumpy(x), k, s))

    def f(x_):
        y_, r = maxpool2d_fwd(x_, k, s)
        return y_, lambda dy: (maxpool2d_bwd(r, dy),)
    check_vjp(f, [x], rng=rng, eps=1e-5)


@pytest.mark.parametrize("case", POOL_CASES)
def test_avgpool_forward_and_vjp(xp, case):
    n, h, w, c, k, s = case
    rng = np.random.default_rng(1)
    x = xp.asarray(rng.standard_normal((n, h, w, c)))
    y, _ = avgpool2d_fwd(x, k, s)
    np.testing.assert_allclose(backend.asnumpy(y), avgpool2d_ref(backend.asnumpy(x), k, s),
                               rtol=1e-12, atol=1e-14)

    def f(x_):
        y_, r = avgpool2d_fwd(x_, k, s)
        return y_, lambda dy: (avgpool2d_bwd(r, dy),)
    check_vjp(f, [x], rng=rng)


def test_maxpool_ties_go_to_first_max(xp):
    x = xp.zeros((1, 2, 2, 1))
    y, r = maxpool2d_fwd(x, 2)
    dx = backend.asnumpy(maxpool2d_bwd(r, xp.ones((1, 1, 1, 1))))
    np.testing.assert_array_equal(dx[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])
    x = xp.asarray(np.array([1.0, 3.0, 3.0, 2.0]).reshape(1, 2, 2, 1))
    y, r = maxpool2d_fwd(x, 2)
    dx = backend.asnumpy(maxpool2d_bwd(r, xp.ones((1, 1, 1, 1))))
    np.testing.assert_array_equal(dx[0, :, :, 0], [[0.0, 1.0], [0.0, 0.0]])


def test_overlapping_maxpool_accumulates(xp):
    """One input that wins two overlapping windows receives both gradients."""
    x = xp.asarray(np.array([0, 0, 0, 0, 9, 0, 0, 0, 0], dtype=np.float64).reshape(1, 3, 3, 1))
    y, r = maxpool2d_fwd(x, 2, 1)
    dx = backend.asnumpy(maxpool2d_bwd(r, xp.asarray(np.arange(1.0, 5.0).reshape(1, 2, 2, 1))))
    assert dx[0, 1, 1, 0] == 10.0 and dx.sum() == 10.0


def test_global_avgpool(xp):
    rng = np.random.default_rng(2)
    x = xp.asarray(rng.standard_normal((2, 3, 5, 4)))
    y, _ = global_avgpool_fwd(x)
    assert y.shape == (2, 4)
    np.testing.assert_allclose(backend.asnumpy(y), backend.asnumpy(x).mean(axis=(1, 2)),
                               rtol=1e-12)

    def f(x_):
        y_, r = global_avgpool_fwd(x_)
        return y_, lambda dy: (global_avgpool_bwd(r, dy),)
    check_vjp(f, [x], rng=rng)


def test_pool_float32_and_not_mutated(xp):
    rng = np.random.default_rng(3)
    x = xp.asarray(rng.standard_normal((2, 6, 6, 3)).astype(np.float32))
    x0 = x.copy()
    for fwd, bwd, args in [(maxpool2d_fwd, maxpool2d_bwd, (2,)), (avgpool2d_fwd, avgpool2d_bwd,
                                                                  (3, 1)),
                           (global_avgpool_fwd, global_avgpool_bwd, ())]:
        y, r = fwd(x, *args)
        dy = xp.ones_like(y)
        dx = bwd(r, dy)
        assert y.dtype == np.float32 and dx.dtype == np.float32 and dx.shape == x.shape
        np.testing.assert_array_equal(backend.asnumpy(dy), 1.0)
    np.testing.assert_array_equal(backend.asnumpy(x), backend.asnumpy(x0))


@pytest.mark.parametrize("fn,args,match", [
    (maxpool2d_fwd, ((1, 3, 3, 2), 4), r"maxpool2d_fwd: window 4x4 larger than the input"),
    (maxpool2d_fwd, ((1, 3, 3, 2), 2, 0), "maxpool2d_fwd: stride must be a positive int"),
    (avgpool2d_fwd, ((3, 3, 2), 2), r"avgpool2d_fwd: x must be \(N, H, W, C\)"),
    (avgpool2d_fwd, ((1, 4, 4, 2), 0), "avgpool2d_fwd: k must be"),
    (global_avgpool_fwd, ((4, 2),), "global_avgpool_fwd"),
])
def test_pool_bad_arguments(xp, fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(xp.zeros(args[0]), *args[1:])
    with pytest.raises(ValueError, match="maxpool2d_fwd: x must be a floating"):
        maxpool2d_fwd(xp.zeros((1, 4, 4, 1), dtype=np.int64))


def test_pool_bad_dy(xp):
    y, r = maxpool2d_fwd(xp.zeros((1, 4, 4, 2)), 2)
    with pytest.raises(ValueError, match=r"maxpool2d_bwd: dy \(1, 2, 2, 3\) does not match"):
        maxpool2d_bwd(r, xp.zeros((1, 2, 2, 3)))
    y, r = avgpool2d_fwd(xp.zeros((1, 4, 4, 2)), 2)
    with pytest.raises(ValueError, match="avgpool2d_bwd: dy"):
        avgpool2d_bwd(r, xp.zeros((1, 4, 4, 2)))


@pytest.mark.parametrize("case", POOL_CASES)
def test_pool_matches_torch(case):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    n, h, w, c, k, s = case
    rng = np.random.default_rng(4)
    x = _distinct(rng, np, (n, h, w, c))
    for fwd, bwd, tf in [(maxpool2d_fwd, maxpool2d_bwd, F.max_pool2d),
                         (avgpool2d_fwd, avgpool2d_bwd, F.avg_pool2d)]:
        y, r = fwd(x, k, s)
        dy = rng.standard_normal(y.shape)
        dx = bwd(r, dy)
        tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
        ty = tf(tx, k, s)
        ty.backward(torch.tensor(dy.transpose(0, 3, 1, 2)))
        np.testing.assert_allclose(y, ty.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-12)
        np.testing.assert_allclose(dx, tx.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-12,
                                   atol=1e-14)
