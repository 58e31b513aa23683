"""Engine invariants on one process (the serial executor): ALGORITHM.md, 'Invariants'."""

import numpy as np
import pytest
from engine_helpers import make_engine, rel_err, small_spec, static_backprop
from mpi4py import MPI

from ssmpi import backend
from ssmpi.engine import plan as schedule
from ssmpi.engine.topology import Placement, Topology, TopologyError
from ssmpi.nn.models import ModelSpec

backend.select("cpu")
SELF = MPI.COMM_SELF


def constant_clip(T, batch=2, res=8, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 1, res, res, 3)).astype(dtype)
    return np.repeat(x, T, axis=1)


@pytest.mark.parametrize("mode,fuse,k", [
    ("sideways", "concat", 1), ("skip", "concat", 2), ("skip", "add", 2),
    ("skip", "concat", 3), ("skip", "add", 3)])
@pytest.mark.parametrize("L", [3, 5])
def test_constant_video_equals_backprop(mode, fuse, k, L):
    """Frozen parameters, every frame identical: from step 2L-1 on each unit's per-step
    gradient equals the exact backprop gradient of the static network (float64, 1e-10)."""
    T = 2 * L + 3
    eng = make_engine(SELF, L=L, mode=mode, fuse=fuse, k=k, dtype=np.float64, record=True)
    clip = constant_clip(T)
    labels = np.array([0, 2])
    eng.run_clip(T, clip, labels, update=False)
    exact, _ = static_backprop(eng.topo, eng.units, clip[:, 0], labels)
    checked = 0
    for r in eng.records:
        if r.t >= 2 * L - 1:
            assert r.c_valid, f"U{r.l} has no valid gradient at step {r.t}"
            err = rel_err(r.grad, exact[r.l])
            assert err < 1e-10, f"U{r.l} step {r.t}: relative error {err:.3e}"
            checked += 1
    assert checked == L * (T - 2 * L + 2)


@pytest.mark.parametrize("fuse", ["concat", "add"])
def test_constant_video_equals_backprop_vgg16_vector_shortcuts(fuse):
    """VGG16 with two modules per unit: shortcuts into the classifier units are vectors
    (tau = global max-pool, then flatten), still exact on constant video."""
    from ssmpi.nn.models import vgg16

    spec = vgg16(num_classes=3, width=1 / 32, resolution=32)
    eng = make_engine(SELF, spec=spec, mode="skip", fuse=fuse, modules_per_unit=2,
                      dtype=np.float64, record=True)
    L = eng.topo.L
    assert L == 8 and any(len(e.act_shape) == 1 for e in eng.topo.edges if e.kind == "shortcut")
    T = 2 * L
    clip = constant_clip(T, res=32)
    labels = np.array([0, 2])
    eng.run_clip(T, clip, labels, update=False)
    exact, _ = static_backprop(eng.topo, eng.units, clip[:, 0], labels)
    last = [r for r in eng.records if r.t >= 2 * L - 1]
    assert len(last) == 2 * L
    for r in last:
        assert rel_err(r.grad, exact[r.l]) < 1e-10, (r.l, r.t)


def test_constant_video_detects_a_wrong_gradient():
    """The comparison above is sensitive: a perturbed parameter breaks it."""
    L, T = 3, 8
    eng = make_engine(SELF, L=L, mode="skip", dtype=np.float64, record=True)
    clip, labels = constant_clip(T), np.array([1, 0])
    eng.run_clip(T, clip, labels, update=False)
    eng.units[2].theta[0] += 1e-3
    exact, _ = static_backprop(eng.topo, eng.units, clip[:, 0], labels)
    last = [r for r in eng.records if r.t == T]
    assert max(rel_err(r.grad, exact[r.l]) for r in last) > 1e-8


@pytest.mark.parametrize("mode", ["sideways", "skip", "fa-skip"])
def test_first_valid_gradient_at_2L_minus_l(mode):
    L, T = 4, 12
    eng = make_engine(SELF, L=L, mode=mode, record=True)
    eng.run_clip(T, constant_clip(T, dtype=np.float32), np.array([0, 1]), update=False)
    for l in range(1, L + 1):
        first = min(r.t for r in eng.records if r.l == l and r.c_valid)
        assert first == 2 * L - l, (l, first)
        assert eng.stats().counts[l] == T - (2 * L - l) + 1


@pytest.mark.parametrize("mode,k", [("sideways", 1), ("skip", 2), ("skip", 3)])
def test_provenance_matches_schedule_table(mode, k):
    """Headers: the direct-path frame and the loss step at every (unit, step) are the
    schedule's; shortcut inputs carry the frames the schedule says reach the unit."""
    L, T = 5, 13
    eng = make_engine(SELF, L=L, mode=mode, k=k, record=True)
    eng.run_clip(T, constant_clip(T, dtype=np.float32), np.array([0, 1]), update=False)
    cells = schedule.provenance(eng.topo, T)
    for r in eng.records:
        c = cells[(r.l, r.t)]
        assert (r.frame or None) == c.frame, (r.l, r.t)
        assert (r.loss_step or None) == c.loss_step, (r.l, r.t)
        if r.valid:
            got = {r.frame} | {f for f in r.shortcut_frames if f}
            # frames on the direct inputs of the shortcut sources are a subset of all frames
            assert got <= set(c.frames)
            assert r.frame == r.t - r.l + 1
        if r.c_valid:
            assert r.loss_step == r.t - (L - r.l)


