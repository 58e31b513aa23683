"""No hangs: a failing or silent rank ends the whole MPI job with a message naming it."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "fault_run.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _run(n, *args, timeout=90):
    t0 = time.monotonic()
    p = subprocess.run(["mpiexec", "-n", str(n), sys.executable, str(SCRIPT), *args],
                       capture_output=True, text=True, timeout=timeout, env=ENV)
    return p, time.monotonic() - t0


@pytest.mark.timeout(120)
def test_control_run_finishes():
    p, _ = _run(4, "--fail", "none")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "finished" in p.stdout


@pytest.mark.timeout(120)
def test_exception_on_one_rank_aborts_the_job():
    p, dt = _run(4, "--fail", "raise", "--rank", "2", "--step", "5")
    assert p.returncode != 0
    assert "[rank 2 U3] ERROR RuntimeError: injected failure at step 5" in p.stderr, \
        p.stderr[-3000:]
    assert "finished" not in p.stdout
    assert dt < 60, f"took {dt:.1f}s to abort"


@pytest.mark.timeout(120)
def test_watchdog_names_the_rank_that_stopped_answering():
    """Rank 1 stops (sleeps in its step, answering nobody): one line names it, its unit, the
    step and the messages waited for; no other rank reports."""
    p, dt = _run(4, "--fail", "hang", "--rank", "1", "--step", "4", "--watchdog", "2")
    assert p.returncode != 0
    err = p.stderr
    lines = [x for x in err.splitlines() if "HangError" in x]
    assert len(lines) == 1, err[-3000:]
    assert "rank 1 (U2) stopped answering" in lines[0], err[-3000:]
    assert "step 4" in lines[0] and "from rank 1" in lines[0], err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert dt < 20, f"took {dt:.1f}s with a 2 s watchdog"
