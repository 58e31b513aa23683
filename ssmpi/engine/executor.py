"""The Sideways / Skip-Sideways engine: every unit of this rank, one step at a time.

One step t of unit U_l (``ALGORITHM.md``, all units in parallel), with the messages that
arrived at the end of step t-1:

1. **fuse**: gamma_l = fuse(a_{l-1->l}, a_{l-2->l}, ...) (concat or add); U_1 takes x^{[t]};
2. **forward**: h_l = H_l(gamma_l; theta_l), keeping this forward's residuals only;
3. **cotangent**: c = g_{l->l+1} + tau_VJP(g_{l->l+2}) + ..., every tau VJP evaluated at the
   current h_l; U_L uses the exact loss gradient of the current step instead;
4. **VJP** at the current input: grad theta_l (accumulated on valid steps, equation 5) and
   d gamma_l, split by fuse's VJP into one pseudo-gradient per inbound edge (eqs. 2-4);
5. **send**: h_l up the direct edge, tau(h_l) up each shortcut edge, each pseudo-gradient
   down its inbound edge.

Validity (``ALGORITHM.md``): U_1's output is valid when a real frame entered; U_l's output
is valid when its *direct* inbound activation is valid (invalid shortcut inputs fuse as
zeros); U_l's cotangent is valid when its *direct* pseudo-gradient is valid (invalid
shortcut pseudo-gradients count as zero) or, for U_L, when the loss was computed.
With constant frames U_l gets its first valid gradient at step 2L-l.

Modes: **reset** (:meth:`Engine.run_clip`: zero the pipeline, run T steps, one optimizer
step per unit from its gradient averaged over its valid steps) and **stream**
(:meth:`Engine.stream_step`: no reset; labels travel with the frame index; each unit
updates every ``update_every`` steps on its own).

Data parallel x depth parallel: replicas of the pipeline; the ranks that own the same units
form ``unit_comm`` and average their gradients (non-blocking allreduce) before each update.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
from mpi4py import MPI

from .. import backend, failure
from ..nn import ops
from ..optim import make_optimizer
from .topology import Placement, Topology
from .transport import Exchange
from .unit import Unit, host_parameters

NONFINITE = ("raise", "skip")
TARGETS = ("newest", "direct")


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN or Inf."""


@dataclass
class StepRecord:
    """What one unit did at one step (kept only with ``record=True``: tests, teaching)."""

    t: int
    l: int
    valid: bool  # output valid
    frame: int  # direct-path frame index of the input (0 = none)
    shortcut_frames: List[int]  # frame index on each shortcut input (0 = invalid)
    c_valid: bool
    loss_step: int  # step of the loss that the direct cotangent descends from (0 = none)
    grad: object = None  # this step's parameter gradient (flat, host copy) if c_valid
    h: object = None  # host copy of the output


@dataclass
class ClipStats:
    """Result of one clip (reset mode) on this rank."""

    losses: List[float] = field(default_factory=list)  # top unit: loss per valid step
    probs: Optional[np.ndarray] = None  # top unit, classify: mean softmax over valid steps
    counts: Dict[int, int] = field(default_factory=dict)  # valid gradient steps per unit
    compute_s: Dict[int, float] = field(default_factory=dict)  # seconds per local unit
    wait_s: float = 0.0  # seconds waiting for messages
    skipped: int = 0  # non-finite updates skipped (nonfinite="skip")
    lr: float = 0.0

    @property
    def loss(self) -> float:
        return float(np.mean(self.losses)) if self.losses else float("nan")


