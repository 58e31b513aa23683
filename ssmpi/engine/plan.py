"""The provenance table: Figure 1 of the paper as text.

For every unit U_l and step t: which frames the activation h_l^{[t]} is computed from (the
direct-path frame, and all frames reachable through shortcut edges), and which step's loss
the pseudo-gradient that U_l uses at step t descends from. It is computed by propagating
symbols along the *same* :class:`~ssmpi.topology.Topology` edges the engine uses, with the
engine's validity rules (reset mode: frames 1..T enter U_1; outputs are valid when the
direct input is valid; cotangents are valid when the direct pseudo-gradient is valid).

    python -m ssmpi.schedule --units 8 --mode skip --steps 20

Closed forms (ALGORITHM.md): the direct-path frame of U_l at step t is t-l+1; the
pseudo-gradient reaching U_l at step t comes from the loss of step t-(L-l), computed on
frame t-2L+l+1; with constant input U_l's first valid gradient is at step 2L-l.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Dict, FrozenSet, Optional, Tuple

from ..nn.models import ModelSpec
from .topology import MODES, Topology


@dataclass(frozen=True)
class Cell:
    frame: Optional[int]  # direct-path frame of h_l^{[t]} (None: invalid output)
    frames: FrozenSet[int]  # every frame that reaches h_l^{[t]} through any edge
    loss_step: Optional[int]  # loss step of the direct pseudo-gradient used at t (None: none)
    loss_frame: Optional[int]  # the frame that loss was computed on


def chain_spec(L: int) -> ModelSpec:
    """A shape-only model of L identical units (for printing schedules of any depth)."""
    mods = [[("conv", 4, 1), ("relu",)] for _ in range(L - 1)] + [[("gap",), ("linear", 2)]]
    return ModelSpec(f"chain({L})", (4, 4, 4), mods, "classify", 2)


def provenance(topo: Topology, T: int, n_steps: Optional[int] = None,
               stream: bool = False) -> Dict[Tuple[int, int], Cell]:
    """{(l, t): Cell} for steps 1..n_steps of a clip of T frames (reset mode), or of an
    endless stream (``stream=True``, frames enter at every step)."""
    n_steps = n_steps or T
    L = topo.L
    act: Dict[Tuple[int, int], Tuple[Optional[int], FrozenSet[int]]] = {}
    grad: Dict[Tuple[int, int], Optional[Tuple[int, int]]] = {}  # (l, t) -> (loss step, frame)
    cells = {}
    for t in range(1, n_steps + 1):
        for l in range(1, L + 1):
            if l == 1:
                ok = stream or t <= T
                frame, frames = (t, frozenset([t])) if ok else (None, frozenset())
            else:
                inb = topo.inbound(l)
                frame, frames = act.get((inb[0].src, t - 1), (None, frozenset()))
                if frame is not None:
                    for e in inb[1:]:
                        frames = frames | act.get((e.src, t - 1), (None, frozenset()))[1]
            act[(l, t)] = (frame, frames)
            # the cotangent of step t
            if frame is None:
                g = None
            elif l == L:
                g = (t, frame)
            else:
                g = grad.get((topo.outbound(l)[0].dst, t - 1))
            grad[(l, t)] = g
            cells[(l, t)] = Cell(frame, frames, g[0] if g else None, g[1] if g else None)
    return cells


def _span(frames: FrozenSet[int]) -> str:
    if not frames:
        return "."
    lo, hi = min(frames), max(frames)
    if lo == hi:
        return str(lo)
    if len(frames) == hi - lo + 1:
        return f"{lo}-{hi}"
    return ",".join(str(f) for f in sorted(frames))


def render(topo: Topology, T: int, n_steps: Optional[int] = None, stream: bool = False) -> str:
    """The rank x step tables as text (top unit first, like the paper's figure)."""
    n_steps = n_steps or T
    cells = provenance(topo, T, n_steps, stream)
    L = topo.L

    def table(title, fn):
        cols = [fn(cells[(l, t)]) for l in range(1, L + 1) for t in range(1, n_steps + 1)]
        w = max(3, max(len(c) for c in cols) + 1)
        out = [title, "unit\\t" + "".join(f"{t:>{w}}" for t in range(1, n_steps + 1))]
        for l in range(L, 0, -1):
            out.append(f"U{l:<5}" + "".join(f"{fn(cells[(l, t)]):>{w}}"
                                            for t in range(1, n_steps + 1)))
        return "\n".join(out)

    head = (f"{topo.mode}, {L} units, k={topo.k}, {'stream' if stream else f'clip of {T} frames'}"
            f" ('.' = invalid)")
    t1 = table("frame on the direct path of h_l^[t]:", lambda c: str(c.frame) if c.frame else ".")
    t2 = table("frames that reach h_l^[t] (direct and shortcut edges):", lambda c: _span(c.frames))
    t3 = table("step of the loss behind the pseudo-gradient used at t (frame it saw):",
               lambda c: f"{c.loss_step}({c.loss_frame})" if c.loss_step else ".")
    return "\n\n".join([head, t1, t2, t3])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ssmpi.schedule", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=8, help="number of units L (default 8)")
    ap.add_argument("--mode", choices=[m for m in MODES if m != "bp"], default="skip")
    ap.add_argument("--k", type=int, default=2, help="largest edge distance for skip (default 2)")
    ap.add_argument("--steps", type=int, default=0, help="steps to show (default 2L+2)")
    ap.add_argument("--clip", type=int, default=0, help="frames per clip (default: = steps)")
    ap.add_argument("--stream", action="store_true", help="an endless stream instead of a clip")
    a = ap.parse_args(argv)
    if a.units < 1:
        ap.error("--units must be >= 1")
    steps = a.steps or 2 * a.units + 2
    topo = Topology(chain_spec(a.units), mode=a.mode, k=a.k if a.mode != "sideways" else 1)
    sys.stdout.write(render(topo, a.clip or steps, steps, a.stream) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
