"""The input unit (``model.input_unit``): a parameter-free identity U_1 that makes the raw
frame a message, so the Skip-Sideways shortcut U_1 -> U_3 carries the input frame."""

import numpy as np
import pytest
from engine_helpers import make_engine, rel_err, small_spec, static_backprop
from mpi4py import MPI

from ssmpi import backend
from ssmpi.engine.bptt import BPTT
from ssmpi.engine.topology import Topology
from ssmpi.nn import models
from ssmpi.nn.layers import Identity

backend.select("cpu")
SELF = MPI.COMM_SELF


def test_identity_layer_copies_and_passes_the_gradient():
    x = np.arange(24, dtype=np.float32).reshape(2, 2, 2, 3)
    lay = Identity()
    assert lay.build((2, 2, 3)) == (2, 2, 3)
    y, res = lay.forward(x)
    assert np.array_equal(y, x) and y is not x  # a copy: the engine may reuse x's buffer
    dy = np.ones_like(x)
    dx, grads = lay.backward(res, dy)
    assert dx is dy and grads == {}
    assert lay.backward(res, dy, need_dx=False)[0] is None


def test_topology_has_the_input_frame_shortcut():
    spec = models.with_input_unit(small_spec(3, width=4, res=8))
    topo = Topology(spec, mode="skip", k=2)
    assert topo.L == 4 and spec.modules[0] == [("identity",)]
    (sc,) = [e for e in topo.inbound(3) if e.kind == "shortcut"]
    assert (sc.src, sc.dst) == (1, 3)
    assert sc.src_shape == (8, 8, 3)  # the raw frame
    assert sc.act_shape == (8, 8, 3)  # U_3 works at the frame's resolution (no pool before)
    assert topo.in_shapes[3] == (8, 8, 4 + 3)  # concat: h_2 channels + frame channels
    eng = make_engine(SELF, spec=spec)
    assert eng.units[1].theta.size == 0  # nothing to train in U_1


@pytest.mark.parametrize("fuse", ["concat", "add"])
def test_constant_video_equals_backprop_with_input_unit(fuse):
    """ALGORITHM.md's constant-video invariant holds with the input unit (float64)."""
    spec = models.with_input_unit(small_spec(3))
    eng = make_engine(SELF, spec=spec, mode="skip", fuse=fuse, dtype=np.float64, record=True)
    L = eng.topo.L
    T = 2 * L + 2
    rng = np.random.default_rng(0)
    clip = np.repeat(rng.standard_normal((2, 1, 8, 8, 3)), T, axis=1)
    labels = np.array([0, 2])
    eng.run_clip(T, clip, labels, update=False)
    exact, _ = static_backprop(eng.topo, eng.units, clip[:, 0], labels)
    checked = 0
    for r in eng.records:
        if r.t >= 2 * L - 1 and r.l > 1:
            assert rel_err(r.grad, exact[r.l]) < 1e-10, (r.l, r.t)
            checked += 1
    assert checked == (L - 1) * (T - 2 * L + 2)


def test_bptt_of_the_input_unit_model_matches_the_engine_forward():
    """Same losses from the engine and exact BPTT of the unrolled model (train=False)."""
    spec = models.with_input_unit(small_spec(3))
    eng = make_engine(SELF, spec=spec, dtype=np.float64)
    bp = BPTT(eng.topo, seed=3, dtype=np.float64)
    bp.load_parameters(eng.parameters())
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 10, 8, 8, 3))
    y = np.array([1, 2])
    a = eng.run_clip(10, x, y, train=False).losses
    b = bp.run_clip(10, x, y, train=False).losses
    assert len(a) == 10 - eng.topo.L + 1 and np.allclose(a, b, rtol=1e-12)


def test_trainer_config_builds_the_input_unit():
    from ssmpi.config import Config
    from ssmpi.train import build_model

    cfg = Config()
    cfg.model.name, cfg.model.units, cfg.model.width = "tiny", 4, 8
    assert len(build_model(cfg, 2, (16, 16)).modules) == 4
    cfg.model.input_unit = True
    spec = build_model(cfg, 2, (16, 16))
    assert len(spec.modules) == 5 and spec.modules[0] == [("identity",)]
