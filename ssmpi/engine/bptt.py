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

Losses, as in :class:`~ssmpi.sideways.Engine`: a ``classify`` head uses softmax
cross-entropy against the clip label; a ``frames`` head (``models.fullres``, Table 7) uses
the mean squared error between h_L^{[t]} and the future frame ``x^{[t + frame_offset]}``
(``target="newest"``: t is the newest frame that entered U_1; ``"direct"``: t is the
direct-path frame t-L+1 of the top unit), taken from ``targets[:, idx - 1]``; a step
whose target index exceeds the frames given has no loss (and is not a valid step).

Sideways / Skip-Sideways approximate the gradient of this model (a pseudo-gradient computed
at step t-1 is paired with the Jacobian of step t). :class:`BPTT` computes the *exact*
gradient of the reset-mode objective

    J(theta) = mean over the valid steps t of  loss(h_L^{[t]}, y^{[t]})

by keeping the residuals of all T steps and running the VJPs backwards in time. It uses
the same :class:`~ssmpi.unit.Unit` objects (same ``unit_seed`` initialisation), topology
(edges, fuse, tau) and optimizer as the engine, so the two can be swapped in a study and
their gradients compared unit by unit. Single process; memory grows with T (every step's
residuals are alive at once), which is what Sideways avoids.

