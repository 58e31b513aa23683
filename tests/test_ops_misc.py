"""relu, dropout, linear, space-to-depth, losses, initialisers and the gradcheck helper."""

import numpy as np
import pytest

from ssmpi import backend
from ssmpi.nn.ops import (
    dropout_bwd,
    dropout_fwd,
    glorot_uniform,
    he_normal,
    linear_bwd,
    linear_fwd,
    mse_bwd,
    mse_fwd,
    relu_bwd,
    relu_fwd,
    softmax_xent_bwd,
    softmax_xent_fwd,
    space_to_depth_bwd,
    space_to_depth_fwd,
)
from ssmpi.nn.ops.gradcheck import check_vjp


def _away_from_zero(rng, xp, shape):
    v = rng.standard_normal(shape)
    return xp.asarray(v + np.sign(v) * 0.1)


def _pair(fwd, bwd, *fargs, **fkw):
    def f(x):
        y, r = fwd(x, *fargs, **fkw)
        return y, lambda dy: (bwd(r, dy),)
    return f


# ------------------------------------------------------------------------------- relu, dropout


def test_relu(xp):
    rng = np.random.default_rng(0)
    x = _away_from_zero(rng, xp, (3, 4, 5))
    y, r = relu_fwd(x)
    np.testing.assert_array_equal(backend.asnumpy(y), np.maximum(backend.asnumpy(x), 0))
    check_vjp(_pair(relu_fwd, relu_bwd), [x], rng=rng)
    y32, r32 = relu_fwd(x.astype(np.float32))
    assert y32.dtype == np.float32 and relu_bwd(r32, xp.ones_like(y32)).dtype == np.float32
    dx = backend.asnumpy(relu_bwd(relu_fwd(xp.zeros(3))[1], xp.ones(3)))
    np.testing.assert_array_equal(dx, 0.0)  # the gradient at 0 is 0
    with pytest.raises(ValueError, match="relu_fwd: x must be a floating"):
        relu_fwd(xp.zeros(3, dtype=np.int32))
    with pytest.raises(ValueError, match="relu_bwd: dy"):
        relu_bwd(r, xp.zeros((3, 4)))


def test_dropout(xp):
    rng = np.random.default_rng(1)
    x = xp.asarray(rng.standard_normal((200, 50)).astype(np.float32))
    y, r = dropout_fwd(x, 0.25, rng=np.random.default_rng(5), train=True)
    yn = backend.asnumpy(y)
    xn = backend.asnumpy(x)
    kept = yn != 0
    assert abs(kept.mean() - 0.75) < 0.02
    np.testing.assert_allclose(yn[kept], xn[kept] / 0.75, rtol=1e-6)
    assert y.dtype == np.float32
    dx = backend.asnumpy(dropout_bwd(r, xp.ones_like(y)))
    np.testing.assert_allclose(dx, kept / 0.75, rtol=1e-6)
    y2, _ = dropout_fwd(x, 0.25, rng=np.random.default_rng(5), train=True)
    np.testing.assert_array_equal(yn, backend.asnumpy(y2))  # the seed decides the mask
    for kw in ({"train": False}, {"train": True, "p": 0.0}):
        p = kw.pop("p", 0.5)
        y, r = dropout_fwd(x, p, rng=rng, **kw)
        np.testing.assert_array_equal(backend.asnumpy(y), xn)
        np.testing.assert_array_equal(backend.asnumpy(dropout_bwd(r, x)), xn)
    # the VJP with a fixed mask
    xd = xp.asarray(rng.standard_normal((4, 6)))
    check_vjp(lambda a: (lambda yr: (yr[0], lambda dy: (dropout_bwd(yr[1], dy),)))(
        dropout_fwd(a, 0.5, rng=np.random.default_rng(2), train=True)), [xd], rng=rng)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout_fwd: p must be in"):
            dropout_fwd(x, bad, rng=rng, train=True)


# ------------------------------------------------------------------------------------- linear


@pytest.mark.parametrize("n,din,dout", [(1, 1, 1), (4, 7, 3), (5, 3, 8)])
def test_linear(xp, n, din, dout):
    rng = np.random.default_rng(2)
    x, w, b = (xp.asarray(rng.standard_normal(s)) for s in ((n, din), (din, dout), (dout,)))
    y, r = linear_fwd(x, w, b)
    np.testing.assert_allclose(backend.asnumpy(y), backend.asnumpy(x) @ backend.asnumpy(w)
                               + backend.asnumpy(b), rtol=1e-12)

    def f(x_, w_, b_):
        y_, r_ = linear_fwd(x_, w_, b_)
        return y_, lambda dy: linear_bwd(r_, dy)
    check_vjp(f, [x, w, b], rng=rng)
    dx, dw, db = linear_bwd(r, xp.ones_like(y), need_dx=False)
    assert dx is None and dw.shape == (din, dout) and db.shape == (dout,)


