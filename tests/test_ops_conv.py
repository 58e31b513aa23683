"""conv2d and causal conv3d: forward vs loop references and PyTorch, VJPs vs finite differences,
workspace reuse, dtypes and argument errors."""

import numpy as np
import pytest

from ssmpi import backend
from ssmpi.nn.ops import conv2d_bwd, conv2d_fwd, conv3d_causal_bwd, conv3d_causal_fwd
from ssmpi.nn.ops.gradcheck import check_vjp
from ssmpi.nn.ops.reference import conv2d_ref, conv3d_causal_ref


@pytest.fixture(params=["im2col", "winograd"])
def conv_algo(request, monkeypatch):
    """Run a 2-D test through im2col, then through Winograd F(2x2, 3x3) wherever it applies
    (3x3, stride 1, pad <= 2), whatever the channel count and output size."""
    from ssmpi.nn.ops import conv

    if request.param == "im2col":
        monkeypatch.setattr(conv, "WINOGRAD", False)
    else:
        monkeypatch.setattr(conv, "WINOGRAD", True)
        monkeypatch.setattr(conv, "WINOGRAD_MIN_CIN", 1)
        monkeypatch.setattr(conv, "WINOGRAD_MAX_WASTE", float("inf"))
    return request.param


def _expect_algo(res, algo, case_stride, ks, pad):
    """The residual tells which path ran: Winograd exactly where it applies."""
    from ssmpi.nn.ops.winograd import WinoRes

    pads = pad if isinstance(pad, tuple) else (pad, pad)
    applies = (algo == "winograd" and tuple(ks) == (3, 3) and case_stride in (1, (1, 1))
               and pads[0] == pads[1] <= 2)
    assert isinstance(res, WinoRes) == applies


# (N, H, W, Cin, Cout, (kh, kw), stride, pad)
CONV2D_CASES = [
    (2, 7, 6, 3, 4, (3, 3), 1, 1),
    (2, 7, 6, 3, 4, (3, 3), 2, 1),
    (1, 8, 8, 2, 3, (3, 3), 1, 0),
    (2, 9, 7, 2, 3, (5, 5), 1, 2),
    (1, 9, 9, 3, 2, (5, 5), 2, 2),
    (2, 5, 6, 4, 3, (1, 1), 1, 0),
    (1, 6, 5, 3, 2, (1, 1), 2, 0),
    (2, 6, 7, 2, 3, (3, 1), 1, (1, 0)),
    (1, 7, 8, 2, 2, (1, 5), (1, 2), (0, 2)),
    (1, 6, 6, 2, 3, (5, 3), (2, 1), (2, 1)),
    (1, 4, 4, 2, 2, (3, 3), 1, 2),  # pad large enough that corner taps see only zeros
    (1, 3, 3, 1, 1, (3, 3), 1, 0),  # kernel equals the input
]

# (N, T, H, W, Cin, Cout, (kt, kh, kw), stride, pad)
CONV3D_CASES = [
    (2, 4, 5, 5, 2, 3, (3, 3, 3), 1, 1),
    (1, 5, 6, 6, 3, 2, (2, 3, 3), 2, 1),
    (1, 3, 4, 5, 2, 2, (1, 1, 1), 1, 0),
    (1, 2, 5, 4, 2, 3, (4, 3, 1), 1, (1, 0)),  # kt > T: the first frames see padding only
]


def _rand(rng, xp, shape, dtype=np.float64):
    return xp.asarray(rng.standard_normal(shape).astype(dtype))


def _conv2d_case(rng, xp, case, dtype=np.float64, bias=True):
    n, h, w, cin, cout, (kh, kw), s, p = case
    x = _rand(rng, xp, (n, h, w, cin), dtype)
    wt = _rand(rng, xp, (kh, kw, cin, cout), dtype)
    b = _rand(rng, xp, (cout,), dtype) if bias else None
    return x, wt, b, s, p


def _conv3d_case(rng, xp, case, dtype=np.float64, bias=True):
    n, t, h, w, cin, cout, ks, s, p = case
    x = _rand(rng, xp, (n, t, h, w, cin), dtype)
    wt = _rand(rng, xp, (*ks, cin, cout), dtype)
    b = _rand(rng, xp, (cout,), dtype) if bias else None
    return x, wt, b, s, p


