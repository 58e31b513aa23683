"""Lab 4: poll or block? Waiting for messages on an oversubscribed laptop.

Two runs that differ only in ``engine.wait_mode``, with more ranks than cores. The checker
reads both runs' final frames/s: the answer must say which was faster in *your* runs and
by how much (within 10%), and why.
"""

from __future__ import annotations

from pathlib import Path

from .common import Verdict, answered, close, differences, final, load_answers, run_config, run_dir

TITLE = "Compare poll and block waiting on an oversubscribed laptop"
WHY = "b"

TEMPLATE = """\
# Lab 4: poll vs block, more ranks than cores.
poll_run = "runs/lab4-poll"
block_run = "runs/lab4-block"

# which wait mode trained more frames per second in YOUR two runs: "poll" or "block"
faster = "?"

# frames/s of the faster run / frames/s of the slower one (the "done:" lines, or the last
# line of each metrics.jsonl), e.g. 1.25
speedup = "?"

# why (one letter):
#  a: poll sends fewer messages
#  b: a rank blocked in MPI's wait keeps spinning on a core, which a rank with work needs;
#     poll sleeps between tests and gives the core away
#  c: block mode copies every message twice
#  d: poll mode skips the messages that arrive late
why = "?"
"""


def check(answer: Path, base: Path) -> Verdict:
    v = Verdict()
    ans = load_answers(answer)
    fps = {}
    cfgs = {}
    for mode in ("poll", "block"):
        r = run_dir(v, ans, f"{mode}_run", base)
        if r is None:
            continue
        cfg = run_config(r)
        cfgs[mode] = cfg
        v.need(cfg["engine"]["wait_mode"] == mode,
               f"{mode}_run: {r} used engine.wait_mode = {cfg['engine']['wait_mode']!r}")
        f = final(r)
        if v.need(f is not None, f"{mode}_run: {r} did not finish (no final line in "
                  "metrics.jsonl)"):
            fps[mode] = f["frames_per_s"]
    if len(cfgs) == 2:
        diff = differences(cfgs["poll"], cfgs["block"],
                           ignore=("run.name", "engine.wait_mode", "about"))
        v.need(not diff, f"the runs differ in more than engine.wait_mode: {', '.join(diff)}")
    faster = answered(v, ans, "faster", str)
    speedup = answered(v, ans, "speedup", float)
    if len(fps) == 2:
        win = max(fps, key=fps.get)
        ratio = max(fps.values()) / min(fps.values())
        v.note(f"frames/s: poll {fps['poll']:.0f}, block {fps['block']:.0f}")
        if faster is not None:
            v.need(faster == win, f"faster = {faster!r}: not what your runs measured")
        if speedup is not None:
            v.need(close(speedup, ratio, 0.10), f"speedup = {speedup}: your runs measured "
                   "something else (faster / slower frames/s, within 10%)")
    why = answered(v, ans, "why", str)
    if why is not None:
        v.need(why.strip().lower() == WHY, f"why = {why!r} is not the reason (read "
               "'Oversubscribed ranks' in README.md)")
    return v
