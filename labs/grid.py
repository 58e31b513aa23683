"""Lab 2: read the rank x step grid, then check the plan against what ran.

Skip-Sideways (k = 2), 6 units on 3 ranks (U1,U2 | U3,U4 | U5,U6), a clip of 12 frames.
Predict from the rules of ALGORITHM.md, then print the plan and record a real run
(``--set run.record=N``), whose ``grid.txt`` must say that the measured grid equals it.
"""

from __future__ import annotations

from pathlib import Path

from .common import Verdict, answered, load_answers, run_config, run_dir

TITLE = "Read the rank x step grid; record a real run and compare"
L, RANKS, T = 6, 3, 12

TEMPLATE = """\
# Lab 2: Skip-Sideways (k = 2), 6 units on 3 ranks (rank 0: U1,U2; rank 1: U3,U4;
# rank 2: U5,U6), one clip of 12 frames from a reset. Replace every "?".

# the first step at which each rank applies a pseudo-gradient (does a VJP), rank 0, 1, 2
first_vjp_step = ["?", "?", "?"]

# messages that cross ranks (MPI) at the end of every step but the last, valid or not
mpi_messages_per_step = "?"

# of those, how many carry valid data at the end of step 6
valid_mpi_messages_after_step_6 = "?"

# your recorded run (labs/README.md, lab 2): its grid.txt compares it with the plan
run = "runs/lab2-grid"
"""


def expected():
    """(first VJP step per rank, MPI messages per step, valid MPI messages after step 6),
    from the executed plan."""
    from ssmpi.engine import plan
    from ssmpi.engine.message import ACT
    from ssmpi.engine.topology import Placement, Topology

    topo = Topology(plan.chain_spec(L), mode="skip", k=2)
    pl = Placement(L, RANKS)
    recs, log = plan.run_plan(topo, T)
    first = [min(t for (l, t), r in recs.items() if l in g and r.c_valid) for g in pl.groups]
    mpi = [(t, e, kind, m) for t, e, kind, m in log
           if pl.rank_of(e.src) != pl.rank_of(e.dst)]
    per_step = {len([x for x in mpi if x[0] == t]) for t in range(1, T)}
    assert len(per_step) == 1 and all(kind in (ACT, "grad") for _, _, kind, _ in mpi)
    valid6 = sum(1 for t, _, _, m in mpi if t == 6 and m.valid)
    return first, per_step.pop(), valid6


def check(answer: Path, base: Path) -> Verdict:
    v = Verdict()
    ans = load_answers(answer)
    first, per_step, valid6 = expected()
    got = answered(v, ans, "first_vjp_step", list)
    if got is not None:
        if len(got) != RANKS or any(isinstance(x, str) for x in got):
            v.wrong.append(f"first_vjp_step: expected {RANKS} numbers (rank 0, 1, 2), "
                           f"got {got!r}")
        else:
            for p, (g, w) in enumerate(zip(got, first)):
                v.need(g == w, f"first_vjp_step: rank {p} is not right ({g})")
    n = answered(v, ans, "mpi_messages_per_step", int)
    if n is not None:
        v.need(n == per_step, f"mpi_messages_per_step = {n} is not right (hint: an edge has "
               "two channels, and invalid messages travel too)")
    n = answered(v, ans, "valid_mpi_messages_after_step_6", int)
    if n is not None:
        v.need(n == valid6, f"valid_mpi_messages_after_step_6 = {n} is not right")
    run = run_dir(v, ans, "run", base)
    if run is not None:
        cfg = run_config(run)
        eng, model = cfg["engine"], cfg["model"]
        units = model["units"] + (1 if model.get("input_unit") else 0)
        v.need(eng["mode"] == "skip" and eng["k"] == 2 and units == L and
               eng["replicas"] == 1 and cfg["data"]["clip_len"] == T,
               f"run: {run} is not Skip-Sideways k=2 with {L} units and clips of {T} frames "
               "(use the lab's command)")
        grid = run / "grid.txt"
        if v.need(grid.is_file(), f"run: {run} has no grid.txt (train with "
                  "--set run.record=2)"):
            text = grid.read_text()
            v.need(f"{RANKS} ranks per pipeline" in text,
                   f"run: {grid} is not from a run on {RANKS} ranks (mpiexec -n {RANKS})")
            v.need("the measured grid equals the plan" in text,
                   f"run: {grid} says the measured grid differs from the plan")
    return v