@pytest.mark.parametrize("case", CONV2D_CASES)
def test_conv2d_forward_matches_reference(xp, case, conv_algo):
    rng = np.random.default_rng(0)
    x, w, b, s, p = _conv2d_case(rng, xp, case)
    y, res = conv2d_fwd(x, w, b, stride=s, pad=p)
    _expect_algo(res, conv_algo, s, case[5], p)
    ref = conv2d_ref(backend.asnumpy(x), backend.asnumpy(w), backend.asnumpy(b), s, p)
    assert y.shape == ref.shape
    np.testing.assert_allclose(backend.asnumpy(y), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CONV3D_CASES)
def test_conv3d_causal_forward_matches_reference(xp, case):
    rng = np.random.default_rng(1)
    x, w, b, s, p = _conv3d_case(rng, xp, case)
    y, _ = conv3d_causal_fwd(x, w, b, stride=s, pad=p)
    ref = conv3d_causal_ref(backend.asnumpy(x), backend.asnumpy(w), backend.asnumpy(b), s, p)
    assert y.shape == ref.shape
    np.testing.assert_allclose(backend.asnumpy(y), ref, rtol=1e-12, atol=1e-12)


def test_conv3d_is_causal(xp):
    """Changing frame t must leave every output frame before t untouched."""
    rng = np.random.default_rng(2)
    x, w, b, s, p = _conv3d_case(rng, xp, (1, 6, 4, 4, 2, 3, (3, 3, 3), 1, 1))
    y0, _ = conv3d_causal_fwd(x, w, b, stride=s, pad=p)
    x2 = x.copy()
    x2[:, 3] += 1.0
    y1, _ = conv3d_causal_fwd(x2, w, b, stride=s, pad=p)
    d = backend.asnumpy(xp.abs(y1 - y0).max(axis=(0, 2, 3, 4)))
    assert np.all(d[:3] == 0) and np.all(d[3:] > 0)


def _conv_vjp(fwd, bwd, s, p, need_dx=True):
    def f(x, w, b):
        y, res = fwd(x, w, b, stride=s, pad=p)
        return y, lambda dy: bwd(res, dy, need_dx=need_dx)
    return f


@pytest.mark.parametrize("case", CONV2D_CASES)
def test_conv2d_vjp_finite_differences(xp, case, conv_algo):
    rng = np.random.default_rng(3)
    x, w, b, s, p = _conv2d_case(rng, xp, case)
    res = check_vjp(_conv_vjp(conv2d_fwd, conv2d_bwd, s, p), [x, w, b], rng=rng)
    assert [r[0] for r in res] == [0, 1, 2]


@pytest.mark.parametrize("case", CONV3D_CASES)
def test_conv3d_causal_vjp_finite_differences(xp, case):
    rng = np.random.default_rng(4)
    x, w, b, s, p = _conv3d_case(rng, xp, case)
    res = check_vjp(_conv_vjp(conv3d_causal_fwd, conv3d_causal_bwd, s, p), [x, w, b], rng=rng)
    assert [r[0] for r in res] == [0, 1, 2]


@pytest.mark.parametrize("fwd,bwd,case,mk", [
    (conv2d_fwd, conv2d_bwd, CONV2D_CASES[1], _conv2d_case),
    (conv2d_fwd, conv2d_bwd, CONV2D_CASES[0], _conv2d_case),
    (conv3d_causal_fwd, conv3d_causal_bwd, CONV3D_CASES[1], _conv3d_case),
])
def test_need_dx_false_and_no_bias(xp, fwd, bwd, case, mk, conv_algo):
    rng = np.random.default_rng(5)
    x, w, _, s, p = mk(rng, xp, case, bias=False)
    y, res = fwd(x, w, None, stride=s, pad=p)
    dy = _rand(rng, xp, y.shape)
    dx, dw, db = bwd(res, dy)
    dx2, dw2, db2 = bwd(res, dy, need_dx=False)
    assert dx2 is None and db is None and db2 is None and dx is not None
    np.testing.assert_array_equal(backend.asnumpy(dw), backend.asnumpy(dw2))
    # without dx and without bias, the VJP of w alone still matches finite differences
    check_vjp(lambda x_, w_: (fwd(x_, w_, None, stride=s, pad=p)[0],
                              lambda g: (None,) + bwd(fwd(x_, w_, None, stride=s, pad=p)[1], g,
                                                      need_dx=False)[1:2]),
              [x, w], rng=rng)


