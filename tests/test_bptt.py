"""ssmpi.bptt: exact backprop through time of the unrolled Sideways / Skip-Sideways model.

What is proved (float64):
1. the BPTT forward is the engine's forward: same losses and mean softmax per clip, for
   sideways, skip (concat, add) and k = 3 (so BPTT trains the very model the engine runs);
2. its gradient is the gradient of J = mean loss over valid steps: central finite
   differences along random directions of every unit's parameters;
3. for the Sideways topology (k = 1) the unrolled model is a per-frame network whose top
   output at step t depends only on frame t-L+1, so dJ/dtheta must equal the mean over the
   valid steps t = L..T of the *static* backprop gradient on frame t-L+1 (computed by an
   independent implementation, ``engine_helpers.static_backprop``). This fails if the step
   timing, the validity of the pipeline fill, the loss averaging or the time reversal is
   wrong, and it is not a finite-difference tautology;
4. an update moves parameters exactly like the optimizer applied to that gradient;
5. the frames head (``models.fullres``, Table 7's future-frame task, loss MSE against frame
   t + offset): the same forward equivalence with the engine (per-step losses, including the
   steps whose target lies past the frames given, which get no loss) and the same
   finite-difference gradient check, for the sideways and skip topologies.
"""

from __future__ import annotations

import numpy as np
import pytest
from engine_helpers import make_engine, rel_err, small_spec, static_backprop
from mpi4py import MPI

from ssmpi.engine.bptt import BPTT
from ssmpi.engine.topology import Topology
from ssmpi.nn import models


def _clip(rng, N=2, T=8, res=8):
    return rng.standard_normal((N, T, res, res, 3)), rng.integers(0, 3, N)


def _bptt(mode="skip", fuse="concat", k=2, L=4, seed=3, width=4, opt=None):
    spec = small_spec(L, width=width)
    topo = Topology(spec, mode=mode, k=k, fuse=fuse)
    return BPTT(topo, seed=seed, dtype=np.float64,
                optimizer=opt or dict(name="sgd", lr=1e-2, momentum=0.0))


CASES = [("sideways", "concat", 1), ("skip", "concat", 2), ("skip", "add", 2),
         ("skip", "concat", 3)]


@pytest.mark.parametrize("mode,fuse,k", CASES)
def test_forward_equals_engine(mode, fuse, k):
    rng = np.random.default_rng(0)
    frames, labels = _clip(rng)
    T = frames.shape[1]
    eng = make_engine(MPI.COMM_SELF, L=4, mode=mode, fuse=fuse, k=max(k, 2), batch=2, seed=3,
                      dtype=np.float64)
    b = _bptt(mode, fuse, k)
    se = eng.run_clip(T, frames, labels, train=False)
    sb = b.run_clip(T, frames, labels, train=False)
    assert len(se.losses) == len(sb.losses) == T - 4 + 1
    np.testing.assert_allclose(sb.losses, se.losses, rtol=1e-12)
    np.testing.assert_allclose(sb.probs, se.probs, rtol=1e-12)


def _check_directional(b, objective, rng, case, eps=1e-6):
    """BPTT's gradient (``b.gradients()`` after ``run_clip(update=False)``) against central
    differences of ``objective()`` along 2 random directions per unit."""
    grads = b.gradients()
    for l, u in b.units.items():
        for _ in range(2):
            v = rng.standard_normal(u.theta.shape)
            theta0 = u.theta.copy()
            u.theta[...] = theta0 + eps * v
            jp = objective()
            u.theta[...] = theta0 - eps * v
            jm = objective()
            u.theta[...] = theta0
            num = (jp - jm) / (2 * eps)
            ana = float(grads[l] @ v)
            assert abs(ana - num) <= 1e-7 + 1e-6 * abs(num), (*case, l, ana, num)


def _objective(b, T, frames, labels):
    return float(np.mean(b.run_clip(T, frames, labels, train=False).losses))


@pytest.mark.parametrize("mode,fuse,k", CASES)
def test_gradient_matches_finite_differences(mode, fuse, k):
    rng = np.random.default_rng(1)
    frames, labels = _clip(rng)
    T = frames.shape[1]
    b = _bptt(mode, fuse, k)
    st = b.run_clip(T, frames, labels, update=False)
    assert all(c == 1 for c in st.counts.values())
    _check_directional(b, lambda: _objective(b, T, frames, labels), rng, (mode, fuse, k))


def test_sideways_gradient_is_mean_of_per_frame_backprop():
    rng = np.random.default_rng(2)
    frames, labels = _clip(rng, T=9)
    T, L = frames.shape[1], 4
    b = _bptt("sideways")
    b.run_clip(T, frames, labels, update=False)
    got = b.gradients()
    want = {l: np.zeros_like(g) for l, g in got.items()}
    steps = range(L, T + 1)  # valid top steps; step t sees frame t-L+1
    for t in steps:
        g, _ = static_backprop(b.topo, b.units, frames[:, t - L], labels)
        for l in want:
            want[l] += g[l] / len(steps)
    for l in got:
        assert rel_err(got[l], want[l]) < 1e-10, l
    # and the skip model is *not* per-frame: the same property fails there
    bs = _bptt("skip")
    bs.run_clip(T, frames, labels, update=False)
    gs = bs.gradients()
    ws = {l: np.zeros_like(g) for l, g in gs.items()}
    for t in steps:
        g, _ = static_backprop(bs.topo, bs.units, frames[:, t - L], labels)
        for l in ws:
            ws[l] += g[l] / len(steps)
    assert max(rel_err(gs[l], ws[l]) for l in gs) > 1e-3


