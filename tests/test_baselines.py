"""Exact-backprop baselines (ssmpi.baselines), serial: equalities that prove exactness."""

import numpy as np
import pytest
from engine_helpers import rel_err, small_spec
from mpi4py import MPI

from ssmpi import backend
from ssmpi.baselines import CausalBP, FrameBP, GPipe, causal3d
from ssmpi.baselines.causal3d import CausalConv3d
from ssmpi.engine.executor import Engine
from ssmpi.engine.topology import Placement, Topology
from ssmpi.nn import models

backend.select("cpu")
SELF = MPI.COMM_SELF


def _clip(T, N=2, res=8, seed=0, dtype=np.float64, classes=3):
    rng = np.random.default_rng(seed)
    fr = rng.standard_normal((N, T, res, res, 3)).astype(dtype)
    return fr, rng.integers(0, classes, N)


def test_frame_bp_equals_engine_bp_mode():
    """One unit = per-frame backprop (invariant 3): FrameBP and Engine(mode='bp') agree
    bitwise on losses and parameters after several Adam updates."""
    spec = small_spec(4)
    topo = Topology(spec, mode="bp")
    opt = dict(name="adam", lr=1e-2)
    eng = Engine(topo, Placement(1, 1), SELF, batch=2, seed=5, optimizer=opt)
    fbp = FrameBP(topo, batch=2, seed=5, optimizer=opt)
    for it in range(3):
        fr, lab = _clip(6, seed=it, dtype=np.float32)
        st = eng.run_clip(6, fr, lab)
        losses = fbp.run_clip(6, fr, lab)
        assert st.losses == losses
    pe, pf = eng.parameters(), fbp.parameters()
    assert np.array_equal(pe[1], pf[1])


def test_frame_bp_rejects_shortcuts():
    with pytest.raises(ValueError, match="direct edges"):
        FrameBP(Topology(small_spec(4), mode="skip"), batch=2)


def test_gpipe_single_stage_equals_frame_bp():
    """GPipe with all units on one rank (no messages) = FrameBP on the same topology."""
    topo = Topology(small_spec(4), mode="sideways")
    opt = dict(name="sgd", lr=1e-1, momentum=0.9)
    gp = GPipe(topo, Placement(topo.L, 1), SELF, batch=2, seed=2, dtype=np.float64,
               optimizer=opt)
    fbp = FrameBP(topo, batch=2, seed=2, dtype=np.float64, optimizer=opt)
    for it in range(2):
        fr, lab = _clip(5, seed=it)
        st = gp.run_clip(5, fr, lab)
        losses = fbp.run_clip(5, fr, lab)
        np.testing.assert_allclose(st.losses, losses, rtol=1e-13)
    for l, p in fbp.parameters().items():
        assert rel_err(gp.parameters()[l], p) < 1e-13


def _c3d(kt=2, segment=None, seed=1, **kw):
    spec = causal3d("tiny", kt=kt, num_classes=3, units=3, width=3, resolution=8)
    return CausalBP(spec, batch=2, seed=seed, dtype=np.float64, segment=segment, **kw)


def test_causal3d_model_description():
    spec = causal3d("vgg8", kt=3, num_classes=51, width=0.25)
    convs = [d for m in spec.modules for d in m if d[0] == "conv3d"]
    assert len(convs) == 7 and all(d[4] == 3 for d in convs)
    assert spec.num_classes == 51
    m = CausalBP(causal3d("tiny", kt=3, units=3, width=2, resolution=8), batch=1)
    assert isinstance(m.layers[0], CausalConv3d) and m.layers[0].params["w"].shape[0] == 3


@pytest.mark.parametrize("segment", [1, 3, 4])
def test_causal3d_remat_gives_identical_gradients(segment):
    T = 8
    fr, lab = _clip(T, seed=3)
    full, rem = _c3d(kt=3), _c3d(kt=3, segment=segment)
    lf = full.clip_grads(T, fr, lab)
    lr = rem.clip_grads(T, fr, lab)
    assert rel_err(rem.grad, full.grad) < 1e-12, rel_err(rem.grad, full.grad)
    # segment means weighted by their length give the clip mean
    S = segment
    w = [min(S, T - s) for s in range(0, T, S)]
    assert np.isclose(np.dot(w, lr) / T, lf[0], rtol=1e-12)


def test_causal3d_gradient_matches_finite_differences():
    T = 4
    fr, lab = _clip(T, seed=4)
    m = _c3d(kt=2)
    m.clip_grads(T, fr, lab)
    g = np.array(m.grad)
    rng = np.random.default_rng(0)
    v = rng.standard_normal(g.shape)
    theta0 = m.theta.copy()
    eps = 1e-5

    def loss_at(th):
        m.theta[...] = th
        m.grad.fill(0)
        return np.mean(m.clip_grads(T, fr, lab))

    num = (loss_at(theta0 + eps * v) - loss_at(theta0 - eps * v)) / (2 * eps)
    m.theta[...] = theta0
    ana = float(g @ v)
    assert abs(num - ana) <= 1e-7 * max(1.0, abs(ana)), (num, ana)


def test_causal3d_is_causal():
    """Changing frame t changes no logit of an earlier frame."""
    T = 6
    fr, _ = _clip(T, seed=5)
    m = _c3d(kt=3)
    a = np.array(m.logits(fr))
    fr2 = fr.copy()
    fr2[:, 3] += 1.0
    b = np.array(m.logits(fr2))
    assert np.array_equal(a[:, :3], b[:, :3])
    assert not np.allclose(a[:, 3:], b[:, 3:])


def test_causal3d_kt1_equals_per_frame_backprop():
    """With kt = 1 the causal 3D model is the 2D model applied per frame: its clip gradient
    equals FrameBP's frame-averaged gradient (weights copied across)."""
    spec2 = models.tiny(num_classes=3, units=3, width=3, resolution=8)
    topo = Topology(spec2, mode="bp")
    fbp = FrameBP(topo, batch=2, dtype=np.float64)
    c3 = CausalBP(causal3d("tiny", kt=1, num_classes=3, units=3, width=3, resolution=8),
                  batch=2, dtype=np.float64)
    u = fbp.units[1]
    src = [p for _, p in u.param_items()]
    dst = [c3.layers[i].params[n] for i, n in c3.names]
    assert len(src) == len(dst)
    for s, d in zip(src, dst):
        d[...] = s.reshape(d.shape)
    T = 5
    fr, lab = _clip(T, seed=6)
    fbp.run_clip(T, fr, lab, update=False)
    c3.clip_grads(T, fr, lab)
    g2 = fbp.gradients()[1]
    assert rel_err(c3.grad, g2) < 1e-12


def test_causal3d_memory_grows_with_clip_length():
    """BP through the clip stores the clip's activations; remat keeps one segment."""
    import tracemalloc

    def peak(T, segment):
        m = _c3d(kt=3, segment=segment)
        fr, lab = _clip(T, seed=7)
        tracemalloc.start()
        m.clip_grads(T, fr, lab)
        p = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return p

    assert peak(32, None) > 3 * peak(8, None)
    assert peak(32, 4) < 0.5 * peak(32, None)