@pytest.mark.parametrize("fwd,bwd,case,mk", [
    (conv2d_fwd, conv2d_bwd, CONV2D_CASES[0], _conv2d_case),
    (conv2d_fwd, conv2d_bwd, CONV2D_CASES[4], _conv2d_case),
    (conv2d_fwd, conv2d_bwd, CONV2D_CASES[10], _conv2d_case),
    (conv3d_causal_fwd, conv3d_causal_bwd, CONV3D_CASES[0], _conv3d_case),
])
def test_workspace_reuse_matches_fresh(xp, fwd, bwd, case, mk, conv_algo):
    """Several forward/backward rounds through one ws give exactly the ws=None results."""
    rng = np.random.default_rng(6)
    ws = {}
    for rnd in range(3):
        x, w, b, s, p = mk(rng, xp, case, dtype=np.float32)
        if rnd == 2:  # a different batch size reallocates (keys are checked, not trusted)
            x = xp.concatenate([x, x], axis=0)
        x_before = x.copy()
        y0, r0 = fwd(x, w, b, stride=s, pad=p)
        dy = _rand(rng, xp, y0.shape, np.float32)
        g0 = bwd(r0, dy)
        y1, r1 = fwd(x, w, b, stride=s, pad=p, ws=ws)
        g1 = bwd(r1, dy)
        np.testing.assert_array_equal(backend.asnumpy(y0), backend.asnumpy(y1))
        for a, c in zip(g0, g1):
            np.testing.assert_array_equal(backend.asnumpy(a), backend.asnumpy(c))
        np.testing.assert_array_equal(backend.asnumpy(x), backend.asnumpy(x_before))
    name = "wino_v" if "wino_v" in ws else "cols"
    assert name in ws and ("dcols" in ws or "wino_dx_v" in ws)
    cols = ws[name][1]
    fwd(x, w, b, stride=s, pad=p, ws=ws)
    assert ws[name][1] is cols  # the buffer is reused, not reallocated


def test_float32_stays_float32(xp, conv_algo):
    rng = np.random.default_rng(7)
    for fwd, bwd, case, mk in [(conv2d_fwd, conv2d_bwd, CONV2D_CASES[1], _conv2d_case),
                               (conv2d_fwd, conv2d_bwd, CONV2D_CASES[0], _conv2d_case),
                               (conv3d_causal_fwd, conv3d_causal_bwd, CONV3D_CASES[0],
                                _conv3d_case)]:
        x, w, b, s, p = mk(rng, xp, case, dtype=np.float32)
        y, res = fwd(x, w, b, stride=s, pad=p)
        assert y.dtype == np.float32
        grads = bwd(res, xp.ones_like(y))
        assert all(g.dtype == np.float32 for g in grads)


def test_inputs_not_mutated(xp, conv_algo):
    rng = np.random.default_rng(8)
    x, w, b, s, p = _conv2d_case(rng, xp, CONV2D_CASES[0])
    copies = [a.copy() for a in (x, w, b)]
    y, res = conv2d_fwd(x, w, b, stride=s, pad=p, ws={})
    dy = _rand(rng, xp, y.shape)
    dy0 = dy.copy()
    conv2d_bwd(res, dy)
    for a, c in zip((x, w, b, dy), copies + [dy0]):
        np.testing.assert_array_equal(backend.asnumpy(a), backend.asnumpy(c))


@pytest.mark.parametrize("kwargs,shapes,match", [
    ({}, ((1, 5, 5, 3), (3, 3, 2, 4), (4,)), r"conv2d_fwd: x \(1, 5, 5, 3\) has 3 channels"),
    ({}, ((1, 5, 5, 3), (3, 3, 3, 4), (5,)), r"conv2d_fwd: b \(5,\)"),
    ({}, ((1, 2, 2, 3), (3, 3, 3, 4), None), r"conv2d_fwd: kernel \(3, 3\) larger"),
    ({"pad": 1}, ((1, 2, 2, 3), (5, 1, 3, 4), None), r"conv2d_fwd: kernel \(5, 1\) larger"),
    ({"stride": 0}, ((1, 5, 5, 3), (3, 3, 3, 4), None), "conv2d_fwd: stride"),
    ({"stride": (1, 2, 3)}, ((1, 5, 5, 3), (3, 3, 3, 4), None), "conv2d_fwd: stride"),
    ({"stride": 1.5}, ((1, 5, 5, 3), (3, 3, 3, 4), None), "conv2d_fwd: stride"),
    ({"pad": -1}, ((1, 5, 5, 3), (3, 3, 3, 4), None), "conv2d_fwd: pad"),
    ({}, ((5, 5, 3), (3, 3, 3, 4), None), "conv2d_fwd: expected x with 4 dims"),
])
def test_conv2d_bad_arguments(xp, kwargs, shapes, match):
    xs, wsh, bsh = shapes
    x = xp.zeros(xs, dtype=np.float32)
    w = xp.zeros(wsh, dtype=np.float32)
    b = None if bsh is None else xp.zeros(bsh, dtype=np.float32)
    with pytest.raises(ValueError, match=match):
        conv2d_fwd(x, w, b, **kwargs)


