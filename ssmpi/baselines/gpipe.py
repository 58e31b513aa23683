"""GPipe-style pipeline over MPI: exact backprop of a clip, micro-batch = frame.

The same units as the engine (``Topology(model, "sideways")``) on the same ranks
(:class:`~ssmpi.topology.Placement`): rank p owns a contiguous group of units, a *stage*.
One iteration (a clip of T frames, batch N) on P stages, F = forward, B = backward of
micro-batch m (frame m)::

    stage 0 | F1 F2 F3 F4 .  .  .  .  .  .  B4 B3 B2 B1
    stage 1 | .  F1 F2 F3 F4 .  .  .  .  B4 B3 B2 B1 .      <- the bubble: idle stages
    stage 2 | .  .  F1 F2 F3 F4 .  .  B4 B3 B2 B1 .  .
    stage 3 | .  .  .  F1 F2 F3 F4 B4 B3 B2 B1 .  .  .

Forward of every frame through all stages (each stage keeps the residuals of all T frames,
``ws=None`` so that they stay alive: memory grows with T), the loss of every frame on the
last stage, then the backward in reverse frame order; each unit accumulates its exact
per-frame gradient, divides by T (the mean over frames, as the engine and
:class:`~ssmpi.baselines.FrameBP` do) and takes one optimizer step. The result equals
:class:`FrameBP` on the same topology (tested under mpiexec).

Messages go through the engine's transport (:class:`~ssmpi.engine.transport.Link`): the
same host staging of device arrays, and every wait through the one waiting primitive with
its watchdog (``wait_mode`` ``"poll"`` or ``"block"``); a tag per frame and direction; all
receives of a phase are posted at its start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from .. import backend
from ..engine.losses import finite, loss_bwd, loss_fwd
from ..engine.reducer import GradientReducer
from ..engine.topology import Placement, Topology
from ..engine.transport import WAIT_MODES, Link, as_comm
from ..engine.unit import Unit, apply_updates, host_parameters
from ..optim import make_optimizer
from ..trace import null_span

TAG_ACT, TAG_GRAD = 20000, 20001


def _tag(kind: int, m: int) -> int:
    return kind + 2 * m


@dataclass
class GPipeStats:
    """One iteration on this rank."""

    losses: List[float] = field(default_factory=list)  # last stage: loss per frame
    compute_s: Dict[int, float] = field(default_factory=dict)  # seconds per local unit
    wait_s: float = 0.0

    @property
    def loss(self) -> float:
        return float(np.mean(self.losses)) if self.losses else float("nan")


class GPipe:
    """One pipeline stage (this rank's units) of a GPipe-style exact-backprop pipeline.

    Parameters
    ----------
    topo : ``Topology`` with direct edges only (mode ``sideways``; ``bp`` is one stage)
    placement : ``Placement(topo.L, world_size)`` (one replica)
    comm : communicator; batch, seed, dtype, optimizer : as in the engine
    wait_mode : ``"poll"`` (test + sleep back-off) or ``"block"`` (``Waitall``)
    tracer : optional :class:`ssmpi.trace.Tracer`
    """

    def __init__(self, topo: Topology, placement: Placement, comm=None, *, batch: int,
                 seed: int = 0, dtype=np.float32, optimizer: Optional[dict] = None,
                 wait_mode: str = "poll", watchdog_s: float = 0.0, tracer=None, xp=None,
                 cuda_aware: bool = False):
        if any(e.kind != "direct" for e in topo.edges):
            raise ValueError(f"GPipe runs direct edges only (mode sideways), got {topo.mode!r}")
        if placement.replicas != 1:
            raise ValueError("GPipe: one replica only")
        if wait_mode not in WAIT_MODES:
            raise ValueError(f"wait_mode {wait_mode!r} is not one of {', '.join(WAIT_MODES)}")
        self.comm = as_comm(comm, wait_mode=wait_mode, watchdog_s=watchdog_s)
        self.rank = self.comm.rank
        self.topo, self.placement, self.L = topo, placement, topo.L
        self.batch = int(batch)
        self.xp = backend.xp() if xp is None else xp
        self.dtype = np.dtype(dtype)
        self.tracer = tracer
        self._sync = self.xp is not np  # compute_s times kernels, not launches
        self.local = placement.units_of(self.rank)
        self.units = {l: Unit(topo, l, seed=seed, dtype=self.dtype, xp=self.xp)
                      for l in self.local}
        for u in self.units.values():  # fresh buffers per forward: residuals of all frames
            for layer in u.layers:
                layer.ws = None
        okw = dict(optimizer or {})
        self.opt = {l: make_optimizer(u.theta, **okw) for l, u in self.units.items()}
        lo, hi = self.local[0], self.local[-1]
        self.prev = placement.rank_of(lo - 1) if lo > 1 else None
        self.next = placement.rank_of(hi + 1) if hi < self.L else None
        self.in_shape = (self.batch,) + tuple(topo.in_shapes[lo])
        self.out_shape = (self.batch,) + tuple(topo.out_shapes[hi])
        self._bufs: Dict[str, List] = {"act": [], "grad": []}
        # activations come from the previous stage, gradients from the next one
        self.link_prev = Link(self.comm, self.prev, self.in_shape, self.dtype, self.xp,
                              cuda_aware) if self.prev is not None else None
        self.link_next = Link(self.comm, self.next, self.out_shape, self.dtype, self.xp,
                              cuda_aware) if self.next is not None else None

    # -- waiting ----------------------------------------------------------------------
    def _wait(self, reqs, stats: GPipeStats, what: str = "wait", peer=None):
        if not reqs:
            return
        t0 = time.perf_counter()
        self.comm.wait(reqs, what, [peer] if peer is not None else [])
        dt = time.perf_counter() - t0
        stats.wait_s += dt
        if self.tracer is not None:
            self.tracer.add(what, "wait", t0, dt)

    def _buffers(self, kind: str, T: int, shape):
        bufs = self._bufs[kind]
        while len(bufs) < T:
            bufs.append(self.xp.empty(shape, self.dtype))
        return bufs

    # -- one iteration ------------------------------------------------------------------
    def run_clip(self, T: int, frames=None, labels=None, *, update: bool = True) -> GPipeStats:
        """All forwards, then all backwards, then one update. frames (N, T', H, W, C) on the
        first stage, labels (N,) on the last."""
        xp, tr = self.xp, self.tracer
        st = GPipeStats()
        first, last = self.prev is None, self.next is None
        if first:
            frames = xp.asarray(frames, dtype=self.dtype)
        if last:
            labels = xp.asarray(labels)
        res: List[Dict[int, object]] = [dict() for _ in range(T)]
        dlast: List[object] = [None] * T
        # ---- forward of every frame
        rreq = []
        if not first:
            acts = self._buffers("act", T, self.in_shape)
            rreq = [self.link_prev.post_recv(acts[m], _tag(TAG_ACT, m), slot=m)
                    for m in range(T)]
        sreq = []
        for m in range(T):
            if tr is not None:
                tr.set_step(m + 1)
            if first:
                t0 = time.perf_counter()
                h = xp.ascontiguousarray(frames[:, m])
                if tr is not None:
                    tr.add("frame", "data", t0, time.perf_counter() - t0)
            else:
                self._wait([rreq[m]], st, f"the activation of frame {m + 1}", self.prev)
                self.link_prev.finish(acts[m])
                h = acts[m]
            for l in self.local:
                t0 = time.perf_counter()
                with null_span(tr, f"F{m + 1} U{l}"):
                    h, res[m][l] = self.units[l].forward(h, True)
                    if self._sync:  # GPU kernels are asynchronous: time them, not launches
                        backend.synchronize()
                st.compute_s[l] = st.compute_s.get(l, 0.0) + time.perf_counter() - t0
            if last:
                val, lres = loss_fwd("xent", h, labels)
                finite(val, f"GPipe: non-finite loss {val} at frame {m + 1}")
                st.losses.append(val)
                dlast[m] = xp.asarray(loss_bwd("xent", lres), dtype=self.dtype)
            else:
                sreq.append(self.link_next.send(h, _tag(TAG_ACT, m), slot=m))
        # ---- backward, frames in reverse order
        rreq = []
        if not last:
            grads = self._buffers("grad", T, self.out_shape)
            rreq = [self.link_next.post_recv(grads[m], _tag(TAG_GRAD, m), slot=T + m)
                    for m in range(T)]
        for m in range(T - 1, -1, -1):
            if tr is not None:
                tr.set_step(m + 1)
            if last:
                c = dlast[m]
            else:
                self._wait([rreq[m]], st, f"the gradient of frame {m + 1}", self.next)
                self.link_next.finish(grads[m])
                c = grads[m]
            for l in reversed(self.local):
                t0 = time.perf_counter()
                with null_span(tr, f"B{m + 1} U{l}"):
                    c, _ = self.units[l].backward(res[m][l], c, need_dx=l > 1)
                    if self._sync:
                        backend.synchronize()
                st.compute_s[l] = st.compute_s.get(l, 0.0) + time.perf_counter() - t0
            res[m] = None  # free this frame's residuals
            if not first:
                sreq.append(self.link_prev.send(c, _tag(TAG_GRAD, m), slot=T + m))
        self._wait(sreq, st, "the sends of this clip")
        for link in (self.link_prev, self.link_next):
            if link is not None:
                link.release()
        if update:
            with null_span(tr, "update", "update"):
                self.update()
        return st

    def update(self):
        """Mean over frames of each unit's gradient, one optimizer step."""
        us = list(self.units.values())
        apply_updates(us, self.opt, GradientReducer().reduce(us))

    # -- helpers ------------------------------------------------------------------------
    def parameters(self) -> Dict[int, np.ndarray]:
        return host_parameters(self.units)

    def gather_parameters(self, root: int = 0) -> Optional[Dict[int, np.ndarray]]:
        """All units' parameters on ``root`` (a collective; outside the loop)."""
        return self.comm.gather_dicts(self.parameters(), root, "the parameters")

    def gather_gradients(self, root: int = 0):
        """All units' accumulated gradients / count on ``root`` (call with update=False)."""
        mine = {l: backend.asnumpy(u.grad) / max(u.count, 1) for l, u in self.units.items()}
        return self.comm.gather_dicts(mine, root, "the gradients")
