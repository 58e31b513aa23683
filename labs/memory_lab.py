"""Lab 6: measure memory vs clip length for Skip-Sideways and backprop through time.

The checker measures again (``tracemalloc`` peaks are deterministic for a given code path)
and compares the student's numbers within 15%.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from .common import Verdict, answered, close, load_answers

TITLE = "Measure memory vs clip length for Skip-Sideways and BP"
WHY = "b"

TEMPLATE = """\
# Lab 6: memory vs clip length (python -m labs.memory --T 8 16 32 64).
# does Skip-Sideways' peak memory grow with the clip length T? "yes" or "no"
skip_grows = "?"

# Skip-Sideways' peak at T = 32, MiB
skip_mib_at_32 = "?"

# exact BPTT: MiB more per extra frame (the slope of its column)
bptt_mib_per_frame = "?"

# why does one grow and the other not? (one letter)
#  a: BPTT uses float64
#  b: a Skip-Sideways unit keeps the residuals of the current step only, and the messages of
#     the previous one; BPTT keeps the residuals of every step until its backward pass
#  c: Skip-Sideways drops frames when memory runs low
#  d: BPTT stores the input clip once per unit
why = "?"
"""


@lru_cache(maxsize=1)
def measured():
    """(skip MiB at 32, bptt MiB per frame between T = 8 and 32)."""
    from .memory import measure

    skip = measure(32, "skip")
    b8, b32 = measure(8, "bptt"), measure(32, "bptt")
    return skip, (b32 - b8) / 24


def check(answer: Path, base: Path) -> Verdict:
    v = Verdict()
    ans = load_answers(answer)
    grows = answered(v, ans, "skip_grows", str)
    if grows is not None:
        v.need(grows.strip().lower() == "no", f"skip_grows = {grows!r}: look at the skip "
               "column again")
    why = answered(v, ans, "why", str)
    if why is not None:
        v.need(why.strip().lower() == WHY, f"why = {why!r} is not the reason")
    skip = answered(v, ans, "skip_mib_at_32", float)
    slope = answered(v, ans, "bptt_mib_per_frame", float)
    if skip is not None or slope is not None:
        m_skip, m_slope = measured()
        if skip is not None:
            v.need(close(skip, m_skip, 0.15), f"skip_mib_at_32 = {skip}: the checker measures "
                   "something else here (python -m labs.memory --T 32)")
        if slope is not None:
            v.need(close(slope, m_slope, 0.15), f"bptt_mib_per_frame = {slope}: the checker "
                   "measures another slope (MiB at the longest T minus MiB at the shortest, "
                   "divided by the difference in frames)")
    return v