def test_conv_bad_dtypes_and_dy(xp):
    x = xp.zeros((1, 5, 5, 3), dtype=np.int32)
    w = xp.zeros((3, 3, 3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="conv2d_fwd: x must be a floating array"):
        conv2d_fwd(x, w, None)
    with pytest.raises(ValueError, match="conv2d_fwd: w has dtype float64"):
        conv2d_fwd(x.astype(np.float32), w.astype(np.float64), None)
    y, res = conv2d_fwd(x.astype(np.float32), w, None, pad=1)
    with pytest.raises(ValueError, match=r"conv2d_bwd: dy \(1, 4, 5, 4\) does not match"):
        conv2d_bwd(res, xp.zeros((1, 4, 5, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="conv3d_causal_fwd: w must be"):
        conv3d_causal_fwd(xp.zeros((1, 2, 5, 5, 3), dtype=np.float32), w, None)
    with pytest.raises(ValueError, match="conv3d_causal_fwd: x .* has 3 channels"):
        conv3d_causal_fwd(xp.zeros((1, 2, 5, 5, 3), dtype=np.float32),
                          xp.zeros((2, 3, 3, 2, 4), dtype=np.float32), None)


# --------------------------------------------------------------------------- PyTorch


def _torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("case", [CONV2D_CASES[i] for i in (0, 1, 2, 3, 7, 9, 10)])
def test_conv2d_matches_torch(case, conv_algo):
    torch = _torch()
    F = torch.nn.functional
    rng = np.random.default_rng(9)
    x, w, b, s, p = _conv2d_case(rng, np, case)
    y, res = conv2d_fwd(x, w, b, stride=s, pad=p)
    dy = rng.standard_normal(y.shape)
    dx, dw, db = conv2d_bwd(res, dy)
    tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    tw = torch.tensor(w.transpose(3, 2, 0, 1), requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    ty = F.conv2d(tx, tw, tb, stride=s, padding=p)
    ty.backward(torch.tensor(dy.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(y, ty.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-10,
                               atol=1e-10)
    np.testing.assert_allclose(dx, tx.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-10,
                               atol=1e-10)
    np.testing.assert_allclose(dw, tw.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-10,
                               atol=1e-10)
    np.testing.assert_allclose(db, tb.grad.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CONV3D_CASES)
def test_conv3d_causal_matches_torch(case):
    torch = _torch()
    F = torch.nn.functional
    rng = np.random.default_rng(10)
    x, w, b, s, p = _conv3d_case(rng, np, case)
    y, res = conv3d_causal_fwd(x, w, b, stride=s, pad=p)
    dy = rng.standard_normal(y.shape)
    dx, dw, db = conv3d_causal_bwd(res, dy)
    kt = w.shape[0]
    sh, sw = (s, s) if isinstance(s, int) else s
    ph, pw = (p, p) if isinstance(p, int) else p
    tx = torch.tensor(x.transpose(0, 4, 1, 2, 3), requires_grad=True)
    tw = torch.tensor(w.transpose(4, 3, 0, 1, 2), requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    ty = F.conv3d(F.pad(tx, (pw, pw, ph, ph, kt - 1, 0)), tw, tb, stride=(1, sh, sw))
    ty.backward(torch.tensor(dy.transpose(0, 4, 1, 2, 3)))
    to_ours = (0, 2, 3, 4, 1)
    np.testing.assert_allclose(y, ty.detach().numpy().transpose(to_ours), rtol=1e-10,
                               atol=1e-10)
    np.testing.assert_allclose(dx, tx.grad.numpy().transpose(to_ours), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dw, tw.grad.numpy().transpose(2, 3, 4, 1, 0), rtol=1e-10,
                               atol=1e-10)
    np.testing.assert_allclose(db, tb.grad.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cin,hw", [(8, 16), (64, 14), (64, 7)])
def test_conv2d_float32_close_to_torch(conv_algo, cin, hw):
    """float32 forward and gradients at realistic channel counts, relative to their scale."""
    torch = _torch()
    rng = np.random.default_rng(11)
    x, w, b, s, p = _conv2d_case(rng, np, (2, hw, hw, cin, 16, (3, 3), 1, 1), dtype=np.float32)
    y, res = conv2d_fwd(x, w, b, stride=s, pad=p, ws={})
    assert y.dtype == np.float32
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw, db = conv2d_bwd(res, dy)
    tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    tw = torch.tensor(w.transpose(3, 2, 0, 1), requires_grad=True)
    ty = torch.nn.functional.conv2d(tx, tw, torch.tensor(b), padding=1)
    ty.backward(torch.tensor(dy.transpose(0, 3, 1, 2)))
    for ours, theirs in [(y, ty.detach().numpy().transpose(0, 2, 3, 1)),
                         (dx, tx.grad.numpy().transpose(0, 2, 3, 1)),
                         (dw, tw.grad.numpy().transpose(2, 3, 1, 0))]:
        err = np.abs(ours - theirs).max() / np.abs(theirs).max()
        assert err < 2e-6, err


@pytest.mark.parametrize("fwd,bwd,case,mk", [
    (conv2d_fwd, conv2d_bwd, (5, 7, 6, 3, 4, (3, 3), 1, 1), _conv2d_case),
    (conv2d_fwd, conv2d_bwd, (3, 9, 9, 3, 2, (5, 3), (2, 1), (2, 1)), _conv2d_case),
    (conv3d_causal_fwd, conv3d_causal_bwd, (3, 4, 5, 5, 2, 3, (3, 3, 3), 1, 1), _conv3d_case),
])
def test_chunked_gemm_loops_match_one_chunk(xp, monkeypatch, fwd, bwd, case, mk):
    """Forcing one image per chunk (as for big layers) changes nothing in the results."""
    from ssmpi.nn.ops import conv

    rng = np.random.default_rng(12)
    x, w, b, s, p = mk(rng, xp, case)
    y0, r0 = fwd(x, w, b, stride=s, pad=p)
    assert r0.plan.chunk == x.shape[0]
    dy = _rand(rng, xp, y0.shape)
    g0 = bwd(r0, dy)
    monkeypatch.setattr(conv, "_CHUNK_BYTES", 1)
    monkeypatch.setattr(conv, "_CHUNK_MIN_ROWS", 1)
    for ws in (None, {}):
        y1, r1 = fwd(x, w, b, stride=s, pad=p, ws=ws)
        # a device (GPU, the double) never chunks: one GEMM over the batch
        assert r1.plan.chunk == (1 if xp is np else x.shape[0])
        g1 = bwd(r1, dy)
        np.testing.assert_allclose(backend.asnumpy(y1), backend.asnumpy(y0), rtol=1e-13,
                                   atol=1e-13)
        for a, c in zip(g0, g1):
            np.testing.assert_allclose(backend.asnumpy(a), backend.asnumpy(c), rtol=1e-13,
                                       atol=1e-13)
    check_vjp(_conv_vjp(fwd, bwd, s, p), [x, w, b], rng=rng)


@pytest.mark.parametrize("case", [(3, 8, 8, 3, 4, (3, 3), 1, 1), (3, 7, 6, 2, 3, (3, 3), 1, 0),
                                  (2, 5, 5, 2, 2, (3, 3), 1, 2)])
def test_winograd_chunks_match_one_chunk_and_im2col(xp, monkeypatch, case):
    """Winograd with one image per chunk equals Winograd in one chunk and im2col (float64)."""
    from ssmpi.nn.ops import conv, winograd

    monkeypatch.setattr(conv, "WINOGRAD_MIN_CIN", 1)
    monkeypatch.setattr(conv, "WINOGRAD_MAX_WASTE", float("inf"))
    rng = np.random.default_rng(13)
    x, w, b, s, p = _conv2d_case(rng, xp, case)
    dy = None
    outs = []
    for setting in ("one", "per-image", "im2col"):
        if setting == "per-image":
            monkeypatch.setattr(winograd, "CHUNK_BYTES", 1)
            monkeypatch.setattr(winograd, "CHUNK_MIN_ROWS", 1)
        if setting == "im2col":
            monkeypatch.setattr(conv, "WINOGRAD", False)
        y, r = conv2d_fwd(x, w, b, stride=s, pad=p, ws={})
        assert isinstance(r, winograd.WinoRes) == (setting != "im2col")
        if dy is None:
            dy = _rand(rng, xp, y.shape)
        outs.append([y, *conv2d_bwd(r, dy)])
    for other in outs[1:]:
        for a, c in zip(outs[0], other):
            np.testing.assert_allclose(backend.asnumpy(c), backend.asnumpy(a), rtol=1e-12,
                                       atol=1e-12)
