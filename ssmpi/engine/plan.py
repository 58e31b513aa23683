"""The executed plan: Figure 1 of the paper, computed by running the engine on symbols.

:func:`run_plan` runs the very same :func:`~ssmpi.engine.step.unit_step` and
:class:`~ssmpi.engine.executor.Executor` as training does, on **symbolic units**: an
activation is the set of frame indices it was computed from, a pseudo-gradient the set of
loss steps it descends from; fuse is a union, tau the identity, a VJP passes its cotangent
on. What it prints is therefore the plan that runs, by construction, not a second
implementation of the rules.

Three views:

- :func:`render`, the provenance tables: for every unit U_l and step t, the frame on the
  direct path of h_l^[t], every frame that reaches h_l^[t] through any edge, and the step of
  the loss behind the pseudo-gradient U_l uses at t (with the frame that loss saw);
- :func:`render_grid`, the rank x step grid of actions (F<f>: forward on frame f, B<s>: VJP
  with the pseudo-gradient of the loss of step s) and the messages on every edge at every
  step, marking the edges that cross ranks (MPI) and those that stay on one rank (a copy);
- :func:`plan_png`, the same grid as a picture, with the messages as arrows.

    python -m ssmpi.plan --units 8 --mode skip --k 2 --ranks 4 --steps 20 --grid

Closed forms (``ALGORITHM.md``, tested): the direct-path frame of U_l at step t is t-l+1;
the pseudo-gradient reaching U_l at step t comes from the loss of step t-(L-l), computed on
frame t-2L+l+1; with constant input U_l's first valid gradient is at step 2L-l.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Tuple

from ..nn.models import ModelSpec
from .message import ACT, GRAD, Message
from .step import StepRecord
from .topology import MODES, Placement, Topology


# -- symbols --------------------------------------------------------------------------------
class Sym(frozenset):
    """A set of frame indices (activations) or loss steps (pseudo-gradients); ``+`` is the
    union, so that summing cotangents merges where they come from."""

    def __add__(self, other):
        return Sym(frozenset.union(self, other))

    __radd__ = __add__

    def copy(self):
        return self


EMPTY = Sym()


class SymbolicUnit:
    """U_l on symbols: the interface of :class:`~ssmpi.engine.unit.Unit` that the unit step
    uses, with sets instead of arrays."""

    def __init__(self, topo: Topology, l: int):
        self.topo, self.l = topo, l
        self.count = 0

    def forward(self, gamma, train=True):
        return Sym(gamma), None

    def backward(self, res, c, need_dx=True, record=False):
        self.count += 1
        return (Sym(c) if need_dx else None), None

    def fuse_fwd(self, parts):
        return Sym(frozenset().union(*parts)), len(parts)

    def fuse_bwd(self, n, dgamma):
        return [dgamma] * n

    def tau_fwd(self, edge, h):
        return h, None

    def tau_bwd(self, edge, tres, g):
        return g


class Mailbox:
    """A transport for symbols: a dict of the messages sent at step t, read at t+1
    (``inbox``); no copies (symbols are immutable), no MPI."""

    def __init__(self, topo: Topology, invalid_data=EMPTY):
        self.topo = topo
        self.invalid = {(e.eid, kind): Message(invalid_data, False)
                        for e in topo.edges for kind in ((ACT, GRAD) if e.grad else (ACT,))}
        self.cur, self.nxt = dict(self.invalid), {}

    def inbox(self, l: int):
        return self.cur

    def post_recvs(self, kinds=(ACT, GRAD)):
        pass

    def send(self, outbox):
        for edge, kind, msg in outbox:
            if msg.data is None:  # an invalid message carries the empty set
                msg = Message(EMPTY, False, msg.frame, msg.loss_step)
            self.nxt[(edge.eid, kind)] = msg

    def wait(self, step: int = -1):
        pass

    def swap(self):
        self.cur, self.nxt = {**self.invalid, **self.nxt}, {}


def _sym_loss(h, t, frame, train):
    return (Sym({t}) if train else None), True


def run_plan(topo: Topology, T: int, n_steps: Optional[int] = None, stream: bool = False,
             train: bool = True):
    """Run the executor on symbols for ``n_steps`` steps of a clip of T frames (reset mode:
    frames 1..T enter U_1) or of a stream. Returns ({(l, t): StepRecord with ``h`` the set
    of frames reaching h_l^[t]}, [(step, edge, kind, Message) sent])."""
    from .executor import Executor

    n_steps = n_steps or T
    units = {l: SymbolicUnit(topo, l) for l in range(1, topo.L + 1)}
    ex = Executor(units, Mailbox(topo), record=True)
    for t in range(1, n_steps + 1):
        x = Message(Sym({t}), stream or t <= T, frame=t)
        # as in Engine.run_clip: the last step of a clip sends nothing (nobody reads it)
        ex.step(t, x, _sym_loss, train=train, send=stream or t < n_steps)
    return {(r.l, r.t): r for r in ex.records}, ex.log


# -- the provenance tables ------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    frame: Optional[int]  # direct-path frame of h_l^{[t]} (None: invalid output)
    frames: FrozenSet[int]  # every frame that reaches h_l^{[t]} through any edge
    loss_step: Optional[int]  # loss step of the direct pseudo-gradient used at t (None: none)
    loss_frame: Optional[int]  # the frame that loss was computed on


def chain_spec(L: int) -> ModelSpec:
    """A shape-only model of L identical units (for printing plans of any depth)."""
    mods = [[("conv", 4, 1), ("relu",)] for _ in range(L - 1)] + [[("gap",), ("linear", 2)]]
    return ModelSpec(f"chain({L})", (4, 4, 4), mods, "classify", 2)


def provenance(topo: Topology, T: int, n_steps: Optional[int] = None,
               stream: bool = False) -> Dict[Tuple[int, int], Cell]:
    """{(l, t): Cell} for steps 1..n_steps of a clip of T frames (reset mode), or of an
    endless stream (``stream=True``, frames enter at every step)."""
    recs, _ = run_plan(topo, T, n_steps, stream)
    L = topo.L
    cells = {}
    for (l, t), r in recs.items():
        ls = r.loss_step if r.valid and r.loss_step else None
        top = recs.get((L, ls)) if ls else None
        cells[(l, t)] = Cell(r.frame if r.valid else None,
                             frozenset(r.h) if r.valid else frozenset(), ls,
                             top.frame if top is not None else None)
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


def _table(title, rows, n_steps) -> str:
    """rows: [(label, [cell text per step])]."""
    w = max([3] + [len(c) + 1 for _, cs in rows for c in cs])
    lw = max([6] + [len(lab) + 1 for lab, _ in rows])
    out = [title, f"{'':<{lw}}" + "".join(f"{t:>{w}}" for t in range(1, n_steps + 1))]
    out += [f"{lab:<{lw}}" + "".join(f"{c:>{w}}" for c in cs) for lab, cs in rows]
    return "\n".join(out)


def render(topo: Topology, T: int, n_steps: Optional[int] = None, stream: bool = False) -> str:
    """The provenance tables as text (top unit first, like the paper's figure)."""
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


# -- the rank x step grid -------------------------------------------------------------------
def actions(records: Dict[Tuple[int, int], StepRecord], placement: Placement,
            n_steps: int) -> List[Tuple[str, List[str]]]:
    """[(rank label, [actions of each step])]: ``F<f>`` forward on frame f, ``B<s>`` VJP with
    the pseudo-gradient of the loss of step s (a unit prefix when a rank holds several)."""
    rows = []
    for p, units in enumerate(placement.groups):
        cells = []
        for t in range(1, n_steps + 1):
            parts = []
            for l in units:
                r = records.get((l, t))
                if r is None or not r.valid:
                    continue
                a = f"F{r.frame}" + (f"B{r.loss_step}" if r.c_valid else "")
                parts.append(a if len(units) == 1 else f"{l}:{a}")
            cells.append(" ".join(parts) or ".")
        rows.append((f"rank {p} (" + ",".join(f"U{l}" for l in units) + ")", cells))
    return rows


def messages(log, placement: Placement, topo: Topology, n_steps: int):
    """[(edge label, [message sent at the end of each step])]: ``a<f>`` an activation of frame
    f, ``g<s>`` a pseudo-gradient of the loss of step s, ``.`` invalid."""
    sent = {(t, e.eid, kind): m for t, e, kind, m in log}
    rows = []
    for e in topo.edges:
        mpi = placement.rank_of(e.src) != placement.rank_of(e.dst)
        for kind in (ACT, GRAD) if e.grad else (ACT,):
            arrow = f"U{e.src}->U{e.dst}" if kind == ACT else f"U{e.dst}->U{e.src}"
            label = f"{arrow} {'act ' if kind == ACT else 'grad'} {'MPI ' if mpi else 'copy'}"
            cells = []
            for t in range(1, n_steps + 1):
                m = sent.get((t, e.eid, kind))
                if m is None or not m.valid:
                    cells.append(".")
                else:
                    cells.append(f"a{m.frame}" if kind == ACT else f"g{m.loss_step}")
            rows.append((label, cells))
    return rows


def render_grid(topo: Topology, placement: Placement, T: int, n_steps: Optional[int] = None,
                stream: bool = False, records=None, log=None, title: str = "") -> str:
    """The rank x step grid of actions and the per-edge messages, as text. With
    ``records`` and ``log`` (of a real run: :meth:`Executor.records` and its message log)
    it shows what ran instead of the plan."""
    n_steps = n_steps or T
    if records is None:
        records, log = run_plan(topo, T, n_steps, stream)
    head = title or (f"plan: {topo.mode}, {topo.L} units, k={topo.k}, "
                     f"{placement.P} rank(s) ({placement.describe()}), "
                     f"{'stream' if stream else f'clip of {T} frames'}")
    t1 = _table("actions (F<f>: forward on frame f; B<s>: VJP with the pseudo-gradient of the "
                "loss of step s; '.': idle)", actions(records, placement, n_steps), n_steps)
    t2 = _table("messages sent at the end of each step, read at the next (a<f>: activation of "
                "frame f; g<s>: pseudo-gradient of the loss of step s; '.': invalid; MPI: "
                "crosses ranks, copy: stays on one rank)",
                messages(log, placement, topo, n_steps), n_steps)
    return "\n\n".join([head, t1, t2])


def plan_png(path, topo: Topology, placement: Placement, T: int, n_steps: Optional[int] = None,
             stream: bool = False, records=None, log=None, title: str = "") -> str:
    """The grid as a PNG: one row per unit (grouped by rank), one column per step, forward
    (blue) and VJP (orange) boxes labelled with the frame and the loss step, and the MPI
    messages as arrows (up: activations, down: pseudo-gradients). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_steps = n_steps or T
    if records is None:
        records, log = run_plan(topo, T, n_steps, stream)
    L = topo.L
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * n_steps + 2), max(2.5, 0.5 * L + 1.2)))
    y = {l: l - 1 for l in range(1, L + 1)}
    for (l, t), r in records.items():
        if t > n_steps or not r.valid:
            continue
        ax.add_patch(plt.Rectangle((t - 0.45, y[l] - 0.4), 0.9 if not r.c_valid else 0.45,
                                   0.8, color="#4c72b0"))
        ax.text(t - 0.42, y[l], f"{r.frame}", va="center", ha="left", fontsize=6,
                color="white")
        if r.c_valid:
            ax.add_patch(plt.Rectangle((t, y[l] - 0.4), 0.45, 0.8, color="#dd8452"))
            ax.text(t + 0.03, y[l], f"{r.loss_step}", va="center", ha="left", fontsize=6)
    for t, e, kind, m in log or []:
        if t >= n_steps or not m.valid or placement.rank_of(e.src) == placement.rank_of(e.dst):
            continue
        a, b = (e.src, e.dst) if kind == ACT else (e.dst, e.src)
        ax.annotate("", xy=(t + 1 - 0.45, y[b]), xytext=(t + 0.45, y[a]),
                    arrowprops=dict(arrowstyle="->", lw=0.6,
                                    color="#55a868" if kind == ACT else "#c44e52"))
    for p in range(1, placement.P):  # rank boundaries
        lo = min(placement.groups[p])
        ax.axhline(lo - 1.5, color="k", lw=0.5, ls=":")
    ax.set_xlim(0.4, n_steps + 0.6)
    ax.set_ylim(-0.6, L - 0.4)
    ax.set_yticks([y[l] for l in range(1, L + 1)])
    ax.set_yticklabels([f"U{l} (rank {placement.rank_of(l)})" for l in range(1, L + 1)])
    ax.set_xticks(range(1, n_steps + 1))
    ax.set_xlabel("step t (blue: forward, frame; orange: VJP, loss step; arrows: MPI messages, "
                  "green up, red down)", fontsize=8)
    ax.set_title(title or f"{topo.mode}, {L} units, k={topo.k}, {placement.P} rank(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ssmpi.plan", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=8, help="number of units L (default 8)")
    ap.add_argument("--mode", choices=[m for m in MODES if m != "bp"], default="skip")
    ap.add_argument("--k", type=int, default=2, help="largest edge distance for skip (default 2)")
    ap.add_argument("--ranks", type=int, default=0,
                    help="ranks per pipeline for the grid (default: one per unit)")
    ap.add_argument("--steps", type=int, default=0, help="steps to show (default 2L+2)")
    ap.add_argument("--clip", type=int, default=0, help="frames per clip (default: = steps)")
    ap.add_argument("--stream", action="store_true", help="an endless stream instead of a clip")
    ap.add_argument("--grid", action="store_true",
                    help="also print the rank x step grid of actions and the messages")
    ap.add_argument("--png", default=None, help="write the grid as a PNG to this path")
    a = ap.parse_args(argv)
    if a.units < 1:
        ap.error("--units must be >= 1")
    if a.ranks < 0 or a.ranks > a.units:
        ap.error(f"--ranks must be in 1..{a.units} (at most one rank per unit)")
    steps = a.steps or 2 * a.units + 2
    topo = Topology(chain_spec(a.units), mode=a.mode, k=a.k if a.mode != "sideways" else 1)
    clip = a.clip or steps
    out = [render(topo, clip, steps, a.stream)]
    placement = Placement(topo.L, a.ranks or topo.L)
    if a.grid or a.ranks:
        out.append(render_grid(topo, placement, clip, steps, a.stream))
    if a.png:
        out.append(f"grid: {plan_png(a.png, topo, placement, clip, steps, a.stream)}")
    sys.stdout.write("\n\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