def _identity_chain(L, C=2, res=4, pick="direct"):
    """1x1-conv units without ReLU; weights select the direct (or the shortcut) channels."""
    mods = [[("conv", C, 1)] for _ in range(L)]
    spec = ModelSpec("identity", (res, res, C), mods, "frames")
    return spec


@pytest.mark.parametrize("pick", ["direct", "shortcut"])
def test_frame_t_encodes_t_data_provenance(pick):
    """On a video whose frame t is the constant t, the data each unit outputs at step t is
    the frame the schedule table names (direct path), and a unit that reads only its
    shortcut input sees the frame that edge brings."""
    L, T, C = 5, 12, 2
    spec = _identity_chain(L, C)
    eng = make_engine(SELF, spec=spec, mode="skip", fuse="concat", k=2, batch=1, record=True,
                      dtype=np.float64)
    for l, u in eng.units.items():
        w = u.layers[0].params["w"]
        w[...] = 0
        u.layers[0].params["b"][...] = 0
        cin = u.in_shape[2]
        src = slice(0, C) if (pick == "direct" or cin == C or l != L) else slice(C, 2 * C)
        w[0, 0, src, :] = np.eye(C)
    clip = np.arange(1, T + 1, dtype=np.float64)[None, :, None, None, None] * np.ones(
        (1, T, 4, 4, C))
    eng.run_clip(T, clip, None, train=False)
    cells = schedule.provenance(eng.topo, T)
    for r in eng.records:
        if not r.valid:
            continue
        value = float(r.h.mean())
        assert np.allclose(r.h, value)
        if pick == "direct" or r.l != L:
            assert value == cells[(r.l, r.t)].frame == r.t - r.l + 1
        else:  # the top unit reads only tau(h_{L-2}) from step t-1: frame (t-1)-(L-2)+1
            assert value == r.t - L + 2
            assert value in cells[(r.l, r.t)].frames


def test_one_unit_is_per_frame_backprop():
    """mode 'bp': a single unit; its gradient at step t is backprop on frame t."""
    T = 5
    eng = make_engine(SELF, L=4, mode="bp", dtype=np.float64, record=True)
    assert eng.topo.L == 1
    rng = np.random.default_rng(1)
    clip = rng.standard_normal((2, T, 8, 8, 3))
    labels = np.array([2, 1])
    eng.run_clip(T, clip, labels, update=False)
    assert [r.t for r in eng.records if r.c_valid] == list(range(1, T + 1))
    for r in eng.records:
        exact, _ = static_backprop(eng.topo, eng.units, clip[:, r.t - 1], labels)
        assert rel_err(r.grad, exact[1]) < 1e-12


def test_reset_mode_update_is_mean_of_valid_step_gradients():
    L, T = 3, 8
    eng = make_engine(SELF, L=L, mode="skip", dtype=np.float64, record=True,
                      optimizer=dict(name="sgd", lr=0.5, momentum=0.0))
    before = eng.parameters()
    rng = np.random.default_rng(2)
    clip = rng.standard_normal((2, T, 8, 8, 3))
    eng.run_clip(T, clip, np.array([0, 1]))
    after = eng.parameters()
    for l in range(1, L + 1):
        gs = [r.grad for r in eng.records if r.l == l and r.c_valid]
        assert len(gs) == T - (2 * L - l) + 1
        expect = before[l] - 0.5 * np.mean(gs, axis=0)
        assert rel_err(after[l], expect) < 1e-12


def test_different_modes_give_different_training():
    """Sanity for the placement tests: the modes are really different computations."""
    res = {}
    for mode, fuse in [("sideways", "concat"), ("skip", "concat"), ("skip", "add")]:
        eng = make_engine(SELF, L=4, mode=mode, fuse=fuse)
        rng = np.random.default_rng(0)
        eng.run_clip(10, rng.standard_normal((2, 10, 8, 8, 3)), np.array([0, 1]))
        res[(mode, fuse)] = eng.parameters()[1]
    a, b, c = res.values()
    assert a.shape == c.shape and not np.array_equal(a, c)
    assert not np.array_equal(a[: b.size], b[: a.size]) or a.shape != b.shape


