"""Lab 7: make Sideways fail and Skip-Sideways succeed on a motion task.

The two runs of ``./run.sh`` (left vs right motion; no single frame tells the class). The
checker reads both runs: same settings except the mode, Sideways near chance, Skip-Sideways
well above it; and the frames that reach the top unit, from the executed plan.
"""

from __future__ import annotations

from pathlib import Path

from .common import Verdict, answered, differences, final, load_answers, run_config, run_dir

TITLE = "Make Sideways fail and Skip-Sideways succeed on a motion task"
STEP = 8
WITHOUT_INPUT_UNIT = "b"
SIDEWAYS_MAX, SKIP_MIN = 0.65, 0.9

TEMPLATE = """\
# Lab 7: Sideways vs Skip-Sideways on left-vs-right motion (./run.sh).
sideways_run = "runs/demo-sideways"
skip_run = "runs/demo-skip"

# the demo's model has 5 units (model.input_unit = true adds U1 = the frame itself).
# Which frames reach the top unit's output h_5 at step 8 of a clip? e.g. "3" or "2-5"
top_frames_sideways = "?"
top_frames_skip = "?"

# docs/FINDINGS.md: without the input unit (model.input_unit = false), Skip-Sideways on
# this task (one letter):
#  a: learns it as fast
#  b: stays near chance, although exact backprop through time of the same model learns it
#  c: diverges
#  d: learns it, but Sideways does too
without_input_unit = "?"
"""


def top_frames(mode: str, units: int = 5):
    from ssmpi.engine import plan
    from ssmpi.engine.topology import Topology

    topo = Topology(plan.chain_spec(units), mode=mode, k=2 if mode == "skip" else 1)
    return plan.provenance(topo, STEP)[(units, STEP)].frames


def check(answer: Path, base: Path) -> Verdict:
    from .provenance import parse_cell

    v = Verdict()
    ans = load_answers(answer)
    runs = {}
    for mode in ("sideways", "skip"):
        r = run_dir(v, ans, f"{mode}_run", base)
        if r is None:
            continue
        cfg = run_config(r)
        v.need(cfg["engine"]["mode"] == mode,
               f"{mode}_run: {r} trained engine.mode = {cfg['engine']['mode']!r}")
        f = final(r)
        if v.need(f is not None and f.get("eval"), f"{mode}_run: {r} did not finish"):
            runs[mode] = (cfg, f["eval"]["clip_acc"])
    if len(runs) == 2:
        diff = differences(runs["sideways"][0], runs["skip"][0],
                           ignore=("run.name", "engine.mode", "about"))
        v.need(not diff, f"the runs differ in more than engine.mode: {', '.join(diff)}")
        acc_side, acc_skip = runs["sideways"][1], runs["skip"][1]
        v.note(f"test clip accuracy: sideways {acc_side:.3f}, skip {acc_skip:.3f}")
        v.need(acc_side <= SIDEWAYS_MAX, f"Sideways reached {acc_side:.3f}: on a task that "
               "no single frame solves it should stay near chance (data.flip? the dataset?)")
        v.need(acc_skip >= SKIP_MIN, f"Skip-Sideways reached {acc_skip:.3f} < {SKIP_MIN}: "
               "train longer, or check the settings of jobs/configs/demo_direction.toml")
    for mode in ("sideways", "skip"):
        got = answered(v, ans, f"top_frames_{mode}", (str, int))
        if got is not None:
            try:
                ok = parse_cell(str(got)) == top_frames(mode)
            except ValueError:
                ok = False
            v.need(ok, f"top_frames_{mode} = {got!r} is not right (the plan's second table)")
    w = answered(v, ans, "without_input_unit", str)
    if w is not None:
        v.need(w.strip().lower() == WITHOUT_INPUT_UNIT, f"without_input_unit = {w!r}: read "
               "docs/FINDINGS.md, Summary")
    return v
