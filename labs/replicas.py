"""Lab 8: scale out with replicas and find the allreduce in the timeline.

Two traced runs of the same model: 1 replica x 2 ranks, and 2 replicas x 2 ranks (4 ranks,
data parallel x depth parallel). The gradient allreduce between replicas runs inside the
``update`` span at the end of every iteration. The checker reads both traces.
"""

from __future__ import annotations

from pathlib import Path

from .common import (
    Verdict,
    answered,
    close,
    differences,
    load_answers,
    run_config,
    run_dir,
    trace_rows,
)

TITLE = "Scale out with replicas and see the allreduce in the timeline"

TEMPLATE = """\
# Lab 8: replicas and the gradient allreduce.
single_run = "runs/lab8-r1"
replicated_run = "runs/lab8-r2"

# in the replicated run (4 ranks = 2 replicas x 2 ranks): the rank that averages its
# gradients with rank 1 (it holds the same units in the other replica)
partner_of_rank_1 = "?"

# mean duration of rank 1's red 'update' spans (ms), in each run (trace.png, or open
# trace.json in https://ui.perfetto.dev and click the spans)
update_ms_single = "?"
update_ms_replicated = "?"
"""


def update_ms(rows, rank: int) -> float:
    d = [r["dur"] for r in rows if r["rank"] == rank and r["cat"] == "update"]
    return sum(d) / len(d) if d else float("nan")


def check(answer: Path, base: Path) -> Verdict:
    v = Verdict()
    ans = load_answers(answer)
    runs = {}
    for key, replicas in (("single_run", 1), ("replicated_run", 2)):
        r = run_dir(v, ans, key, base)
        if r is None:
            continue
        cfg = run_config(r)
        rows = trace_rows(r)
        ok = v.need(cfg["engine"]["replicas"] == replicas,
                    f"{key}: {r} has engine.replicas = {cfg['engine']['replicas']}, "
                    f"expected {replicas}")
        ok &= v.need(bool(rows), f"{key}: {r} has no trace.json (--set run.trace=3)")
        if ok:
            ranks = sorted({x["rank"] for x in rows})
            v.need(len(ranks) == 2 * replicas, f"{key}: {r} ran on {len(ranks)} ranks, "
                   f"expected {2 * replicas}")
            runs[key] = (cfg, rows)
    if len(runs) == 2:
        diff = differences(runs["single_run"][0], runs["replicated_run"][0],
                           ignore=("run.name", "engine.replicas", "about"))
        v.need(not diff, f"the runs differ in more than engine.replicas: {', '.join(diff)}")
    partner = answered(v, ans, "partner_of_rank_1", int)
    if partner is not None:
        from ssmpi.engine.topology import Placement

        pl = Placement(4, 4, replicas=2)
        want = [r for r in range(4) if r != 1 and pl.position_of(r) == pl.position_of(1)]
        v.need([partner] == want, f"partner_of_rank_1 = {partner} is not right (ranks are "
               "laid out replica-major: README, 'Ranks and units')")
    for key, run in (("update_ms_single", "single_run"),
                     ("update_ms_replicated", "replicated_run")):
        got = answered(v, ans, key, float)
        if got is not None and run in runs:
            ms = update_ms(runs[run][1], 1)
            v.need(close(got, ms, 0.25, 0.5), f"{key} = {got}: rank 1's update spans in "
                   f"{run} measure something else (mean over the traced iterations)")
    if len(runs) == 2:
        a, b = (update_ms(runs[k][1], 1) for k in ("single_run", "replicated_run"))
        v.note(f"rank 1's update: {a:.2f} ms alone, {b:.2f} ms with a replica (the "
               "difference is the allreduce, and waiting for the slower replica)")
    return v