def test_rank_count_that_does_not_fit_is_a_clear_error():
    with pytest.raises(TopologyError, match="only 4 units"):
        Placement(4, 8)
    with pytest.raises(TopologyError, match="equal replicas"):
        Placement(4, 6, replicas=4)
    p = Placement(8, 4)
    assert p.units_of(0) == [1, 2] and p.units_of(3) == [7, 8]
    p = Placement(8, 16, replicas=2)
    assert p.units_of(9) == [2] and p.replica_of(9) == 1


def test_balance_by_cost_beats_contiguous_and_is_valid():
    from ssmpi.engine.topology import balance_by_cost

    costs = {1: 1.50, 2: 1.88, 3: 1.50, 4: 2.37, 5: 1.46, 6: 2.36, 7: 1.35, 8: 0.01}
    for P in (2, 3, 4, 8):
        g = balance_by_cost(costs, P)
        assert sorted(l for x in g for l in x) == list(range(1, 9)) and len(g) == P
        Placement(8, P, groups=g)  # accepted as a placement
        best = max(sum(costs[l] for l in x) for x in g)
        contiguous = max(sum(costs[l] for l in x) for x in Placement(8, P).groups)
        assert best <= contiguous
    g = balance_by_cost(costs, 2)
    assert max(sum(costs[l] for l in x) for x in g) < 0.51 * sum(costs.values())
    with pytest.raises(TopologyError, match="each unit exactly once"):
        Placement(4, 2, groups=[[1, 2], [2, 3, 4]])


def test_bad_topology_values_are_clear_errors():
    spec = small_spec(4)
    with pytest.raises(TopologyError, match="mode 'bogus' is not one of"):
        Topology(spec, mode="bogus")
    with pytest.raises(TopologyError, match="fuse 'mul' is not one of"):
        Topology(spec, fuse="mul")
    with pytest.raises(TopologyError, match="needs k >= 2"):
        Topology(spec, mode="skip", k=1)


def test_nonfinite_loss_stops_with_step_and_unit():
    from ssmpi.engine.executor import NonFiniteError

    eng = make_engine(SELF, L=3, mode="skip")
    clip = np.full((2, 8, 8, 8, 3), np.nan, np.float32)
    with pytest.raises(NonFiniteError, match=r"unit U3: non-finite loss nan at step 3"):
        eng.run_clip(8, clip, np.array([0, 1]))


def test_nonfinite_skip_setting_counts_and_keeps_parameters():
    eng = make_engine(SELF, L=3, mode="skip", nonfinite="skip")
    before = eng.parameters()
    clip = np.full((2, 8, 8, 8, 3), np.inf, np.float32)
    st = eng.run_clip(8, clip, np.array([0, 1]))
    assert st.skipped > 0
    for l, p in eng.parameters().items():
        assert np.array_equal(p, before[l])


def test_memory_does_not_grow_with_clip_length():
    """Coarse: bytes allocated by the engine during a clip of 256 frames vs 32 frames."""
    import tracemalloc

    eng = make_engine(SELF, L=3, mode="skip", batch=1, spec=small_spec(3, width=16, res=64))
    peaks = {}
    for T in (32, 256):
        clip = np.random.default_rng(0).standard_normal((1, T, 64, 64, 3)).astype(np.float32)
        eng.run_clip(T, clip, np.array([0]))  # warm up caches
        tracemalloc.start()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        eng.run_clip(T, clip, np.array([0]))
        peaks[T] = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
    assert peaks[32] > 800_000, peaks  # the engine really allocates per step
    assert peaks[256] <= 1.05 * peaks[32], peaks


def test_schedule_cli_prints_tables(capsys):
    assert schedule.main(["--units", "4", "--mode", "skip", "--steps", "9"]) == 0
    out = capsys.readouterr().out
    assert "frame on the direct path" in out and "U4" in out
    row = [ln for ln in out.splitlines() if ln.startswith("U1")][-1]
    assert row.split()[7] == "4(1)"  # U1 uses at step 7 the loss of step 4 on frame 1


def _gpu_available():
    try:
        backend.select("gpu")
        return True
    except backend.BackendError:
        return False
    finally:
        backend.select("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_available(), reason="no CuPy/GPU here")
@pytest.mark.parametrize("mode,fuse", [("sideways", "concat"), ("skip", "concat"),
                                       ("skip", "add")])
def test_cupy_engine_matches_numpy(mode, fuse):
    """The same training on CuPy and NumPy (float64): parameters agree to 1e-10."""
    import cupy

    rng = np.random.default_rng(0)
    clip = rng.standard_normal((2, 10, 8, 8, 3))
    out = {}
    for name, xp in (("numpy", np), ("cupy", cupy)):
        backend.select("gpu" if name == "cupy" else "cpu")
        try:
            eng = make_engine(SELF, L=4, mode=mode, fuse=fuse, dtype=np.float64, xp=xp)
            for _ in range(2):
                eng.run_clip(10, clip, np.array([0, 1]))
            out[name] = eng.parameters()
        finally:
            backend.select("cpu")
    for l in out["numpy"]:
        assert rel_err(out["cupy"][l], out["numpy"][l]) < 1e-10, l
