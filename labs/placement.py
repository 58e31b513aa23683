"""Lab 3: find the slowest rank in a timeline, then fix the placement.

Two runs of the same model on 4 ranks with ``--set run.trace=3``: contiguous placement
(the default: U1,U2 | U3,U4 | U5 | U6) and ``engine.placement=balanced`` (units split by
their measured cost). The checker reads both ``trace.json`` files: the rank named slowest
must be the one with the most compute in the contiguous run, and the balanced run must
spread the compute more evenly (a lower max / mean compute per rank).
"""

from __future__ import annotations

from pathlib import Path

from .common import (
    Verdict,
    answered,
    differences,
    load_answers,
    per_rank_ms,
    run_config,
    run_dir,
    trace_rows,
)

TITLE = "Find the slowest rank in a timeline and fix the placement"

TEMPLATE = """\
# Lab 3: the slowest rank and a better placement.
# the rank that computes the most in runs/lab3-contiguous (trace.png: the row with the
# least waiting; its neighbours wait for it)
slowest_rank = "?"

# which units that rank holds, e.g. [1, 2]
slowest_units = ["?"]

contiguous_run = "runs/lab3-contiguous"
balanced_run = "runs/lab3-balanced"
"""


def imbalance(compute: dict) -> float:
    """max / mean compute over ranks (1 = perfectly even)."""
    vals = list(compute.values())
    return max(vals) / (sum(vals) / len(vals)) if vals and sum(vals) > 0 else float("nan")


def check(answer: Path, base: Path) -> Verdict:
    v = Verdict()
    ans = load_answers(answer)
    rank = answered(v, ans, "slowest_rank", int)
    units = answered(v, ans, "slowest_units", list)
    runs = {}
    for key in ("contiguous_run", "balanced_run"):
        r = run_dir(v, ans, key, base)
        if r is None:
            continue
        rows = trace_rows(r)
        if not v.need(bool(rows), f"{key}: {r} has no trace.json (train with "
                      "--set run.trace=3)"):
            continue
        runs[key] = (r, run_config(r), per_rank_ms(rows, "compute"))
    if "contiguous_run" in runs:
        r, cfg, comp = runs["contiguous_run"]
        v.need(cfg["engine"]["placement"] == "contiguous",
               f"contiguous_run: {r} used engine.placement = {cfg['engine']['placement']!r}")
        v.need(len(comp) >= 2, f"contiguous_run: {r} ran on one rank: use mpiexec -n 3")
        slowest = max(comp, key=comp.get)
        v.note("contiguous: compute per rank (ms) "
               + ", ".join(f"rank {p}: {c:.0f}" for p, c in sorted(comp.items()))
               + f"; max/mean {imbalance(comp):.2f}")
        if rank is not None:
            v.need(rank == slowest, f"slowest_rank = {rank}: in your trace another rank "
                   "computes more (add up the blue 'compute' spans per row)")
        if units is not None and rank == slowest:
            from ssmpi.engine.topology import Placement

            ranks = len(comp)
            n_units = cfg["model"]["units"] + (1 if cfg["model"].get("input_unit") else 0)
            want = Placement(n_units, ranks).units_of(slowest)
            v.need(sorted(units) == want if all(isinstance(u, int) for u in units) else False,
                   f"slowest_units = {units} is not what rank {slowest} holds (the rows of "
                   "trace.png, or the placement line the trainer prints)")
    if len(runs) == 2:
        (_, cc, comp_c), (rb, cb, comp_b) = runs["contiguous_run"], runs["balanced_run"]
        v.need(cb["engine"]["placement"] == "balanced",
               f"balanced_run: {rb} used engine.placement = {cb['engine']['placement']!r}: "
               "add --set engine.placement=balanced")
        diff = differences(cc, cb, ignore=("run.name", "engine.placement", "about"))
        v.need(not diff, f"the two runs differ in more than the placement: {', '.join(diff)}")
        v.need(len(comp_b) == len(comp_c), "the two runs used different numbers of ranks")
        ic, ib = imbalance(comp_c), imbalance(comp_b)
        v.note("balanced: compute per rank (ms) "
               + ", ".join(f"rank {p}: {c:.0f}" for p, c in sorted(comp_b.items()))
               + f"; max/mean {ib:.2f}")
        v.need(ib < 0.95 * ic, f"the balanced run is not more even than the contiguous one "
               f"(max/mean compute {ib:.2f} vs {ic:.2f}); timings on a loaded machine are "
               "noisy: run both again")
    return v
