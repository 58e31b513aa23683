"""ssmpi.trace: spans, Chrome trace JSON, Gantt PNG, and the engine / GPipe integration."""

import json

import numpy as np
import pytest
from engine_helpers import make_engine, small_spec
from mpi4py import MPI

from ssmpi import backend
from ssmpi.baselines import GPipe
from ssmpi.engine.topology import Placement, Topology
from ssmpi.trace import Tracer, chrome_trace

backend.select("cpu")


def test_span_records_name_category_step_and_duration():
    tr = Tracer(rank=3, label="U4")
    tr.set_step(7)
    with tr.span("work", "compute"):
        sum(range(10000))
    with tr.span("idle", "wait"):
        pass
    (n, c, t0, d, s), (n2, c2, _, _, _) = tr.events
    assert (n, c, s, n2, c2) == ("work", "compute", 7, "idle", "wait")
    assert d > 0 and set(tr.totals()) == {"compute", "wait"}


def test_disabled_tracer_records_nothing():
    tr = Tracer(enabled=False)
    with tr.span("x"):
        pass
    tr.add("y", "wait", 0.0, 1.0)
    assert tr.events == []


def test_span_records_even_when_the_body_raises():
    tr = Tracer()
    with pytest.raises(RuntimeError):
        with tr.span("boom"):
            raise RuntimeError("x")
    assert tr.events[0][0] == "boom"


def test_chrome_trace_format():
    rows = [dict(rank=r, label=f"U{r + 1}", name="U", cat="compute", t0=10.0 + r, dur=0.5,
                 step=1) for r in range(2)]
    ev = chrome_trace(rows, "t")["traceEvents"]
    x = [e for e in ev if e["ph"] == "X"]
    assert [e["tid"] for e in x] == [0, 1]
    assert x[0]["ts"] == 0 and x[1]["ts"] == pytest.approx(1e6) and x[0]["dur"] == 5e5
    names = {e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {"rank 0 (U1)", "rank 1 (U2)"}


def test_dump_writes_json_and_png(tmp_path):
    tr = Tracer(rank=0)
    with tr.span("a"):
        pass
    out = tr.dump(tmp_path / "t.json", MPI.COMM_SELF, title="test")
    data = json.loads((tmp_path / "t.json").read_text())
    assert any(e["ph"] == "X" and e["name"] == "a" for e in data["traceEvents"])
    try:
        import matplotlib  # noqa: F401
        assert out["png"] and (tmp_path / "t.png").stat().st_size > 1000
    except ImportError:
        assert out["png"] is None and "matplotlib" in out["note"]


def test_engine_tracer_spans_every_unit_step_and_wait():
    tr = Tracer()
    eng = make_engine(MPI.COMM_SELF, L=4, tracer=tr)
    fr = np.zeros((2, 6, 8, 8, 3), np.float32)
    eng.run_clip(6, fr, np.zeros(2, np.int64))
    comp = [e for e in tr.events if e[1] == "compute"]
    assert len(comp) == 4 * 6 and {e[0] for e in comp} == {"U1", "U2", "U3", "U4"}
    assert sorted({e[4] for e in comp}) == list(range(1, 7))
    assert sum(e[1] == "wait" for e in tr.events) == 6
    assert sum(e[1] == "data" for e in tr.events) == 6
    assert sum(e[1] == "update" for e in tr.events) == 1


def test_engine_without_tracer_is_unchanged():
    """tracer=None (default) trains exactly like a traced engine."""
    fr = np.random.default_rng(0).standard_normal((2, 6, 8, 8, 3)).astype(np.float32)
    lab = np.array([0, 2])
    a = make_engine(MPI.COMM_SELF, L=4)
    b = make_engine(MPI.COMM_SELF, L=4, tracer=Tracer())
    assert a.run_clip(6, fr, lab).losses == b.run_clip(6, fr, lab).losses
    assert all(np.array_equal(a.parameters()[l], b.parameters()[l]) for l in a.units)


def test_gpipe_tracer_shows_forward_then_backward():
    tr = Tracer()
    topo = Topology(small_spec(3), mode="sideways")
    gp = GPipe(topo, Placement(3, 1), MPI.COMM_SELF, batch=2, tracer=tr)
    gp.run_clip(3, np.zeros((2, 3, 8, 8, 3), np.float32), np.zeros(2, np.int64))
    names = [e[0] for e in tr.events if e[1] == "compute"]
    assert names[0] == "F1 U1" and names[-1] == "B1 U1"
    assert names.index("B3 U3") > names.index("F3 U3")