FA-Skip-Sideways topologies are accepted: their shortcut activations are used and, BPTT
being exact, gradients flow back through every edge whatever ``Edge.grad`` says.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from .. import backend
from ..optim import make_optimizer
from .executor import ClipStats
from .losses import TARGETS, finite, loss_bwd, loss_fwd
from .message import ACT, Message
from .step import forward_half
from .topology import Topology
from .unit import Unit, apply_updates, host_parameters

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
    frame_offset, target : frame prediction (``frames`` head) as in the engine: the top
        output at step t is compared with frame ``t + frame_offset`` (``"newest"``) or
        ``t - L + 1 + frame_offset`` (``"direct"``)

    Attributes: ``units`` {l: Unit}, ``opt`` {l: Optimizer}, ``updates``.
    After ``run_clip(..., update=False)`` each ``units[l].grad`` holds dJ/dtheta_l.
    """

    def __init__(self, topo: Topology, seed: int = 0, dtype=np.float32,
                 optimizer: Optional[dict] = None, xp=None, frame_offset: int = 8,
                 target: str = "newest"):
        if topo.model.head not in ("classify", "frames"):
            raise ValueError(f"BPTT supports classify and frames heads, not {topo.model.head!r}")
        if target not in TARGETS:
            raise ValueError(f"target {target!r} is not one of {', '.join(TARGETS)}")
        self.loss_kind = "xent" if topo.model.head == "classify" else "mse"
        self.frame_offset, self.target = int(frame_offset), target
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
    def _step_loss(self, h, t: int, labels, targets):
        """Loss of the top output of step t: (value, residual), or None (no valid target)."""
        if self.loss_kind == "xent":
            return loss_fwd("xent", h, labels)
        idx = (t if self.target == "newest" else t - self.L + 1) + self.frame_offset
        if idx > targets.shape[1]:
            return None
        return loss_fwd("mse", h, targets[:, idx - 1])

    def _forward(self, T: int, frames, labels, targets, train: bool, keep: bool):
        """Run T steps of the engine's forward half (:func:`~ssmpi.engine.step.forward_half`:
        the same fuse, tau and validity). Returns (losses, probs_sum, tape): tape[t-1][l] is
        U_l's :class:`~ssmpi.engine.step.Forward` of step t (None: it did not compute);
        losses is a list of (t, loss, loss residual)."""
        topo, xp, L = self.topo, self.xp, self.L
        N = frames.shape[0]
        # the inbox of step 1: every message invalid (zeros, as after a reset)
        invalid = {(e.eid, ACT): Message(xp.zeros((N,) + e.act_shape, self.dtype), False)
                   for e in topo.edges}
        inbox = dict(invalid)
        tape, losses, probs_sum = [], [], None
        for t in range(1, T + 1):
            sent = dict(invalid)  # what the units send at step t: the inbox of step t+1
            step, h_top = {}, None
            for l in range(1, L + 1):
                x = Message(xp.ascontiguousarray(frames[:, t - 1]), True, frame=t) \
                    if l == 1 else None
                f = forward_half(self.units[l], inbox, x, train)
                if not f.valid:
                    step[l] = None
                    continue
                outb = topo.outbound(l)
                if outb:
                    sent[(outb[0].eid, ACT)] = Message(f.h, True, frame=f.frame)
                for e, y, _ in f.taus:
                    sent[(e.eid, ACT)] = Message(y, True, frame=f.frame)
                step[l] = f if keep else True
                h_top = f.h if l == L else h_top
            out = self._step_loss(h_top, t, labels, targets) if h_top is not None else None
            if out is not None:
                val, lres = out
                finite(val, f"BPTT: non-finite loss {val} at step {t}")
                losses.append((t, val, lres))
                if self.loss_kind == "xent":
                    p = lres.probs
                    probs_sum = p.copy() if probs_sum is None else probs_sum + p
            tape.append(step)
            inbox = sent
        return losses, probs_sum, tape

    # -- one clip -------------------------------------------------------------------------
    def run_clip(self, T: int, frames, labels=None, *, targets=None, train: bool = True,
                 update: bool = True) -> ClipStats:
        """Reset, run T steps, and (train) backprop J through time into ``units[l].grad``.

        frames (N, T', H, W, C) with T' >= T; labels (N,) ints (classify head); targets
        (N, T'', H, W, C) (frames head: frame t of the clip is ``targets[:, t-1]``, as in
        :meth:`Engine.run_clip`; default ``frames``, which then must hold the T + offset
        frames for every step to have a target). Returns a
        :class:`~ssmpi.sideways.ClipStats`: ``losses`` per valid top step, ``probs`` (N, K)
        the mean softmax over them (classify), ``counts`` {l: 1 if the unit got a
        gradient}. With ``train and update`` one optimizer step per unit follows (``lr`` in
        the stats).
        """
        xp = self.xp
        frames = xp.asarray(frames, dtype=self.dtype)
        if frames.ndim != 5 or frames.shape[1] < T:
            raise ValueError(f"frames of shape {tuple(frames.shape)} do not hold clips of {T} "
                             "frames (N, T, H, W, C)")
        if self.loss_kind == "xent":
            if labels is None:
                raise ValueError("a classify head needs labels")
            labels = xp.asarray(labels)
        else:
            targets = frames if targets is None else xp.asarray(targets, dtype=self.dtype)
            if targets.ndim != 5 or targets.shape[0] != frames.shape[0]:
                raise ValueError(f"targets of shape {tuple(targets.shape)} do not match frames "
                                 f"{tuple(frames.shape)}")
        losses, probs_sum, tape = self._forward(T, frames, labels, targets, train, keep=train)
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
        dloss = {t: lres for t, _, lres in losses}
        # pending[(t, eid)]: cotangent of the message that U_src sent on edge eid at step t
        pending: Dict[tuple, object] = {}
        touched = set()
        for t in range(len(tape), 0, -1):
            step = tape[t - 1]
            for l in range(L, 0, -1):
                f = step.get(l)
                if f is None:
                    continue
                u = self.units[l]
                outb = topo.outbound(l)
                c = None
                if l == L and t in dloss:
                    c = loss_bwd(self.loss_kind, dloss[t], 1.0 / S)
                if outb:
                    g = pending.pop((t, outb[0].eid), None)
                    if g is not None:
                        c = g if c is None else c + g
                    for e, _, tres in f.taus:
                        gs = pending.pop((t, e.eid), None)
                        if gs is not None:
                            gh = u.tau_bwd(e, tres, gs)
                            c = gh if c is None else c + gh
                if c is None:
                    continue  # nothing downstream of this output reached a loss
                dgamma, _ = u.backward(f.res, c, need_dx=l > 1)  # accumulates
                touched.add(l)
                if l == 1 or t == 1:
                    continue
                inb = topo.inbound(l)
                pieces = u.fuse_bwd(f.fres, dgamma) if f.fres is not None else [dgamma]
                for e, p, v in zip(inb, pieces, [True] + list(f.shortcut_valid)):
                    if not v:
                        continue  # the input was the constant zero of an invalid message
                    key = (t - 1, e.eid)
                    pending[key] = p if key not in pending else pending[key] + p
        for l, u in self.units.items():
            u.count = 1 if l in touched else 0  # grad is already dJ/dtheta: no averaging

    def update(self) -> float:
        """One optimizer step per unit from ``units[l].grad``; zeroes the gradients."""
        lr, _ = apply_updates(list(self.units.values()), self.opt, what="BPTT: ")
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