def test_linear_errors_and_dtype(xp):
    x = xp.zeros((2, 3), dtype=np.float32)
    w = xp.zeros((3, 4), dtype=np.float32)
    y, r = linear_fwd(x, w, xp.zeros(4, dtype=np.float32))
    assert y.dtype == np.float32
    assert all(g.dtype == np.float32 for g in linear_bwd(r, xp.ones_like(y)))
    with pytest.raises(ValueError, match=r"linear_fwd: x \(2, 3\) and w \(4, 4\)"):
        linear_fwd(x, xp.zeros((4, 4), dtype=np.float32), None)
    with pytest.raises(ValueError, match="linear_fwd: b"):
        linear_fwd(x, w, xp.zeros(5, dtype=np.float32))
    with pytest.raises(ValueError, match="linear_fwd: x must be a floating"):
        linear_fwd(xp.zeros((2, 3), dtype=np.int64), w, None)
    with pytest.raises(ValueError, match="linear_bwd: dy"):
        linear_bwd(r, xp.zeros((2, 5), dtype=np.float32))


def test_linear_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x, w, b = (rng.standard_normal(s) for s in ((5, 7), (7, 3), (3,)))
    y, r = linear_fwd(x, w, b)
    dy = rng.standard_normal(y.shape)
    dx, dw, db = linear_bwd(r, dy)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w.T.copy(), b))
    ty = torch.nn.functional.linear(tx, tw, tb)
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(dw, tw.grad.numpy().T, rtol=1e-12)
    np.testing.assert_allclose(db, tb.grad.numpy(), rtol=1e-12)


# ----------------------------------------------------------------------------- space-to-depth


def test_space_to_depth(xp):
    rng = np.random.default_rng(4)
    x = xp.asarray(rng.standard_normal((2, 4, 6, 3)))
    y, r = space_to_depth_fwd(x, 2)
    assert y.shape == (2, 2, 3, 12)
    xn, yn = backend.asnumpy(x), backend.asnumpy(y)
    # y[n, i, j, (bi*b + bj)*C + c] = x[n, i*b + bi, j*b + bj, c]
    assert yn[1, 1, 2, (1 * 2 + 0) * 3 + 2] == xn[1, 3, 4, 2]
    assert yn[0, 0, 1, (0 * 2 + 1) * 3 + 1] == xn[0, 0, 3, 1]
    np.testing.assert_array_equal(backend.asnumpy(space_to_depth_bwd(r, y)), xn)
    check_vjp(_pair(space_to_depth_fwd, space_to_depth_bwd, 2), [x], rng=rng)
    with pytest.raises(ValueError, match=r"space_to_depth_fwd: x \(2, 4, 6, 3\) is not divisible"):
        space_to_depth_fwd(x, 4)


# ------------------------------------------------------------------------------------- losses


def test_softmax_xent(xp):
    rng = np.random.default_rng(5)
    logits = xp.asarray(rng.standard_normal((6, 5)) * 3)
    labels = xp.asarray(np.array([0, 4, 2, 2, 1, 3]))
    loss, r = softmax_xent_fwd(logits, labels)
    ln = backend.asnumpy(logits)
    p = np.exp(ln) / np.exp(ln).sum(1, keepdims=True)
    expect = -np.mean(np.log(p[np.arange(6), backend.asnumpy(labels)]))
    assert loss.ndim == 0 and loss.dtype == np.float64
    np.testing.assert_allclose(float(loss), expect, rtol=1e-12)
    np.testing.assert_allclose(backend.asnumpy(r.probs), p, rtol=1e-12)

    def f(z):
        l_, r_ = softmax_xent_fwd(z, labels)
        return l_, lambda d: (softmax_xent_bwd(r_, d),)
    check_vjp(f, [logits], rng=rng)
    check_vjp(f, [logits], dy=0.37, rng=rng)
    # stable for huge logits
    big = xp.asarray(np.array([[1000.0, 0.0], [0.0, -1000.0]], dtype=np.float32))
    loss, r = softmax_xent_fwd(big, xp.asarray(np.array([1, 0])))
    assert loss.dtype == np.float32 and np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), 500.0, rtol=1e-6)
    assert softmax_xent_bwd(r).dtype == np.float32


def test_softmax_xent_errors(xp):
    z = xp.zeros((3, 4))
    with pytest.raises(ValueError, match=r"softmax_xent_fwd: labels out of range \[0, 4\)"):
        softmax_xent_fwd(z, xp.asarray(np.array([0, 4, 1])))
    with pytest.raises(ValueError, match="softmax_xent_fwd: labels out of range"):
        softmax_xent_fwd(z, xp.asarray(np.array([0, -1, 1])))
    with pytest.raises(ValueError, match="softmax_xent_fwd: labels must be integers"):
        softmax_xent_fwd(z, xp.asarray(np.array([0.0, 1.0, 1.0])))
    with pytest.raises(ValueError, match=r"softmax_xent_fwd: labels \(2,\) do not match"):
        softmax_xent_fwd(z, xp.asarray(np.array([0, 1])))
    with pytest.raises(ValueError, match="softmax_xent_fwd: logits must be a floating"):
        softmax_xent_fwd(xp.zeros((3, 4), dtype=np.int32), xp.asarray(np.array([0, 1, 2])))