def test_update_applies_optimizer_to_exact_gradient():
    rng = np.random.default_rng(3)
    frames, labels = _clip(rng)
    T = frames.shape[1]
    b = _bptt("skip", opt=dict(name="sgd", lr=0.1, momentum=0.0))
    p0 = b.parameters()
    b.run_clip(T, frames, labels, update=False)
    g = b.gradients()
    b.update()
    p1 = b.parameters()
    for l in p0:
        np.testing.assert_allclose(p1[l], p0[l] - 0.1 * g[l], rtol=1e-12, atol=1e-15)
        assert not b.units[l].grad.any() and b.units[l].count == 0
    st = b.run_clip(T, frames, labels)  # train + update in one call
    assert st.lr == pytest.approx(0.1) and len(st.losses) == T - 3


def test_short_clips():
    """T < L: no valid loss, nothing trained; T = L: one loss, whose exact gradient reaches
    every unit through the direct path (unlike Sideways, which needs T >= 2L-1)."""
    rng = np.random.default_rng(4)
    frames, labels = _clip(rng, T=4)
    b = _bptt("skip")
    st = b.run_clip(3, frames, labels, update=False)
    assert st.losses == [] and st.probs is None and all(c == 0 for c in st.counts.values())
    st = b.run_clip(4, frames, labels, update=False)
    assert len(st.losses) == 1 and all(c == 1 for c in st.counts.values())


# -- frames head (future-frame prediction, MSE) ------------------------------------------
FRAME_CASES = [("sideways", "concat", 1), ("skip", "concat", 2), ("skip", "add", 2)]


def _frames_spec():
    return models.fullres(units=3, width=4, resolution=6)


def _frames_bptt(mode, fuse, k, offset=2, target="newest", seed=3):
    topo = Topology(_frames_spec(), mode=mode, k=k, fuse=fuse)
    return BPTT(topo, seed=seed, dtype=np.float64, frame_offset=offset, target=target,
                optimizer=dict(name="sgd", lr=1e-2, momentum=0.0))


@pytest.mark.parametrize("mode,fuse,k", FRAME_CASES)
@pytest.mark.parametrize("extra,target", [(2, "newest"), (1, "newest"), (0, "direct")])
def test_frames_forward_equals_engine(mode, fuse, k, extra, target):
    """Same per-step MSE as the engine; ``extra`` frames after the clip (offset 2): with 1,
    the last step has no target and no loss, in both."""
    rng = np.random.default_rng(5)
    T, offset = 5, 2
    targets = rng.standard_normal((2, T + extra, 6, 6, 3))
    eng = make_engine(MPI.COMM_SELF, mode=mode, fuse=fuse, k=max(k, 2), batch=2, seed=3,
                      dtype=np.float64, spec=_frames_spec(), frame_offset=offset, target=target)
    assert eng.loss_kind == "mse"
    b = _frames_bptt(mode, fuse, k, offset, target)
    se = eng.run_clip(T, targets[:, :T], None, targets, train=False)
    sb = b.run_clip(T, targets[:, :T], None, targets=targets, train=False)
    L = 3  # the top output is valid from step L; step t's target is frame idx(t)
    last = T + extra - offset if target == "newest" else T + extra - offset + L - 1
    assert len(se.losses) == len(sb.losses) == min(T, last) - L + 1
    np.testing.assert_allclose(sb.losses, se.losses, rtol=1e-12)
    assert sb.probs is None
    # targets default to the frames themselves (the trainer passes the same array)
    sd = b.run_clip(T, targets, None, train=False)
    np.testing.assert_allclose(sd.losses, sb.losses, rtol=1e-12)
    # update=False (train) reports the same losses
    st = b.run_clip(T, targets, update=False)
    np.testing.assert_allclose(st.losses, sb.losses, rtol=1e-12)


@pytest.mark.parametrize("mode,fuse,k", FRAME_CASES)
def test_frames_gradient_matches_finite_differences(mode, fuse, k):
    rng = np.random.default_rng(6)
    T, offset = 5, 2
    clip = rng.standard_normal((2, T + offset, 6, 6, 3))
    b = _frames_bptt(mode, fuse, k, offset)
    st = b.run_clip(T, clip, update=False)
    assert len(st.losses) == T - 3 + 1 and all(c == 1 for c in st.counts.values())
    _check_directional(b, lambda: float(np.mean(b.run_clip(T, clip, train=False).losses)),
                       rng, (mode, fuse, k))


def test_frames_sideways_one_step_gradient_is_engine_gradient():
    """Sideways, T = 2L-1 = 5, targets for step L only: one valid loss at step 3. The
    engine's U_L gradient at that step is exact (no pseudo-gradient involved), so it must
    equal BPTT's dJ/dtheta_L."""
    rng = np.random.default_rng(7)
    T, offset, L = 5, 2, 3
    targets = rng.standard_normal((2, L + offset, 6, 6, 3))  # only step 3 has a target
    eng = make_engine(MPI.COMM_SELF, mode="sideways", k=2, batch=2, seed=3, dtype=np.float64,
                      spec=_frames_spec(), frame_offset=offset)
    b = _frames_bptt("sideways", "concat", 1, offset)
    se = eng.run_clip(T, targets[:, :T], None, targets, update=False)
    sb = b.run_clip(T, targets[:, :T], targets=targets, update=False)
    assert len(se.losses) == len(sb.losses) == 1
    u = eng.units[L]
    assert u.count == 1
    assert rel_err(u.grad, b.gradients()[L]) < 1e-10


def test_frames_rejects_bad_target():
    with pytest.raises(ValueError):
        _frames_bptt("skip", "concat", 2, target="oldest")
