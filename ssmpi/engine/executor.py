"""Executors: move the messages of :func:`~ssmpi.engine.step.unit_step` between units.

One frame step t on this rank (all ranks do it at the same time)::

    transport.post_recvs()                   receive step t's messages into the nxt buffers
    for each unit U_l here (ascending l):
        outbox = unit_step(U_l, t, transport.inbox(l), ...)      the maths, no MPI
        transport.send(outbox)                                    up and down the edges
    transport.wait(t); transport.swap()      step t's messages become the inbox of t+1

With every unit on one rank all channels are local copies (the **serial executor**); with
one unit per rank every channel is an MPI message (the paper's setting); any placement in
between gives the same numbers (``ALGORITHM.md``, invariant 1).

:class:`Engine` puts the pieces together for the trainer, the benchmarks and the tests:
units and their optimizers, a :class:`~ssmpi.engine.transport.Transport`, the top unit's
:class:`~ssmpi.engine.losses.TopLoss`, a :class:`~ssmpi.engine.reducer.GradientReducer`
and the update policy, in two modes:

- **reset** (:meth:`Engine.run_clip`, the paper's training iteration): zero the pipeline,
  run T steps, one optimizer step per unit from its gradient averaged over its valid steps
  (and over replicas);
- **stream** (:meth:`Engine.stream_step`, real-time learning): no reset; labels travel with
  the frame index; every unit updates every ``update_every`` steps on its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from .. import backend, failure
from ..optim import make_optimizer
from .losses import NONFINITE, TARGETS, NonFiniteError, TopLoss  # noqa: F401 (re-exported)
from .message import ACT, GRAD, Message
from .reducer import GradientReducer
from .step import StepRecord, unit_step
from .topology import Placement, Topology
from .transport import Transport, as_comm
from .unit import Unit, apply_updates, host_parameters

__all__ = ["Executor", "Engine", "ClipStats", "StepRecord", "NonFiniteError"]


@dataclass
class ClipStats:
    """Result of one clip (reset mode) or one interval (stream mode) on this rank."""

    losses: List[float] = field(default_factory=list)  # top unit: loss per valid step
    probs: Optional[np.ndarray] = None  # top unit, classify: mean softmax over valid steps
    counts: Dict[int, int] = field(default_factory=dict)  # valid gradient steps per unit
    compute_s: Dict[int, float] = field(default_factory=dict)  # seconds per local unit
    wait_s: float = 0.0  # seconds waiting for messages
    skipped: int = 0  # non-finite losses and updates skipped (nonfinite="skip")
    lr: float = 0.0
    sample_losses: Optional[np.ndarray] = None  # (N,) per sample, when the loss keeps them

    @property
    def loss(self) -> float:
        return float(np.mean(self.losses)) if self.losses else float("nan")


class Executor:
    """Runs the steps of the units of this rank with a transport.

    ``record=True`` keeps a :class:`StepRecord` of every unit and step with host copies of
    its output and parameter gradient (tests), and a log of every message sent;
    ``record="headers"`` keeps the records without the arrays (the measured plan of a run).
    """

    def __init__(self, units: Dict[int, Unit], transport: Transport, *, record: bool = False,
                 tracer=None):
        self.units, self.transport = units, transport
        self.local = sorted(units)
        self.L = transport.topo.L
        self.record, self.tracer = record, tracer
        self.records: List[StepRecord] = []
        self.log: List[tuple] = []  # (step, edge, kind, Message without data) sent
        self.compute_s: Dict[int, float] = {}
        self.wait_s = 0.0
        # On a GPU the kernels are asynchronous: without a synchronisation a unit's time
        # would be its launch time. One per unit and step; nearly free when the unit sent
        # remote messages (the send synchronized already), else it stops the next unit's
        # launches from overlapping this unit's kernels (several units per rank only).
        self.sync_timing = getattr(transport, "xp", np) is not np

    def step(self, t: int, x: Optional[Message], loss, *, train: bool = True,
             send: bool = True):
        """Step t on every local unit. ``x``: frame t for U_1 (a Message); ``loss``: U_L's
        (see :func:`unit_step`). ``send=False`` on the last step of a clip (nobody reads
        its messages)."""
        tp, tr = self.transport, self.tracer
        if send:
            tp.post_recvs((ACT, GRAD) if train else (ACT,))
        if tr is not None:
            tr.set_step(t)
        for l in self.local:
            t0 = time.perf_counter()
            outbox, rec = unit_step(self.units[l], t, tp.inbox(l), x if l == 1 else None,
                                    loss if l == self.L else None, train=train,
                                    record=self.record is True)
            if send:
                tp.send(outbox)
                if self.record:
                    self.log += [(t, e, kind, m._replace(data=None, valid=m.valid and m.data
                                                         is not None)) for e, kind, m in outbox]
            if self.sync_timing:
                backend.synchronize()
            t1 = time.perf_counter()
            self.compute_s[l] = self.compute_s.get(l, 0.0) + (t1 - t0)
            if tr is not None:
                tr.add(f"U{l}", "compute", t0, t1 - t0)
            if self.record:  # host copies: layer buffers are reused at the next step
                rec.grad, rec.h = _host_copy(rec.grad), _host_copy(rec.h)
                if self.record == "headers":
                    rec.h = None
                self.records.append(rec)
        t0 = time.perf_counter()
        tp.wait(t)
        dt = time.perf_counter() - t0
        self.wait_s += dt
        if tr is not None:
            tr.add("wait", "wait", t0, dt)
        if send:
            tp.swap()

    def reset_timers(self):
        self.compute_s, self.wait_s = {}, 0.0


def _host_copy(a):
    """A host copy of an array (symbols, None: themselves)."""
    return backend.asnumpy(a).copy() if hasattr(a, "shape") else a


class Engine:
    """The units placed on this rank, their optimizers, transport, loss and reducer.

    Parameters
    ----------
    topo, placement : the static structure (every rank builds the same)
    comm : the communicator of all ranks of all replicas (an mpi4py communicator or a
        :class:`~ssmpi.engine.transport.Comm`; None = COMM_WORLD)
    batch : batch size N (all ranks must agree)
    loss : ``"xent"`` (classification) or ``"mse"`` (future frame), default from the model
        head, or a :class:`TopLoss`
    optimizer : keyword arguments of :func:`ssmpi.optim.make_optimizer`
    wait_mode, watchdog_s : how waits wait (:class:`~ssmpi.engine.transport.Watch`), for a
        plain mpi4py ``comm``; a ``Comm`` brings its own
    reducer : a :class:`GradientReducer` (default: over the ranks holding the same units,
        ``allreduce`` = auto | host | cuda_aware | nccl)
    target, frame_offset : frame prediction (see :class:`TopLoss`)
    update_every : stream mode: steps between a unit's updates
    """

    def __init__(self, topo: Topology, placement: Placement, comm=None, *, batch: int,
                 seed: int = 0, dtype=np.float32, loss=None, optimizer: Optional[dict] = None,
                 wait_mode: str = "poll", watchdog_s: float = 0.0, cuda_aware: bool = False,
                 nonfinite: str = "raise", target: str = "newest", frame_offset: int = 8,
                 update_every: int = 1, record: bool = False, xp=None, tracer=None,
                 reducer: Optional[GradientReducer] = None, allreduce: str = "auto"):
        self.comm = as_comm(comm, wait_mode=wait_mode, watchdog_s=watchdog_s)
        self.rank = self.comm.rank
        if placement.world_size != self.comm.size:
            raise ValueError(f"placement is for {placement.world_size} ranks but the "
                             f"communicator has {self.comm.size}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite {nonfinite!r} is not one of {', '.join(NONFINITE)}")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        self.topo, self.placement, self.L = topo, placement, topo.L
        self.xp = backend.xp() if xp is None else xp
        self.dtype = np.dtype(dtype)
        self.nonfinite, self.update_every = nonfinite, int(update_every)
        self.replica = placement.replica_of(self.rank)
        self.local = placement.units_of(self.rank)  # ascending unit indices
        failure.set_context(self.rank, ",".join(f"U{l}" for l in self.local))
        watch = self.comm.watch
        for r in range(self.comm.size):  # the watchdog names ranks by their units
            watch.names[self.comm.watch_ranks([r])[0]] = ",".join(
                f"U{l}" for l in placement.units_of(r))
        self.units: Dict[int, Unit] = {
            l: Unit(topo, l, seed=seed, dtype=self.dtype, xp=self.xp) for l in self.local}
        self.opt = {l: make_optimizer(u.theta, **dict(optimizer or {}))
                    for l, u in self.units.items()}
        self.loss = loss if isinstance(loss, TopLoss) else TopLoss(
            loss or ("xent" if topo.model.head == "classify" else "mse"), topo.L,
            nonfinite=nonfinite, target=target, frame_offset=frame_offset, dtype=self.dtype,
            xp=self.xp)
        self.loss_kind = self.loss.kind
        self.transport = Transport(topo, placement, self.comm, batch, dtype=self.dtype,
                                   xp=self.xp, cuda_aware=cuda_aware)
        self.executor = Executor(self.units, self.transport, record=record, tracer=tracer)
        # the ranks holding the same units in every replica average their gradients
        self._split = None  # the replica group's communicator, made here (see close)
        if reducer is None and placement.replicas > 1:
            self._split = self.comm.split(placement.position_of(self.rank), self.replica)
        self.reducer = reducer if reducer is not None else GradientReducer(
            self._split, cuda_aware=cuda_aware, mode=allreduce)
        self.is_bottom = placement.owns_bottom(self.rank)
        self.is_top = placement.owns_top(self.rank)
        self.updates = 0
        self.skipped = 0  # non-finite updates skipped
        self.lr = 0.0

    # compatibility with earlier versions and the tests
    @property
    def batch(self) -> int:
        return self.transport.batch

    @property
    def exchange(self) -> Transport:
        return self.transport

    @property
    def records(self) -> List[StepRecord]:
        return self.executor.records

    @property
    def tracer(self):
        return self.executor.tracer

    @tracer.setter
    def tracer(self, tr):
        self.executor.tracer = tr

    # -- one step -----------------------------------------------------------------------
    def step(self, t: int, x=None, labels=None, *, train: bool = True, send: bool = True):
        """Step t on every local unit. ``x`` (N, H, W, C): frame t (bottom rank; None = no
        frame). ``labels`` (N,): labels of frame t (top rank, classification)."""
        if labels is not None:
            self.loss.set_labels(t, labels)
        frame = Message(x, x is not None, frame=t) if self.is_bottom else None
        self.executor.step(t, frame, self.loss, train=train, send=send)

    # -- reset mode ---------------------------------------------------------------------
    def run_clip(self, T: int, frames=None, labels=None, targets=None, *, train: bool = True,
                 update: bool = True) -> ClipStats:
        """One training iteration in reset mode: zero the pipeline, run T steps, update.

        frames (N, T, H, W, C): on the bottom rank (None elsewhere); labels (N,): on the top
        rank for classification; targets (N, T', H, W, C): on the top rank for frame
        prediction (frame t of the clip is ``targets[:, t-1]``; T' >= T + offset).
        """
        self.start_stream()
        xp = self.xp
        if self.is_bottom:
            if frames is None:
                raise ValueError(f"rank {self.rank} owns U1 and needs frames")
            frames = xp.asarray(frames, dtype=self.dtype)
            if frames.shape[0] != self.batch or frames.shape[1] < T:
                raise ValueError(f"frames of shape {tuple(frames.shape)} do not hold a batch of "
                                 f"{self.batch} clips of {T} frames")
        if self.is_top:
            if self.loss.kind == "xent" and train and labels is None:
                raise ValueError(f"rank {self.rank} owns U{self.L} and needs labels")
            if targets is not None:
                self.loss.targets = xp.asarray(targets, dtype=self.dtype)
        lab = None if labels is None or not self.is_top else xp.asarray(labels)
        tr = self.tracer
        for t in range(1, T + 1):
            t0 = time.perf_counter()
            x = xp.ascontiguousarray(frames[:, t - 1]) if self.is_bottom else None
            if tr is not None and x is not None:
                tr.add("frame", "data", t0, time.perf_counter() - t0)
            self.step(t, x, lab, train=train, send=t < T)
        stats = self.stats()
        if train and update:
            t0 = time.perf_counter()
            stats.lr = self.update()
            if tr is not None:
                tr.add("update", "update", t0, time.perf_counter() - t0)
        return stats

    def update(self, units: Optional[List[int]] = None) -> float:
        """Average each unit's accumulated gradient over its valid steps and over replicas
        (the reducer), then one optimizer step per unit that counted a valid step. Returns
        the learning rate used."""
        us = [self.units[l] for l in (self.local if units is None else units)]
        t0 = time.perf_counter()
        steps = self.reducer.reduce(us)
        if self.tracer is not None and self.reducer.replicas > 1:  # visible in the timeline
            self.tracer.add("allreduce", "allreduce", t0, time.perf_counter() - t0)
        lr, skipped = apply_updates(us, self.opt, steps, self.nonfinite)
        self.skipped += skipped
        self.updates += 1
        self.lr = lr
        return lr

    def stats(self) -> ClipStats:
        """What happened on this rank since the last reset or :meth:`new_interval`."""
        ex = self.executor
        return ClipStats(losses=list(self.loss.losses), probs=self.loss.mean_probs(),
                         counts={l: u.count for l, u in self.units.items()},
                         compute_s=dict(ex.compute_s), wait_s=ex.wait_s,
                         skipped=self.skipped + self.loss.skipped, lr=self.lr,
                         sample_losses=self.loss.sample_losses())

    # -- stream mode --------------------------------------------------------------------
    def start_stream(self):
        """Zero the pipeline (every message invalid) and the statistics."""
        self.transport.reset()
        self.loss.begin_clip()
        self.executor.reset_timers()
        self.transport.wait_time = 0.0
        self.lr = 0.0

    def new_interval(self):
        """Fresh statistics (losses, timings) without touching the pipeline (stream mode)."""
        self.loss.new_interval()
        self.executor.reset_timers()
        self.lr = 0.0

    def stream_step(self, t: int, x=None, labels=None) -> ClipStats:
        """Step t of a stream (no reset). Each unit updates every ``update_every`` steps from
        its own accumulated gradient. ``labels`` (N,) are those of frame t (top rank)."""
        xp = self.xp
        xd = xp.ascontiguousarray(xp.asarray(x, dtype=self.dtype)) if x is not None else None
        lab = xp.asarray(labels) if labels is not None else None
        self.step(t, xd, lab)
        if t % self.update_every == 0:
            self.update()
        return self.stats()

    # -- helpers ------------------------------------------------------------------------
    def parameters(self) -> Dict[int, np.ndarray]:
        """{unit: host copy of its flat parameters}."""
        return host_parameters(self.units)

    def gather_parameters(self, root: int = 0) -> Optional[Dict[int, np.ndarray]]:
        """All units' parameters of replica 0 on ``root`` (a collective; outside the loop)."""
        return self.comm.gather_dicts(self.parameters() if self.replica == 0 else {}, root,
                                      "the parameters of every unit")

    def close(self):
        """Release the communicator this engine split for its replica group (a collective
        of the job's ranks, outside the loop). A program that builds many engines in one
        process (tests, studies) calls it; a job that builds one may leave it to MPI_Finalize."""
        if self._split is not None:
            self._split.free()
            self._split = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:  # after an error the other ranks may not reach the collective
            self.close()
