"""The layout rules that keep the architecture readable (DESIGN.md)."""

import re
from pathlib import Path

SSMPI = Path(__file__).resolve().parents[1] / "ssmpi"


def _importers(pattern):
    rx = re.compile(pattern, re.M)
    return sorted(str(p.relative_to(SSMPI)) for p in SSMPI.rglob("*.py") if rx.search(
        p.read_text()))


def test_mpi_only_in_the_transport_the_reducer_and_failure():
    """Every MPI decision lives in engine/transport.py (point-to-point, collectives, waits)
    and engine/reducer.py (the gradient allreduce); failure.py aborts the job."""
    assert _importers(r"^\s*(import mpi4py|from mpi4py)") == [
        "engine/reducer.py", "engine/transport.py", "failure.py"]


def test_cupy_only_in_backend():
    assert _importers(r"^\s*(import cupy|from cupy)") == ["backend.py"]


def test_unit_step_is_pure():
    """The step of the paper: no MPI, no timing, no tracing, no I/O."""
    text = (SSMPI / "engine" / "step.py").read_text()
    for word in ("mpi4py", "time.", "tracer", "print(", "open("):
        assert word not in text, word
