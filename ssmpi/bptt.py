"""Exact backprop through time (BPTT) of the unrolled Sideways / Skip-Sideways network.

The *temporal model* that Skip-Sideways trains is the pipelined network itself: at step t
unit U_l reads the messages of step t-1 (``ALGORITHM.md``, "One step of one unit"):

    gamma_1^{[t]} = x^{[t]}
    gamma_l^{[t]} = fuse(h_{l-1}^{[t-1]}, tau h_{l-2}^{[t-1]}, ..., tau h_{l-k}^{[t-1]})
    h_l^{[t]}     = H_l(gamma_l^{[t]}; theta_l)

with the engine's validity rules (at reset every message is zero and invalid; U_l's output
is valid when its direct input is; invalid shortcut inputs fuse as zeros; the loss is taken
at the top unit on every step whose input is valid). Because shortcut edges skip steps, the
top unit mixes several frames: this is where temporal features come from.

Sideways / Skip-Sideways approximate the gradient of this model (a pseudo-gradient computed
at step t-1 is paired with the Jacobian of step t). :class:`BPTT` computes the *exact*
gradient of the reset-mode objective

    J(theta) = mean over the valid steps t of  loss(h_L^{[t]}, y)

by keeping the residuals of all T steps and running the VJPs backwards in time. It uses
the same :class:`~ssmpi.unit.Unit` objects (same ``unit_seed`` initialisation), topology
(edges, fuse, tau) and optimizer as the engine, so the two can be swapped in a study and
their gradients compared unit by unit. Single process; memory grows with T (every step's
residuals are alive at once), which is what Sideways avoids.

FA-Skip-Sideways topologies are accepted: their shortcut activations are used and, BPTT
being exact, gradients flow back through every edge whatever ``Edge.grad`` says.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np

from . import backend, ops
from .optim import make_optimizer
from .sideways import ClipStats, NonFiniteError
from .topology import Topology
from .unit import Unit, host_parameters

__all__ = ["BPTT"]


class BPTT:
    """The unrolled temporal model of a :class:`Topology`, trained by exact BPTT.

    Parameters
    ----------
    topo : Topology (mode ``sideways``, ``skip`` or ``fa-skip``; ``bp`` is one unit)
    seed : parameter seed (``unit_seed(seed, l)``: the engine's initialisation)
    dtype : float dtype of parameters and activations
    optimizer : keyword arguments of :func:`ssmpi.optim.make_optimizer` (one per unit)
    xp : array module (default: the selected backend)

    Attributes: ``units`` {l: Unit}, ``opt`` {l: Optimizer}, ``updates``.
    After ``run_clip(..., update=False)`` each ``units[l].grad`` holds dJ/dtheta_l.
    """

    def __init__(self, topo: Topology, seed: int = 0, dtype=np.float32,
                 optimizer: Optional[dict] = None, xp=None):
        if topo.model.head != "classify":
            raise ValueError("BPTT supports classification heads (softmax cross-entropy)")
        self.topo, self.L = topo, topo.L
        self.xp = backend.xp() if xp is None else xp
        self.dtype = np.dtype(dtype)
        self.units: Dict[int, Unit] = {
            l: Unit(topo, l, seed=seed, dtype=self.dtype, xp=self.xp)
            for l in range(1, self.L + 1)}
        for u in self.units.values():
            for layer in u.layers:  # residuals of every step stay alive: no shared buffers
                layer.ws = None
        self.opt = {l: make_optimizer(u.theta, **dict(optimizer or {}))
                    for l, u in self.units.items()}
        self.updates = 0

    # -- the unrolled forward ---------------------------------------------------------
    def _forward(self, T: int, frames, labels, train: bool, keep: bool):
        """Run T steps. Returns (losses, probs_sum, tape): tape[t][l] = (res, fres, taus,
        valid) when ``keep``; losses is a list of (t, loss, xent residual)."""
        topo, xp, L = self.topo, self.xp, self.L
        prev: Dict[int, tuple] = {}  # edge id -> (activation, valid) sent at step t-1
        tape, losses, probs_sum = [], [], None
        zeros = {}
        for t in range(1, T + 1):
            cur: Dict[int, tuple] = {}
            step = {}
            h_by_l = {}
            for l in range(1, L + 1):
                inb = topo.inbound(l)
                fres = None
                if l == 1:
                    gamma, valid = xp.ascontiguousarray(frames[:, t - 1]), True
                else:
                    d, valid = prev.get(inb[0].eid, (None, False))
                    if valid:
                        parts = [d]
                        for e in inb[1:]:
                            a, ok = prev.get(e.eid, (None, False))
                            if not ok:
                                key = e.eid
                                if key not in zeros:
                                    zeros[key] = xp.zeros((frames.shape[0],) + e.act_shape,
                                                          self.dtype)
                                a = zeros[key]
                            parts.append(a)
                        if len(parts) == 1:
                            gamma = d
                        else:
                            gamma, fres = ops.fuse_fwd(parts, topo.fuse)
                if not valid:
                    step[l] = None
                    continue
                h, res = self.units[l].forward(gamma, train)
                h_by_l[l] = h
                taus = {}
                outb = topo.outbound(l)
                if outb:
                    cur[outb[0].eid] = (h, True)
                for e in outb[1:]:
                    y, tres = e.tau_fwd(h, topo.fuse)
                    cur[e.eid] = (y, True)
                    taus[e.eid] = tres
                # which inbound shortcut inputs were valid (a zero input gets no gradient)
                inval = [prev.get(e.eid, (None, False))[1] for e in inb[1:]] if l > 1 else []
                step[l] = (res, fres, taus, inval) if keep else True
            if L in h_by_l:
                loss, xres = ops.softmax_xent_fwd(h_by_l[L], labels)
                val = float(loss)
                if not math.isfinite(val):
                    raise NonFiniteError(f"BPTT: non-finite loss {val} at step {t}")
                losses.append((t, val, xres))
                p = xres.probs
                probs_sum = p.copy() if probs_sum is None else probs_sum + p
            tape.append(step)
            prev = cur
        return losses, probs_sum, tape

    # -- one clip -------------------------------------------------------------------------
    def run_clip(self, T: int, frames, labels, *, train: bool = True,
                 update: bool = True) -> ClipStats:
        """Reset, run T steps, and (train) backprop J through time into ``units[l].grad``.

        frames (N, T', H, W, C) with T' >= T; labels (N,) ints. Returns a
        :class:`~ssmpi.sideways.ClipStats`: ``losses`` per valid top step, ``probs`` (N, K)
        the mean softmax over them, ``counts`` {l: 1 if the unit got a gradient}. With
        ``train and update`` one optimizer step per unit follows (``lr`` in the stats).
        """
        xp = self.xp
        frames = xp.asarray(frames, dtype=self.dtype)
        if frames.ndim != 5 or frames.shape[1] < T:
            raise ValueError(f"frames of shape {tuple(frames.shape)} do not hold clips of {T} "
                             "frames (N, T, H, W, C)")
        labels = xp.asarray(labels)
        losses, probs_sum, tape = self._forward(T, frames, labels, train, keep=train)
        st = ClipStats(losses=[v for _, v, _ in losses])
        if probs_sum is not None:
            st.probs = backend.asnumpy(probs_sum) / len(losses)
        if train:
            for u in self.units.values():
                u.zero_grad()
            if losses:
                self._backward(tape, losses)
            st.counts = {l: u.count for l, u in self.units.items()}
            if update:
                st.lr = self.update()
        return st

    def _backward(self, tape, losses):
        """Reverse sweep: dJ/dtheta_l into units[l].grad (count = 1 when touched)."""
        topo, L = self.topo, self.L
        S = len(losses)
        dloss = {t: xres for t, _, xres in losses}
        # pending[(t, eid)]: cotangent of the message that U_src sent on edge eid at step t
        pending: Dict[tuple, object] = {}
        touched = set()
        for t in range(len(tape), 0, -1):
            step = tape[t - 1]
            for l in range(L, 0, -1):
                rec = step.get(l)
                if rec is None:
                    continue
                res, fres, taus, inval = rec
                outb = topo.outbound(l)
                c = None
                if l == L and t in dloss:
                    c = ops.softmax_xent_bwd(dloss[t], 1.0 / S)
                if outb:
                    g = pending.pop((t, outb[0].eid), None)
                    if g is not None:
                        c = g if c is None else c + g
                    for e in outb[1:]:
                        gs = pending.pop((t, e.eid), None)
                        if gs is not None:
                            gh = e.tau_bwd(taus[e.eid], gs)
                            c = gh if c is None else c + gh
                if c is None:
                    continue  # nothing downstream of this output reached a loss
                dgamma, _ = self.units[l].backward(res, c, need_dx=l > 1)  # accumulates
                touched.add(l)
                if l == 1 or t == 1:
                    continue
                inb = topo.inbound(l)
                pieces = ops.fuse_bwd(fres, dgamma) if fres is not None else [dgamma]
                ok = [True] + list(inval)
                for e, p, v in zip(inb, pieces, ok):
                    if not v:
                        continue  # the input was the constant zero of an invalid message
                    key = (t - 1, e.eid)
                    pending[key] = p if key not in pending else pending[key] + p
        for l, u in self.units.items():
            u.count = 1 if l in touched else 0  # grad is already dJ/dtheta: no averaging

    def update(self) -> float:
        """One optimizer step per unit from ``units[l].grad``; zeroes the gradients."""
        lr = 0.0
        for l, u in self.units.items():
            if u.count:
                if not bool(self.xp.isfinite(u.grad).all()):
                    raise NonFiniteError(f"BPTT: unit U{l}: non-finite gradient")
                lr = self.opt[l].step(u.theta, u.grad)
            u.zero_grad()
        self.updates += 1
        return lr

    # -- helpers ---------------------------------------------------------------------------
    def parameters(self) -> Dict[int, np.ndarray]:
        """{unit: host copy of its flat parameters}."""
        return host_parameters(self.units)

    def load_parameters(self, params: Dict[int, np.ndarray]):
        """Set every unit's flat parameters (e.g. from an engine's ``parameters()``)."""
        for l, p in params.items():
            self.units[l].theta[...] = self.xp.asarray(p, dtype=self.dtype)

    def gradients(self) -> Dict[int, np.ndarray]:
        """{unit: host copy of its gradient} (after ``run_clip(..., update=False)``)."""
        return {l: backend.asnumpy(u.grad).copy() for l, u in self.units.items()}
