"""python -m ssmpi.timelines: the idle share, the combined trace, the command line, a real run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ssmpi import timelines

ROOT = Path(__file__).resolve().parents[1]


def rows(rank, *spans):
    return [dict(rank=rank, label=f"U{rank + 1}", name="x", cat=c, t0=t0, dur=d, step=1)
            for c, t0, d in spans]


def test_idle_share_counts_every_non_busy_moment():
    """Two ranks over a 10 s window: rank 0 busy 8 s (compute + update), rank 1 busy 2 s,
    waiting 3 s and absent 5 s: idle = 1 - 10 / 20; over 4 ranks 1 - 10 / 40."""
    r = rows(0, ("compute", 0.0, 7.0), ("update", 7.0, 1.0), ("wait", 8.0, 2.0)) + \
        rows(1, ("wait", 0.0, 3.0), ("compute", 3.0, 2.0))
    sh = timelines.shares(r, 2, 4)
    assert sh["window_s"] == pytest.approx(10.0)
    assert sh["busy_s"] == pytest.approx(10.0) and sh["wait_s"] == pytest.approx(5.0)
    assert sh["idle"] == pytest.approx(0.5) and sh["idle_all"] == pytest.approx(0.75)
    assert timelines.per_rank(r)[1] == {"wait": 3.0, "compute": 2.0}


def test_combined_trace_has_one_process_per_scheme_from_zero():
    panels = [dict(title="a", rows=rows(0, ("compute", 100.0, 1.0))),
              dict(title="b", rows=rows(0, ("compute", 5.0, 2.0)) + rows(1, ("wait", 6.0, 1)))]
    ev = timelines.combined_trace(panels)["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in ev if e["name"] == "process_name"}
    assert procs == {0: "a", 1: "b"}
    x = [e for e in ev if e["ph"] == "X"]
    assert [e["ts"] for e in x if e["pid"] == 0] == [0.0]  # each scheme starts at 0
    assert sorted(e["tid"] for e in x if e["pid"] == 1) == [0, 1]


@pytest.mark.parametrize("args,msg", [
    (["--ranks", "5", "--units", "4"], "--ranks must be in 1..4"),
    (["--schemes", "sideways,nope"], "nope"),
    (["--iters", "0"], "--iters must be >= 1"),
])
def test_bad_options_are_one_line_and_exit_2(args, msg, tmp_path):
    p = subprocess.run([sys.executable, "-m", "ssmpi.timelines", "--out", str(tmp_path), *args],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 2 and msg in p.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def check_summary(out: Path):
    """What a real run of ``python -m ssmpi.timelines`` wrote to ``out`` (the tutorial's
    command runs in tests/test_tutorial.py, which calls this)."""
    summary = json.loads((out / "summary.json").read_text())
    got = {s["scheme"]: s for s in summary["schemes"]}
    assert list(got) == list(timelines.SCHEMES)
    assert got["bp"]["ranks"] == 1 and got["skip"]["ranks"] == summary["ranks"]
    for s in got.values():
        assert 0.0 <= s["idle"] < 1.0 and s["iter_s"] > 0 and s["busy_s"] > 0
        assert s["idle_all"] >= s["idle"] - 1e-9
    assert got["gpipe"]["wait_s"] > 0  # stage 0 waits for the backward to come back
    ev = json.loads((out / "timelines.json").read_text())["traceEvents"]
    assert len({e["pid"] for e in ev}) == 4
    assert (out / "timelines.png").stat().st_size > 10_000
