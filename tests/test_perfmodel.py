"""ssmpi.perfmodel: the formulas on hand-computable cases, profiling, validation, projection."""

import numpy as np
import pytest
from engine_helpers import small_spec

from ssmpi import perfmodel as pm
from ssmpi.engine.topology import Topology

NOLINK = pm.Link(bandwidth=1e30, latency=0.0)


def _units(L, f=1.0, b=2.0):
    return [pm.UnitCost(f, b) for _ in range(L)]


def test_link_cost():
    assert pm.Link(1e9, 1e-5).cost(1e9) == pytest.approx(1 + 1e-5)
    assert pm.Link(1e9, 1e-5).cost(0) == 0.0


def test_sideways_reset_mode_fill_and_steady_state():
    """One unit per rank, f=1, b=2: steps 1..L-1 do forwards only (1 s, the slowest rank);
    from step L the top unit's VJP is valid, so the step costs f+b = 3 s."""
    L, T = 4, 10
    steps = pm.sideways_step_times(_units(L), T, P=L, link=NOLINK)
    assert steps == [1.0] * (L - 1) + [3.0] * (T - L + 1)
    assert pm.sideways_iteration(_units(L), T, L, NOLINK) == (L - 1) + 3 * (T - L + 1)


def test_sideways_serial_is_sum_of_active_units():
    L, T = 3, 6
    # serial: step t costs sum_l f [t>=l] + b [t >= 2L-l]
    want = sum(sum(1.0 * (t >= l) + 2.0 * (t >= 2 * L - l) for l in range(1, L + 1))
               for t in range(1, T + 1))
    assert pm.sideways_iteration(_units(L), T, 1, NOLINK) == pytest.approx(want)


def test_oversubscribed_ranks_share_cores():
    """8 ranks, 2 cores, stream mode: each step is the total work / 2."""
    steps = pm.sideways_step_times(_units(8), 5, P=8, link=NOLINK, cores=2, stream=True)
    assert steps == [8 * 3.0 / 2] * 5
    assert pm.sideways_step_times(_units(8), 5, 8, NOLINK, cores=8, stream=True) == [3.0] * 5


def test_message_cost_is_added_once_per_step():
    u = [pm.UnitCost(1.0, 2.0, out_bytes=1e9) for _ in range(2)]
    steps = pm.sideways_step_times(u, 3, P=2, link=pm.Link(1e9, 0.0), stream=True)
    assert steps == [4.0] * 3
    assert pm.sideways_step_times(u, 3, P=1, link=pm.Link(1e9, 0.0), stream=True) == [6.0] * 3


def test_gpipe_bubble():
    """P equal stages, M micro-batches: (M + P - 1) (F + B)."""
    P, M = 4, 6
    assert pm.gpipe_iteration(_units(P), M, P, NOLINK) == pytest.approx(3 * (M + P - 1))
    # one stage: no bubble, M (F + B)
    assert pm.gpipe_iteration(_units(P), M, 1, NOLINK) == pytest.approx(M * 4 * 3)
    # 8 stages on 2 cores: the bubble (M=2) or the total work / 2 (M=16) bounds it
    assert pm.gpipe_iteration(_units(8), 2, 8, NOLINK, cores=2) == pytest.approx(3 * (2 + 7))
    assert pm.gpipe_iteration(_units(8), 16, 8, NOLINK, cores=2) == pytest.approx(16 * 24 / 2)


def test_gpipe_micro_batches_of_clips():
    P, T = 4, 12
    u = _units(P)
    # default: one micro-batch per frame
    assert pm.gpipe_iteration(u, T, P, NOLINK, micro=T) == pm.gpipe_iteration(u, T, P, NOLINK)
    # M = 3 micro-batches of 4 frame steps each: 4 * 3 per stage, bubble (M + P - 1)
    assert pm.gpipe_iteration(u, T, P, NOLINK, micro=3) == pytest.approx(4 * 3 * (3 + P - 1))


def test_calibration_reproduces_the_serial_run():
    """Per-unit calibration makes the model reproduce the 1-rank run's per-unit seconds."""
    costs = [pm.UnitCost(1.0, 2.0), pm.UnitCost(1.0, 2.0), pm.UnitCost(1.0, 2.0)]
    T, L = 8, 3
    run = {"T": T, "steps_per_s": 1 / 100.0,
           "compute_by_unit": [{"1": 30.0, "2": 20.0, "3": 40.0}]}
    cal, over = pm.calibrate(costs, run, "skip")
    for l, c in enumerate(cal, start=1):
        nf, nb = pm._step_counts(L, l, T, "skip")
        assert c.f * nf + c.b * nb == pytest.approx(run["compute_by_unit"][0][str(l)])
        assert c.b == pytest.approx(2 * c.f)  # the forward/VJP split of the profile is kept
    assert over == pytest.approx(10.0)
    assert pm.sideways_iteration(cal, T, 1, NOLINK, update_s=over) == pytest.approx(100.0)


def test_bp_and_remat():
    u = _units(3)
    assert pm.bp_iteration(u, 5) == 5 * 9
    assert pm.bp_iteration(u, 5, remat=True) == 5 * 12
    assert pm.bp_iteration(u, 5, update_s=0.5) == 45.5


def test_profile_units_and_validate():
    topo = Topology(small_spec(3), mode="skip")
    costs = pm.profile_units(topo, batch=2, reps=1)
    assert len(costs) == 3 and all(c.f > 0 and c.b > 0 for c in costs)
    assert costs[0].out_bytes == 2 * int(np.prod(topo.out_shapes[1])) * 4
    assert costs[0].shortcut_bytes > 0 and costs[2].shortcut_bytes == 0
    from dataclasses import asdict
    prof = {m: [asdict(c) for c in costs] for m in ("skip", "sideways")}
    prof["bp"] = [asdict(pm.UnitCost(sum(c.f for c in costs), sum(c.b for c in costs)))]
    t = pm.sideways_iteration(costs, 8, 1, pm.Link())
    speed = {"profile": prof, "cores": 2,
             "runs": [{"algo": "skip", "ranks": 1, "T": 8, "steps_per_s": 1 / t}]}
    (row,) = pm.validate(speed)
    assert abs(row["error_pct"]) < 1e-9


def test_projection_of_the_paper_setting():
    p = pm.project_paper()
    assert p["skip 8"] > p["skip 2"] > p["skip 1"]
    assert p["causal3d 1"] > p["causal3d-remat 1"]
    assert all(np.isfinite(v) and v > 0 for v in p.values())