class Engine:
    """The units placed on this rank, their exchange, optimizers and loss.

    Parameters
    ----------
    topo, placement : the static structure (every rank builds the same)
    comm : the communicator of all ranks of all replicas
    batch : batch size N (all ranks must agree)
    loss : ``"xent"`` (classification) or ``"mse"`` (future frame); default from the model head
    optimizer : keyword arguments of :func:`ssmpi.optim.make_optimizer`
    target : frame prediction target measured from the ``"newest"`` frame that entered U_1
        or from the ``"direct"``-path frame of the top unit; ``frame_offset`` frames ahead
    """

    def __init__(self, topo: Topology, placement: Placement, comm=None, *, batch: int,
                 seed: int = 0, dtype=np.float32, loss: Optional[str] = None,
                 optimizer: Optional[dict] = None, wait_mode: str = "poll",
                 watchdog_s: float = 0.0, cuda_aware: bool = False, nonfinite: str = "raise",
                 target: str = "newest", frame_offset: int = 8, update_every: int = 1,
                 record: bool = False, xp=None, tracer=None):
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.tracer = tracer  # optional ssmpi.trace.Tracer: compute / wait / data spans
        self.rank = self.comm.Get_rank()
        if placement.world_size != self.comm.Get_size():
            raise ValueError(f"placement is for {placement.world_size} ranks but the "
                             f"communicator has {self.comm.Get_size()}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite {nonfinite!r} is not one of {', '.join(NONFINITE)}")
        if target not in TARGETS:
            raise ValueError(f"target {target!r} is not one of {', '.join(TARGETS)}")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        self.topo, self.placement = topo, placement
        self.L = topo.L
        self.xp = backend.xp() if xp is None else xp
        self.dtype = np.dtype(dtype)
        self.loss_kind = loss or ("xent" if topo.model.head == "classify" else "mse")
        self.nonfinite, self.target, self.frame_offset = nonfinite, target, int(frame_offset)
        self.update_every, self.record = int(update_every), record
        self.replica = placement.replica_of(self.rank)
        self.local = placement.units_of(self.rank)  # ascending unit indices
        failure.set_context(self.rank, ",".join(f"U{l}" for l in self.local))
        self.units: Dict[int, Unit] = {
            l: Unit(topo, l, seed=seed, dtype=self.dtype, xp=self.xp) for l in self.local}
        okw = dict(optimizer or {})
        self.opt = {l: make_optimizer(u.theta, **okw) for l, u in self.units.items()}
        self.exchange = Exchange(topo, placement, self.comm, batch, dtype=self.dtype, xp=self.xp,
                                 wait_mode=wait_mode, watchdog_s=watchdog_s,
                                 cuda_aware=cuda_aware)
        # ranks holding the same units in every replica average their gradients
        self.unit_comm = self.comm.Split(placement.position_of(self.rank), self.replica)
        self.is_bottom = placement.owns_bottom(self.rank)
        self.is_top = placement.owns_top(self.rank)
        self.records: List[StepRecord] = []
        self._labels_by_frame: Dict[int, object] = {}
        self._targets = None
        self.updates = 0
        self.skipped = 0
        self._stats = ClipStats()
        self._probs_sum = None
        self._training = True

    @property
    def batch(self) -> int:
        return self.exchange.batch

    # -- one step -----------------------------------------------------------------------
    def step(self, t: int, x=None, labels=None, *, train: bool = True, send: bool = True):
        """Step t on every local unit. ``x`` (N, H, W, C): frame t (bottom rank; None = no
        frame). ``labels`` (N,): labels of frame t (top rank, classification). ``send``:
        False on the last step of a clip, whose outputs nobody reads."""
        ex = self.exchange
        if labels is not None:
            self._labels_by_frame[t] = labels
            for f in [f for f in self._labels_by_frame if f < t - 4 * self.L - 8]:
                del self._labels_by_frame[f]
        self._training = train
        kinds = ("act", "grad") if train else ("act",)
        if send:
            ex.post_recvs(kinds)
        tr = self.tracer
        if tr is not None:
            tr.set_step(t)
        for l in self.local:
            t0 = time.perf_counter()
            self._unit_step(self.units[l], t, x, train, send)
            t1 = time.perf_counter()
            self._stats.compute_s[l] = self._stats.compute_s.get(l, 0.0) + (t1 - t0)
            if tr is not None:
                tr.add(f"U{l}", "compute", t0, t1 - t0)
        w0 = ex.wait_time
        t0 = time.perf_counter()
        ex.wait(t)
        self._stats.wait_s += ex.wait_time - w0
        if tr is not None:
            tr.add("wait", "wait", t0, time.perf_counter() - t0)
        if send:
            ex.swap()

    def _unit_step(self, u: Unit, t: int, x, train: bool, send: bool):
        topo, ex, l = self.topo, self.exchange, u.l
        inb, outb = topo.inbound(l), topo.outbound(l)
        # 1. fuse the activations of step t-1
        fres = None
        sc_frames: List[int] = []
        if l == 1:
            valid, frame = x is not None, t
            gamma = x
        else:
            data, hdr = ex.recv_from_below(inb[0])
            valid, frame = bool(hdr[0]), int(hdr[1])
            parts = [data]
            for e in inb[1:]:
                d, h = ex.recv_from_below(e)
                sc_frames.append(int(h[1]) if h[0] else 0)
                parts.append(d)  # an invalid message carries zeros
            if len(parts) == 1:
                gamma = data
            elif valid:
                gamma, fres = ops.fuse_fwd(parts, topo.fuse)
        if not valid:
            if send:
                for e in outb:
                    ex.send_up(e, None, False)
                if train:
                    for e in inb:
                        if e.grad:
                            ex.send_down(e, None, False)
            if self.record:
                self.records.append(StepRecord(t, l, False, 0, sc_frames, False, 0))
            return
        # 2. forward at the current input
        h, res = u.forward(gamma, train)
        taus = []
        for e in outb[1:]:
            taus.append((e,) + tuple(e.tau_fwd(h, topo.fuse)))
        # 3. cotangent
        c, c_valid, loss_step = None, False, 0
        if l == self.L:  # the loss is also computed in evaluation (metrics), not its VJP
            c, c_valid = self._loss(h, t, frame)
            loss_step = t if c_valid else 0
            c_valid = c_valid and train
        elif train:
            g, gh = ex.recv_from_above(outb[0])
            c_valid, loss_step = bool(gh[0]), int(gh[2])
            if c_valid:
                c = g
                for e, _, tres in taus:
                    if e.grad:
                        gs, gsh = ex.recv_from_above(e)
                        if gsh[0]:
                            c = c + e.tau_bwd(tres, gs)
        # 4. VJP at the current input
        pieces = [None] * len(inb)
        step_grad = None
        if c_valid:
            dgamma, step_grad = u.backward(res, c, need_dx=l > 1, record=self.record)
            if l > 1:
                pieces = ops.fuse_bwd(fres, dgamma) if fres is not None else [dgamma]
        # 5. send up and down
        if send:
            if outb:
                ex.send_up(outb[0], h, True, frame=frame)
            for e, y, _ in taus:
                ex.send_up(e, y, True, frame=frame)
            if train:
                for e, p in zip(inb, pieces):
                    if e.grad:
                        ex.send_down(e, p, c_valid, loss_step=loss_step)
        if self.record:
            self.records.append(StepRecord(
                t, l, True, frame, sc_frames, c_valid, loss_step,
                backend.asnumpy(step_grad).copy() if step_grad is not None else None,
                backend.asnumpy(h).copy()))

    def _loss(self, h, t: int, frame: int):
        """Top unit: loss of the current step and its exact gradient (c, valid)."""
        xp = self.xp
        if self.loss_kind == "xent":
            labels = self._labels_by_frame.get(frame)
            if labels is None:
                return None, False
            loss, res = ops.softmax_xent_fwd(h, labels)
        else:
            if self._targets is None:
                return None, False
            idx = (t if self.target == "newest" else frame) + self.frame_offset
            if idx > self._targets.shape[1]:
                return None, False
            loss, res = ops.mse_fwd(h, self._targets[:, idx - 1])
        val = float(loss)
        if not math.isfinite(val):
            if self.nonfinite == "raise":
                raise NonFiniteError(f"unit U{self.L}: non-finite loss {val} at step {t}")
            self.skipped += 1
            return None, False
        self._stats.losses.append(val)
        if self.loss_kind == "xent":
            p = res.probs
            self._probs_sum = p.copy() if self._probs_sum is None else self._probs_sum + p
        if not self._training:
            return None, True
        dl = ops.softmax_xent_bwd(res, 1.0) if self.loss_kind == "xent" else ops.mse_bwd(res, 1.0)
        return xp.asarray(dl, dtype=self.dtype), True

    # -- reset mode ---------------------------------------------------------------------
    def run_clip(self, T: int, frames=None, labels=None, targets=None, *, train: bool = True,
                 update: bool = True) -> ClipStats:
        """One training iteration in reset mode: zero the pipeline, run T steps, update.

        frames (N, T, H, W, C): on the bottom rank (None elsewhere); labels (N,): on the top
        rank for classification; targets (N, T', H, W, C): on the top rank for frame
        prediction (frame t of the clip is ``targets[:, t-1]``; T' >= T + offset).
        """
        self._begin_clip()
        xp = self.xp
        if self.is_bottom:
            if frames is None:
                raise ValueError(f"rank {self.rank} owns U1 and needs frames")
            frames = xp.asarray(frames, dtype=self.dtype)
            if frames.shape[0] != self.batch or frames.shape[1] < T:
                raise ValueError(f"frames of shape {tuple(frames.shape)} do not hold a batch of "
                                 f"{self.batch} clips of {T} frames")
        if self.is_top:
            if self.loss_kind == "xent" and train and labels is None:
                raise ValueError(f"rank {self.rank} owns U{self.L} and needs labels")
            if targets is not None:
                self._targets = xp.asarray(targets, dtype=self.dtype)
        lab = None if labels is None else xp.asarray(labels)
        tr = self.tracer
        for t in range(1, T + 1):
            t0 = time.perf_counter()
            x = xp.ascontiguousarray(frames[:, t - 1]) if self.is_bottom else None
            if tr is not None and x is not None:
                tr.add("frame", "data", t0, time.perf_counter() - t0)
            self.step(t, x, lab if self.is_top else None, train=train, send=t < T)
        stats = self._end_clip()
        if train and update:
            t0 = time.perf_counter()
            stats.lr = self.update()
            if tr is not None:
                tr.add("update", "update", t0, time.perf_counter() - t0)
        return stats

    def _begin_clip(self):
        self.exchange.reset()
        self._labels_by_frame.clear()
        self._targets = None
        self._probs_sum = None
        self._stats = ClipStats()
        self.exchange.wait_time = 0.0

    def _end_clip(self) -> ClipStats:
        s = self._stats
        s.counts = {l: u.count for l, u in self.units.items()}
        if self._probs_sum is not None and s.losses:
            s.probs = backend.asnumpy(self._probs_sum) / len(s.losses)
        s.skipped = self.skipped
        return s

    def update(self, units: Optional[List[int]] = None) -> float:
        """Average each unit's accumulated gradient over its valid steps (and over
        replicas), then apply one optimizer step. Returns the learning rate used."""
        lr = 0.0
        units = self.local if units is None else units
        R = self.placement.replicas
        reqs = []
        for l in units:
            u = self.units[l]
            u.mean_grad()
            if R > 1:
                backend.synchronize(u.grad)
                reqs.append(self.unit_comm.Iallreduce(MPI.IN_PLACE, u.grad, op=MPI.SUM))
        if reqs:
            _wait_polling(reqs)
        for l in units:
            u = self.units[l]
            if R > 1:
                u.grad /= R
            counted = u.count if R == 1 else 1
            if counted:
                if not bool(self.xp.isfinite(u.grad).all()):
                    if self.nonfinite == "raise":
                        raise NonFiniteError(f"unit U{l}: non-finite gradient at update "
                                             f"{self.opt[l].t + 1}")
                    self.skipped += 1
                else:
                    lr = self.opt[l].step(u.theta, u.grad)
            u.zero_grad()
        self.updates += 1
        return lr

    # -- stream mode --------------------------------------------------------------------
    def start_stream(self):
        """Zero the pipeline once; afterwards call :meth:`stream_step` forever."""
        self._begin_clip()

    def new_interval(self):
        """Fresh statistics (losses, timings) without touching the pipeline (stream mode)."""
        self._stats = ClipStats()
        self._probs_sum = None

    def stream_step(self, t: int, x=None, labels=None) -> ClipStats:
        """Step t of a stream (no reset). Each unit updates every ``update_every`` steps from
        its own accumulated gradient. ``labels`` (N,) are those of frame t (top rank)."""
        xp = self.xp
        xd = xp.ascontiguousarray(xp.asarray(x, dtype=self.dtype)) if x is not None else None
        lab = xp.asarray(labels) if labels is not None else None
        self.step(t, xd, lab)
        if t % self.update_every == 0:
            self._stats.lr = self.update()
        return self._stats

    # -- helpers ------------------------------------------------------------------------
    def parameters(self) -> Dict[int, np.ndarray]:
        """{unit: host copy of its flat parameters}."""
        return host_parameters(self.units)

    def gather_parameters(self, root: int = 0) -> Optional[Dict[int, np.ndarray]]:
        """All units' parameters of replica 0 on ``root`` (a collective; outside the loop)."""
        mine = self.parameters() if self.replica == 0 else {}
        allp = self.comm.gather(mine, root=root)
        if self.rank != root:
            return None
        out = {}
        for d in allp:
            out.update(d)
        return out


def _wait_polling(reqs, max_sleep=1e-3):
    sleep = 2e-5
    while not MPI.Request.Testall(reqs):
        time.sleep(sleep)
        sleep = min(sleep * 2, max_sleep)