def test_mse(xp):
    rng = np.random.default_rng(6)
    y, t = (xp.asarray(rng.standard_normal((2, 3, 4))) for _ in range(2))
    loss, r = mse_fwd(y, t)
    np.testing.assert_allclose(float(loss), np.mean((backend.asnumpy(y)
                                                     - backend.asnumpy(t)) ** 2), rtol=1e-12)

    def f(a, b):
        l_, r_ = mse_fwd(a, b)
        return l_, lambda d: (mse_bwd(r_, d), None)
    check_vjp(f, [y, t], dy=2.5, rng=rng)
    with pytest.raises(ValueError, match=r"mse_fwd: y \(2, 3, 4\) and target \(2, 3\)"):
        mse_fwd(y, t[:, :, 0])
    l32, r32 = mse_fwd(y.astype(np.float32), t.astype(np.float32))
    assert l32.dtype == np.float32 and mse_bwd(r32).dtype == np.float32


def test_losses_match_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(7)
    z = rng.standard_normal((5, 4)) * 2
    lab = np.array([3, 0, 1, 1, 2])
    loss, r = softmax_xent_fwd(z, lab)
    tz = torch.tensor(z, requires_grad=True)
    tl = F.cross_entropy(tz, torch.tensor(lab))
    tl.backward()
    np.testing.assert_allclose(float(loss), tl.item(), rtol=1e-12)
    np.testing.assert_allclose(softmax_xent_bwd(r), tz.grad.numpy(), rtol=1e-12, atol=1e-15)
    y, t = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    loss, r = mse_fwd(y, t)
    ty = torch.tensor(y, requires_grad=True)
    tl = F.mse_loss(ty, torch.tensor(t))
    tl.backward()
    np.testing.assert_allclose(float(loss), tl.item(), rtol=1e-12)
    np.testing.assert_allclose(mse_bwd(r), ty.grad.numpy(), rtol=1e-12)


# -------------------------------------------------------------------------------------- init


def test_initialisers():
    w = he_normal((3, 3, 64, 128), 3 * 3 * 64, np.random.default_rng(0))
    assert w.dtype == np.float32 and w.shape == (3, 3, 64, 128)
    assert abs(w.std() - np.sqrt(2 / 576)) / np.sqrt(2 / 576) < 0.02 and abs(w.mean()) < 1e-3
    w2 = he_normal((3, 3, 64, 128), 3 * 3 * 64, np.random.default_rng(0), dtype=np.float64)
    np.testing.assert_allclose(w, w2, rtol=1e-6)
    g = glorot_uniform((300, 200), 300, 200, np.random.default_rng(1))
    a = np.sqrt(6 / 500)
    assert g.dtype == np.float32 and g.max() <= a and g.min() >= -a and g.max() > 0.95 * a
    assert not np.array_equal(g, glorot_uniform((300, 200), 300, 200, np.random.default_rng(2)))
    with pytest.raises(ValueError, match="he_normal: rng must be"):
        he_normal((2,), 2, 0)


# --------------------------------------------------------------------------------- gradcheck


def test_gradcheck_catches_a_wrong_vjp():
    """The helper must fail on a VJP that is off by a little, and name both numbers."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 4))

    def wrong(a):
        return a ** 2, lambda dy: (2.0001 * a * dy,)
    with pytest.raises(AssertionError, match="analytic .* numeric"):
        check_vjp(wrong, [x], rng=rng)

    def right(a):
        return a ** 2, lambda dy: (2 * a * dy,)
    assert len(check_vjp(right, [x], rng=rng, n_dirs=3)) == 3


def test_conv_gradcheck_catches_a_broken_col2im(xp, monkeypatch):
    """Dropping one tap from col2im must be caught by the conv VJP check."""
    from ssmpi.nn.ops import conv

    real = conv._conv_bwd

    def broken(res, dy, need_dx):
        plan = res.plan
        res = res._replace(plan=plan._replace(taps=plan.taps[:-1], full_tap=None))
        return real(res, dy, need_dx)
    monkeypatch.setattr(conv, "_conv_bwd", broken)
    rng = np.random.default_rng(9)
    x, w = xp.asarray(rng.standard_normal((1, 5, 5, 2))), xp.asarray(rng.standard_normal(
        (3, 3, 2, 2)))

    def f(x_, w_):
        y, r = conv.conv2d_fwd(x_, w_, None, pad=1)
        return y, lambda dy: conv.conv2d_bwd(r, dy)[:2]
    with pytest.raises(AssertionError, match="input 0"):
        check_vjp(f, [x, w], rng=rng)
