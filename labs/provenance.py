"""Lab 1: predict who sees which frame when (Skip-Sideways, 5 units, k = 3).

The answer is a text file with two tables, in the layout ``python -m ssmpi.plan`` prints.
The checker compares every cell with the executed plan (the engine's own unit step run on
symbols, :mod:`ssmpi.engine.plan`) and names the cells that differ, not their values.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, FrozenSet, Tuple

from .common import AnswerError, Verdict

TITLE = "Predict the provenance tables of Skip-Sideways with k = 3"
L, K, STEPS = 5, 3, 9
SECTIONS = ("frames", "loss")

TEMPLATE = f"""\
# Lab 1: Skip-Sideways, {L} units, k = {K} (shortcut edges U_l -> U_l+2 and U_l -> U_l+3),
# one clip of {STEPS} frames from a reset (frame t enters U1 at step t).
# Replace every '?'. Write '.' for "nothing" (an invalid output, no pseudo-gradient).
#
# frames: the set of frames that reach the output h_l^[t] of unit U_l at step t, through
#         direct and shortcut edges: one frame (4), a range (2-4) or a list (1,3).
frames
unit\\t{''.join(f'{t:>5}' for t in range(1, STEPS + 1))}
""" + "".join(f"U{l:<5}" + "".join(f"{'?':>5}" for _ in range(STEPS)) + "\n"
              for l in range(L, 0, -1)) + f"""
# loss: the step of the loss behind the pseudo-gradient that U_l applies at step t and
#       that reached it over its direct edge (from U_l+1); '.' when U_l applies none.
#       The top unit U{L} applies the gradient of its own step's loss.
loss
unit\\t{''.join(f'{t:>5}' for t in range(1, STEPS + 1))}
""" + "".join(f"U{l:<5}" + "".join(f"{'?':>5}" for _ in range(STEPS)) + "\n"
              for l in range(L, 0, -1))


def expected() -> Dict[str, Dict[Tuple[int, int], FrozenSet[int]]]:
    """{section: {(l, t): set}} from the executed plan."""
    from ssmpi.engine import plan
    from ssmpi.engine.topology import Topology

    cells = plan.provenance(Topology(plan.chain_spec(L), mode="skip", k=K), STEPS)
    return {"frames": {key: frozenset(c.frames) for key, c in cells.items()},
            "loss": {key: frozenset([c.loss_step]) if c.loss_step else frozenset()
                     for key, c in cells.items()}}


def parse_cell(text: str) -> FrozenSet[int]:
    """'.' -> {}, '4' -> {4}, '2-4' -> {2,3,4}, '1,3' -> {1,3}, '5(1)' -> {5}."""
    text = re.sub(r"\(.*?\)", "", text.strip())
    if text in (".", "-", ""):
        return frozenset()
    out = set()
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.update(range(int(lo), int(hi) + 1))
        else:
            out.add(int(part))
    return frozenset(out)


def parse(text: str) -> Dict[str, Dict[Tuple[int, int], str]]:
    """{section: {(l, t): cell text}} of an answer file."""
    tables: Dict[str, Dict[Tuple[int, int], str]] = {}
    section = None
    for n, line in enumerate(text.splitlines(), 1):
        s = line.split("#", 1)[0].strip()
        if not s:
            continue
        if s in SECTIONS:
            section = s
            tables[section] = {}
            continue
        if s.startswith("unit"):
            continue
        m = re.match(r"U(\d+)\s+(.*)$", s)
        if not m or section is None:
            raise AnswerError(f"line {n}: expected 'frames', 'loss' or a row 'U<l> cell ...', "
                              f"got {line.strip()!r}")
        cells = m.group(2).split()
        if len(cells) != STEPS:
            raise AnswerError(f"line {n}: U{m.group(1)} has {len(cells)} cells, expected "
                              f"{STEPS} (one per step)")
        for t, c in enumerate(cells, 1):
            tables[section][(int(m.group(1)), t)] = c
    return tables


def check(answer: Path, base: Path) -> Verdict:
    v = Verdict()
    if not answer.is_file():
        raise AnswerError(f"{answer}: no such answer file (python -m labs.check provenance "
                          f"--template > {answer})")
    got = parse(answer.read_text())
    want = expected()
    for sec in SECTIONS:
        if sec not in got:
            v.wrong.append(f"the '{sec}' table is missing")
            continue
        missing = [f"U{l}" for l in range(1, L + 1) if (l, 1) not in got[sec]]
        if missing:
            v.wrong.append(f"{sec}: rows missing: {', '.join(missing)}")
            continue
        bad, todo = [], 0
        for key in sorted(want[sec]):
            cell = got[sec][key]
            if "?" in cell:
                todo += 1
                continue
            try:
                ok = parse_cell(cell) == want[sec][key]
            except ValueError:
                ok = False
            if not ok:
                bad.append(f"U{key[0]} t={key[1]} ({cell})")
        if todo:
            v.wrong.append(f"{sec}: {todo} cells still '?'")
        if bad:
            v.wrong.append(f"{sec}: {len(bad)} of {len(want[sec])} cells are wrong: "
                           + ", ".join(bad[:8]) + (" ..." if len(bad) > 8 else ""))
        elif not todo:
            v.note(f"{sec}: all {len(want[sec])} cells right")
    if v.right:
        v.note(f"compare with: python -m ssmpi.plan --units {L} --mode skip --k {K} "
               f"--steps {STEPS}")
    return v
