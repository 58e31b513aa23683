"""Per-frame 2D backprop on one rank: the exact gradient of a chain of units, frame by frame.

For every frame x^{[t]} (N, H, W, C) of a clip of T frames::

    h_1 = H_1(x^{[t]}), h_l = H_l(h_{l-1}),  loss_t = xent(h_L, labels)
    g_L = d loss_t / d h_L,  g_{l-1}, grad theta_l += VJP of H_l at h_{l-1} with g_l

then every unit's gradient is divided by T (the mean over frames) and one optimizer step is
taken. There is no delay between units: this is what Sideways approximates.

With ``Topology(model, "bp")`` (one unit) this is exactly the engine's ``bp`` mode
(ALGORITHM.md invariant 3): same parameters (``unit_seed(seed, 1)``), same ops in the same
order, same update. With ``Topology(model, "sideways")`` it chains the same units the
engine and :class:`~ssmpi.baselines.GPipe` place on ranks, with the same parameters: the
serial reference of the GPipe test.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional

import numpy as np

from .. import backend
from ..engine.losses import finite, loss_bwd, loss_fwd
from ..engine.reducer import GradientReducer
from ..engine.topology import Topology
from ..engine.unit import Unit, apply_updates, host_parameters
from ..optim import make_optimizer
from ..trace import null_span


class FrameBP:
    """Exact per-frame backprop through the units of ``topo`` (direct edges only).

    Parameters
    ----------
    topo : a ``bp`` or ``sideways`` :class:`Topology` of a classification model
    batch : N
    seed, dtype, optimizer : as in :class:`ssmpi.sideways.Engine`
    tracer : optional :class:`ssmpi.trace.Tracer`
    """

    def __init__(self, topo: Topology, *, batch: int, seed: int = 0, dtype=np.float32,
                 optimizer: Optional[dict] = None, xp=None, tracer=None):
        if any(e.kind != "direct" for e in topo.edges):
            raise ValueError(f"FrameBP needs direct edges only (mode bp or sideways), got mode "
                             f"{topo.mode!r}")
        if topo.model.head != "classify":
            raise ValueError("FrameBP supports classification models (softmax cross-entropy)")
        self.topo, self.L, self.batch = topo, topo.L, int(batch)
        self.xp = backend.xp() if xp is None else xp
        self.dtype = np.dtype(dtype)
        self.units: Dict[int, Unit] = {
            l: Unit(topo, l, seed=seed, dtype=self.dtype, xp=self.xp) for l in range(1, self.L + 1)}
        okw = dict(optimizer or {})
        self.opt = {l: make_optimizer(u.theta, **okw) for l, u in self.units.items()}
        self.tracer = tracer
        self.compute_s: Dict[int, float] = {}

    def frame(self, x, labels) -> float:
        """Forward and backward of one frame x (N, H, W, C); accumulates every unit's
        gradient (count + 1). Returns the loss."""
        res: List = [None] * (self.L + 1)
        h = x
        for l in range(1, self.L + 1):
            t0 = time.perf_counter()
            with null_span(self.tracer, f"U{l} fwd"):
                h, res[l] = self.units[l].forward(h, True)
            self.compute_s[l] = self.compute_s.get(l, 0.0) + time.perf_counter() - t0
        val, lres = loss_fwd("xent", h, labels)
        finite(val, f"FrameBP: non-finite loss {val}")
        c = self.xp.asarray(loss_bwd("xent", lres), dtype=self.dtype)
        for l in range(self.L, 0, -1):
            t0 = time.perf_counter()
            with null_span(self.tracer, f"U{l} bwd"):
                c, _ = self.units[l].backward(res[l], c, need_dx=l > 1)
            self.compute_s[l] = self.compute_s.get(l, 0.0) + time.perf_counter() - t0
        return val

    def run_clip(self, T: int, frames, labels, *, update: bool = True) -> List[float]:
        """One iteration: frames (N, T', H, W, C) with T' >= T, labels (N,). Returns the
        per-frame losses; with ``update`` applies one optimizer step per unit from the
        gradient averaged over the T frames."""
        xp = self.xp
        frames = xp.asarray(frames, dtype=self.dtype)
        labels = xp.asarray(labels)
        losses = []
        for t in range(1, T + 1):
            if self.tracer is not None:
                self.tracer.set_step(t)
            x = xp.ascontiguousarray(frames[:, t - 1])
            losses.append(self.frame(x, labels))
        if update:
            with null_span(self.tracer, "update", "update"):
                self.update()
        return losses

    def update(self):
        """Divide each unit's gradient by its count of frames and take one optimizer step."""
        us = list(self.units.values())
        apply_updates(us, self.opt, GradientReducer().reduce(us))

    def parameters(self) -> Dict[int, np.ndarray]:
        """{unit: host copy of its flat parameters}."""
        return host_parameters(self.units)

    def gradients(self) -> Dict[int, np.ndarray]:
        """{unit: host copy of its accumulated gradient divided by its count}."""
        return {l: backend.asnumpy(u.grad) / max(u.count, 1) for l, u in self.units.items()}
