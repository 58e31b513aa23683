"""Skip-Sideways fusion (concat / add) and the tau shape-matching maps."""

import numpy as np
import pytest

from ssmpi import backend
from ssmpi.nn.ops import fuse_bwd, fuse_fwd, tau_bwd, tau_fwd, tau_out_shape
from ssmpi.nn.ops.gradcheck import check_vjp
from ssmpi.nn.ops.reference import maxpool2d_ref


def _fuse_f(mode, n):
    def f(*xs):
        y, r = fuse_fwd(list(xs), mode)
        return y, lambda dy: fuse_bwd(r, dy)
    return f


def test_concat(xp):
    rng = np.random.default_rng(0)
    a, b, c = (xp.asarray(rng.standard_normal((2, 3, 3, k))) for k in (4, 1, 2))
    y, r = fuse_fwd([a, b, c], "concat")
    assert y.shape == (2, 3, 3, 7)
    np.testing.assert_array_equal(backend.asnumpy(y[..., 4:5]), backend.asnumpy(b))
    grads = fuse_bwd(r, y)
    for g, x in zip(grads, (a, b, c)):
        assert g.flags.c_contiguous
        np.testing.assert_array_equal(backend.asnumpy(g), backend.asnumpy(x))
    check_vjp(_fuse_f("concat", 3), [a, b, c], rng=rng)


def test_add(xp):
    rng = np.random.default_rng(1)
    a, b = (xp.asarray(rng.standard_normal((2, 3, 3, 4))) for _ in range(2))
    a0 = a.copy()
    y, r = fuse_fwd([a, b], "add")
    np.testing.assert_allclose(backend.asnumpy(y), backend.asnumpy(a + b))
    np.testing.assert_array_equal(backend.asnumpy(a), backend.asnumpy(a0))
    grads = fuse_bwd(r, y)
    assert len(grads) == 2 and grads[0] is not grads[1]
    check_vjp(_fuse_f("add", 2), [a, b], rng=rng)


def test_fuse_errors(xp):
    a = xp.zeros((2, 3, 3, 4))
    with pytest.raises(ValueError, match=r"fuse_fwd: concat inputs must agree.*\(2, 2, 3, 4\)"):
        fuse_fwd([a, xp.zeros((2, 2, 3, 4))], "concat")
    with pytest.raises(ValueError, match="fuse_fwd: add inputs must have equal shapes"):
        fuse_fwd([a, xp.zeros((2, 3, 3, 5))], "add")
    with pytest.raises(ValueError, match="fuse_fwd: mode"):
        fuse_fwd([a], "mul")
    with pytest.raises(ValueError, match="fuse_fwd: inputs must share one floating dtype"):
        fuse_fwd([a, a.astype(np.float32)], "add")


@pytest.mark.parametrize("in_shape,out_hw,out_c,expect", [
    ((2, 8, 8, 3), (8, 8), None, (2, 8, 8, 3)),
    ((2, 8, 8, 3), (4, 4), None, (2, 4, 4, 3)),
    ((2, 8, 8, 3), (2, 2), 6, (2, 2, 2, 6)),
    ((2, 8, 8, 3), (4, 4), 5, (2, 4, 4, 5)),
    ((1, 6, 6, 2), (6, 6), 8, (1, 6, 6, 8)),
])
def test_tau(xp, in_shape, out_hw, out_c, expect):
    rng = np.random.default_rng(2)
    v = rng.permutation(int(np.prod(in_shape))).reshape(in_shape) * 1e-2
    h = xp.asarray(v)
    assert tau_out_shape(in_shape, out_hw, out_c) == expect
    y, r = tau_fwd(h, out_hw, out_c)
    assert y.shape == expect
    f = in_shape[1] // out_hw[0]
    pooled = maxpool2d_ref(v, f) if f > 1 else v
    yn = backend.asnumpy(y)
    c = in_shape[-1]
    np.testing.assert_array_equal(yn[..., :c], pooled)
    if out_c is not None and out_c % c == 0:
        for t in range(out_c // c):
            np.testing.assert_array_equal(yn[..., t * c:(t + 1) * c], pooled)
    elif out_c is not None:
        np.testing.assert_array_equal(yn[..., c:], 0.0)

    def fn(h_):
        y_, r_ = tau_fwd(h_, out_hw, out_c)
        return y_, lambda dy: (tau_bwd(r_, dy),)
    check_vjp(fn, [h], rng=rng, eps=1e-5)


@pytest.mark.parametrize("out_hw,out_c,match", [
    ((3, 3), None, "tau_fwd: cannot map h"),  # non-integer factor
    ((16, 16), None, "tau_fwd: cannot map h"),  # upsampling
    ((4, 2), None, "tau_fwd: cannot map h"),  # different factors
    ((4, 4), 2, "tau_fwd: cannot map 3 channels"),
])
def test_tau_errors(xp, out_hw, out_c, match):
    with pytest.raises(ValueError, match=match):
        tau_fwd(xp.zeros((1, 8, 8, 3)), out_hw, out_c)
    with pytest.raises(ValueError, match=match.replace("tau_fwd", "tau_out_shape")):
        tau_out_shape((1, 8, 8, 3), out_hw, out_c)
