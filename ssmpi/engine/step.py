"""One step of one unit: Section 4 of the paper (``ALGORITHM.md``, "One step of one unit").

All units do this at the same time, once per frame step t, reading the messages that arrived
at the end of step t-1 (its *inbox*) and returning the messages to send (its *outbox*)::

    1. fuse       gamma_l^[t] = fuse(a_{l-1->l}^[t-1], a_{l-2->l}^[t-1], ...)     (eq. 1)
                  U_1: gamma_1^[t] = x^[t]
    2. forward    h_l^[t] = H_l(gamma_l^[t]; theta_l)   (this forward's residuals only)
    3. cotangent  c = g_{l->l+1}^{t-1} + tau_VJP(g_{l->l+2}^{t-1}) + ...    (at h_l^[t])
                  U_L: c = d loss(h_L^[t], y) / d h_L (the exact gradient of this step)
    4. VJP        grad theta_l += (dh_l/dtheta_l)^T c                          (eq. 5)
                  d gamma_l = (dh_l/dgamma_l)^T c, split by fuse's VJP into one
                  pseudo-gradient g_{i->l}^t per inbound edge                 (eqs. 2-4)
    5. send       h_l^[t] up the direct edge, tau(h_l^[t]) up each shortcut edge,
                  each g_{i->l}^t down its inbound edge

Validity: U_l computes only when its *direct* input is valid (invalid shortcut inputs fuse
as zeros); its cotangent is valid when the *direct* pseudo-gradient is (a shortcut
pseudo-gradient arriving alone, during fill, is dropped), or for U_L when a loss was taken.

This module is pure: no MPI, no timing, no bookkeeping. The executors
(:mod:`ssmpi.engine.executor`) move the messages; :mod:`ssmpi.engine.plan` runs the very
same function on symbols to print who sees which frame when; :mod:`ssmpi.engine.bptt`
records :func:`forward_half` on a tape and backpropagates through time exactly.

The unit ``u`` is anything with ``l``, ``topo`` (edges), ``forward``, ``backward``,
``fuse_fwd``, ``fuse_bwd``, ``tau_fwd`` and ``tau_bwd``: :class:`ssmpi.engine.unit.Unit`
on arrays, :class:`ssmpi.engine.plan.SymbolicUnit` on sets of frame indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, NamedTuple, Optional, Tuple

from .message import ACT, GRAD, INVALID, Key, Message

# loss(h, t, frame, train) -> (c, took): U_L's exact cotangent of step t (None when not
# training) and whether a loss was taken (a valid target exists for this step)
LossFn = Callable[[Any, int, int, bool], Tuple[Any, bool]]
Outbox = List[Tuple[Any, str, Message]]  # (edge, ACT or GRAD, message), in sending order


@dataclass
class StepRecord:
    """What one unit did at one step (tests, the plan, the message log)."""

    t: int
    l: int
    valid: bool  # U_l computed (its output is valid)
    frame: int  # direct-path frame of its input (0 = none)
    shortcut_frames: List[int]  # frame on each shortcut input (0 = invalid)
    c_valid: bool  # a cotangent was applied (VJP and gradient accumulated)
    loss_step: int  # step of the loss the cotangent descends from (0 = none)
    grad: Any = None  # this step's parameter gradient (flat) when recording
    h: Any = None  # the output h_l^[t] when recording


class Forward(NamedTuple):
    """Steps 1-2 of U_l at one step (what BPTT keeps on its tape)."""

    valid: bool  # the direct input was valid, so U_l computed
    frame: int  # direct-path frame of gamma_l
    shortcut_valid: List[bool]  # per inbound shortcut edge
    shortcut_frames: List[int]  # per inbound shortcut edge (0 = invalid)
    h: Any  # h_l^[t] (N, *out_shape)
    res: Any  # residuals of H_l at gamma_l^[t]
    fres: Any  # residuals of fuse (None: a single input)
    taus: List[Tuple[Any, Any, Any]]  # (edge, tau(h_l^[t]), tau residuals) per shortcut up


def forward_half(u, inbox: Mapping[Key, Message], x: Optional[Message] = None,
                 train: bool = True) -> Forward:
    """Steps 1 and 2: fuse the activations of step t-1, run H_l, map tau over the output."""
    topo, l = u.topo, u.l
    inb = topo.inbound(l)
    # 1. gamma_l^[t] = fuse(a_{l-1->l}^[t-1], a_{l-2->l}^[t-1], ...); U_1 takes x^[t]
    a = x if l == 1 else inbox[inb[0].eid, ACT]
    shortcuts = [inbox[e.eid, ACT] for e in inb[1:]]
    sv = [m.valid for m in shortcuts]
    sf = [m.frame if m.valid else 0 for m in shortcuts]
    if a is None or not a.valid:
        return Forward(False, 0, sv, sf, None, None, None, [])
    gamma, fres = a.data, None
    if shortcuts:  # an invalid shortcut message carries zeros: it fuses as zeros
        gamma, fres = u.fuse_fwd([a.data] + [m.data for m in shortcuts])
    # 2. h_l^[t] = H_l(gamma_l^[t]; theta_l), and tau(h_l^[t]) for every shortcut edge up
    h, res = u.forward(gamma, train)
    taus = [(e,) + tuple(u.tau_fwd(e, h)) for e in topo.outbound(l)[1:]]
    return Forward(True, a.frame, sv, sf, h, res, fres, taus)


def unit_step(u, t: int, inbox: Mapping[Key, Message], x: Optional[Message] = None,
              loss: Optional[LossFn] = None, *, train: bool = True,
              record: bool = False) -> Tuple[Outbox, StepRecord]:
    """Step t of unit U_l = ``u``: returns (outbox, record).

    inbox : {(edge id, kind): Message} that arrived at the end of step t-1, on U_l's inbound
        edges (ACT) and outbound edges (GRAD)
    x : U_1 only: the frame x^[t] as a Message (data (N, H, W, C), frame=t), or None
    loss : U_L only (see ``LossFn``)
    train : False in evaluation: no pseudo-gradients, no VJP (U_L still takes its loss)
    record : also return this step's parameter gradient in the record (tests, teaching)
    """
    topo, l = u.topo, u.l
    inb, outb = topo.inbound(l), topo.outbound(l)
    f = forward_half(u, inbox, x, train)
    if not f.valid:  # pipeline fill or a clip reset: pass invalid messages on
        outbox = [(e, ACT, INVALID) for e in outb]
        if train:
            outbox += [(e, GRAD, INVALID) for e in inb if e.grad]
        return outbox, StepRecord(t, l, False, 0, f.shortcut_frames, False, 0)
    # 3. the cotangent c of h_l^[t]
    c, c_valid, loss_step = None, False, 0
    if l == topo.L:  # the exact gradient of this step's loss
        c, took = loss(f.h, t, f.frame, train)
        loss_step = t if took else 0
        c_valid = took and train
    elif train:
        g = inbox[outb[0].eid, GRAD]  # g_{l->l+1}^{t-1}, computed by the loss of step t-(L-l)
        c_valid, loss_step = g.valid, g.loss_step
        if c_valid:
            c = g.data
            for e, _, tres in f.taus:  # + tau_VJP(g_{l->j}^{t-1}), evaluated at h_l^[t]
                if e.grad:
                    gs = inbox[e.eid, GRAD]
                    if gs.valid:
                        c = c + u.tau_bwd(e, tres, gs.data)
    # 4. VJP at the current input: accumulate grad theta_l, split d gamma_l per inbound edge
    pieces, step_grad = [None] * len(inb), None
    if c_valid:
        dgamma, step_grad = u.backward(f.res, c, need_dx=l > 1, record=record)
        if l > 1:
            pieces = u.fuse_bwd(f.fres, dgamma) if f.fres is not None else [dgamma]
    # 5. send up (h on the direct edge, tau(h) on shortcuts) and down (one g per inbound edge)
    outbox = [(outb[0], ACT, Message(f.h, True, frame=f.frame))] if outb else []
    outbox += [(e, ACT, Message(y, True, frame=f.frame)) for e, y, _ in f.taus]
    if train:
        outbox += [(e, GRAD, Message(p, c_valid, loss_step=loss_step))
                   for e, p in zip(inb, pieces) if e.grad]
    return outbox, StepRecord(t, l, True, f.frame, f.shortcut_frames, c_valid, loss_step,
                              step_grad, f.h if record else None)
