"""The executed plan (ssmpi.engine.plan): the engine's own step run on symbols.

The plan is not a second implementation of the rules: it runs unit_step and the Executor.
These tests check it against the closed forms of ALGORITHM.md and against the headers of
real engine runs (serial here; under MPI in test_plan_mpi.py).
"""

import numpy as np
import pytest
from engine_helpers import make_engine
from mpi4py import MPI

from ssmpi import backend
from ssmpi.engine import plan
from ssmpi.engine.topology import Placement, Topology

backend.select("cpu")


@pytest.mark.parametrize("mode,k", [("sideways", 1), ("skip", 2), ("skip", 3), ("fa-skip", 2)])
@pytest.mark.parametrize("L", [2, 3, 5, 8])
def test_plan_follows_the_closed_forms(mode, k, L):
    """Direct-path frame t-l+1; pseudo-gradient at U_l from the loss of step t-(L-l) on frame
    t-2L+l+1; first valid gradient at step 2L-l; nothing valid before the pipeline fills."""
    if k >= L:
        pytest.skip("k < L")
    topo = Topology(plan.chain_spec(L), mode=mode, k=k)
    T = 3 * L
    cells = plan.provenance(topo, T)
    for (l, t), c in cells.items():
        if t < l:
            assert c.frame is None and c.loss_step is None
            continue
        assert c.frame == t - l + 1
        if t >= 2 * L - l:
            assert c.loss_step == t - (L - l) and c.loss_frame == t - 2 * L + l + 1
        else:
            assert c.loss_step is None, (l, t)


@pytest.mark.parametrize("L", [4, 6, 7])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_unit_sees_frames_along_the_shortest_path(L, k):
    """The top unit's input mixes the direct-path frame t-L+1 with newer frames: a path of h
    edges from U_1 brings frame t-h, the newest along the shortest path of ceil((L-1)/k)
    edges, and every path length in between occurs (Sideways: one frame only)."""
    T = 3 * L
    cells = plan.provenance(Topology(plan.chain_spec(L), mode="skip" if k > 1 else "sideways",
                                     k=k), T)
    frames = cells[(L, T)].frames
    hops = -(-(L - 1) // k)
    assert frames == frozenset(range(T - L + 1, T - hops + 1)), sorted(frames)


@pytest.mark.parametrize("mode,k", [("sideways", 1), ("skip", 2), ("skip", 3)])
def test_plan_equals_the_headers_of_a_real_run(mode, k):
    """Every (unit, step): validity, frame, shortcut frames, VJP and loss step of a real
    engine run equal the plan's; the message log equals the plan's message log."""
    L, T = 5, 12
    eng = make_engine(MPI.COMM_SELF, L=L, mode=mode, k=k, record="headers")
    rng = np.random.default_rng(0)
    eng.run_clip(T, rng.standard_normal((2, T, 8, 8, 3)).astype(np.float32), np.array([0, 1]))
    recs, log = plan.run_plan(eng.topo, T)
    got = {(r.l, r.t): r for r in eng.records}
    assert got.keys() == recs.keys()
    for key, r in recs.items():
        g = got[key]
        assert (g.valid, g.frame, g.shortcut_frames, g.c_valid, g.loss_step) == \
            (r.valid, r.frame, r.shortcut_frames, r.c_valid, r.loss_step), key

    def headers(lg):
        return sorted((t, e.eid, kind, m.valid, m.frame if m.valid else 0,
                       m.loss_step if m.valid else 0) for t, e, kind, m in lg)
    assert headers(eng.executor.log) == headers(log)
    pl = Placement(L, 1)
    assert plan.render_grid(eng.topo, pl, T, records=got, log=eng.executor.log,
                            title="x") == plan.render_grid(eng.topo, pl, T, title="x")


def test_grid_marks_mpi_and_local_edges():
    topo = Topology(plan.chain_spec(4), mode="skip", k=2)
    text = plan.render_grid(topo, Placement(4, 2), 10)
    assert "U1->U2 act  copy" in text and "U2->U3 act  MPI" in text
    assert "rank 0 (U1,U2)" in text and "1:F7B4" in text  # U1's first VJP: step 2L-1 = 7


def test_plan_cli_grid_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "grid.png"
    assert plan.main(["--units", "4", "--ranks", "2", "--steps", "10", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "actions (F<f>" in out and "messages sent" in out
    assert png.stat().st_size > 5000
