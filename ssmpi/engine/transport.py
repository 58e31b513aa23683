"""Per-edge message passing between units: the only module that calls MPI point-to-point.

Every edge U_i -> U_j has two *channels*: ``act`` (the activation, sent up by U_i) and
``grad`` (the pseudo-gradient, sent down by U_j; absent on FA-Skip-Sideways shortcuts).
Each channel carries a data array (N, *edge.act_shape) and a small int64 header::

    header = [valid, frame, loss_step, unused]
    valid      1 when the data means something (pipeline fill and clip resets send 0)
    frame      act: the frame index on the direct path of the activation
    loss_step  grad: the step whose loss this pseudo-gradient descends from

One step of the exchange, as in ``ALGORITHM.md``::

    post_recvs()     Irecv every inbound message of the *next* step into the ``nxt`` buffers
    ... compute ...  units read the ``cur`` buffers (messages of the previous step)
    send_up/down     Isend activations up and pseudo-gradients down
    wait(step)       complete this step's sends and next step's receives
    swap()           nxt becomes cur

Receive buffers are double-buffered and preallocated at start-up from shapes that every
rank derives from the config. A channel whose two ends are on the same rank is a copy into
the receiver's ``nxt`` buffer through the same interface (no MPI). No pickled send/recv
and no blocking collective happen here.

On CuPy the stream is synchronized before MPI touches a device buffer; with
``cuda_aware=True`` device buffers go to MPI directly, otherwise through page-locked host
staging buffers.

Waiting (``wait_mode``): MPICH busy-polls inside ``Waitall``, which steals the cores of
working ranks when ranks outnumber cores. ``"poll"`` tests the requests and sleeps with a
short back-off between tests (the default; right for laptops, CI and oversubscribed
nodes); ``"block"`` calls ``Waitall`` (one rank per core on a cluster).
"""

from __future__ import annotations

import time
from typing import Dict, List, Tuple

import numpy as np
from mpi4py import MPI

from .. import backend
from .topology import Edge, Placement, Topology

HDR = 4
WAIT_MODES = ("poll", "block")


class HangError(RuntimeError):
    """No message arrived on some edge within the watchdog time."""


class PeerLostError(RuntimeError):
    """A neighbouring rank died: MPI failed a request on one of this rank's edges."""


class _Channel:
    """One direction of one edge, seen from this rank."""

    def __init__(self, edge: Edge, kind: str, src_rank: int, dst_rank: int):
        self.edge, self.kind = edge, kind
        self.src_rank, self.dst_rank = src_rank, dst_rank
        self.cur = self.nxt = None  # receiver side: device arrays (N, *shape)
        self.hcur = self.hnxt = None  # receiver side: headers
        self.host_nxt = None  # receiver side: host staging buffer (GPU without CUDA-aware MPI)
        self.host_send = None  # sender side: host staging buffer
        self.zeros = None  # sender side: what an invalid message carries
        self.hsend = np.zeros(HDR, np.int64)

    def name(self) -> str:
        what = "activation" if self.kind == "act" else "pseudo-gradient"
        return f"{what} on {self.edge}"


class Exchange:
    """All channels that touch this rank's units."""

    def __init__(self, topo: Topology, placement: Placement, comm, batch: int, *, dtype=np.float32,
                 xp=None, wait_mode: str = "poll", watchdog_s: float = 0.0,
                 cuda_aware: bool = False, poll_max_sleep: float = 1e-3):
        if wait_mode not in WAIT_MODES:
            raise ValueError(f"exchange.wait_mode {wait_mode!r} is not one of "
                             f"{', '.join(WAIT_MODES)}")
        self.topo, self.placement, self.comm = topo, placement, comm
        self.rank = comm.Get_rank()
        self.replica = placement.replica_of(self.rank)
        self.units = placement.units_of(self.rank)
        self.xp = backend.xp() if xp is None else xp
        self.dtype = np.dtype(dtype)
        self.wait_mode, self.watchdog_s = wait_mode, float(watchdog_s)
        self.poll_max_sleep = poll_max_sleep
        self.staged = (self.xp is not np) and not cuda_aware
        self.batch = None
        self.recv: Dict[Tuple[int, str], _Channel] = {}  # channels whose receiver is here
        self.send_ch: Dict[Tuple[int, str], _Channel] = {}  # channels whose sender is here
        mine = set(self.units)
        rank_of = lambda l: placement.rank_of(l, self.replica)  # noqa: E731
        for e in topo.edges:
            kinds = ["act"] + (["grad"] if e.grad else [])
            for kind in kinds:
                src, dst = (e.src, e.dst) if kind == "act" else (e.dst, e.src)
                ch = _Channel(e, kind, rank_of(src), rank_of(dst))
                if dst in mine:
                    self.recv[(e.eid, kind)] = ch
                if src in mine:
                    self.send_ch[(e.eid, kind)] = ch
        self._reqs: List[MPI.Request] = []
        self._pending: List[_Channel] = []
        self._keep = []  # arrays referenced by pending Isends
        self.wait_time = 0.0  # seconds spent in wait(), since the last reset_timers()
        self.set_batch(batch)

    # -- buffers -----------------------------------------------------------------------
    def set_batch(self, batch: int):
        """(Re)allocate every buffer for batch size ``batch`` (all ranks must agree)."""
        if batch == self.batch:
            return
        self.batch = int(batch)
        xp = self.xp
        for ch in self.recv.values():
            shape = (self.batch,) + tuple(ch.edge.act_shape)
            ch.cur, ch.nxt = xp.zeros(shape, self.dtype), xp.zeros(shape, self.dtype)
            ch.hcur, ch.hnxt = np.zeros(HDR, np.int64), np.zeros(HDR, np.int64)
            if self.staged and ch.src_rank != self.rank:
                ch.host_nxt = backend.pinned_empty(shape, self.dtype)
        for ch in self.send_ch.values():
            shape = (self.batch,) + tuple(ch.edge.act_shape)
            ch.zeros = xp.zeros(shape, self.dtype)
            if self.staged and ch.dst_rank != self.rank:
                ch.host_send = backend.pinned_empty(shape, self.dtype)

    def reset(self):
        """Zero every receive buffer and mark it invalid (start of a clip in reset mode)."""
        if self._reqs:
            raise RuntimeError("exchange.reset() with messages in flight")
        for ch in self.recv.values():
            ch.cur.fill(0)
            ch.nxt.fill(0)
            ch.hcur[:] = 0
            ch.hnxt[:] = 0

    def nbytes(self) -> int:
        """Bytes held in preallocated message buffers on this rank."""
        n = 0
        for ch in self.recv.values():
            n += 2 * ch.cur.nbytes + (ch.host_nxt.nbytes if ch.host_nxt is not None else 0)
        for ch in self.send_ch.values():
            n += ch.zeros.nbytes + (ch.host_send.nbytes if ch.host_send is not None else 0)
        return n

    # -- the four phases of a step ------------------------------------------------------
    def post_recvs(self, kinds=("act", "grad")):
        """Irecv every message of the given kinds that a unit here reads at the next step."""
        for ch in self.recv.values():
            if ch.src_rank == self.rank or ch.kind not in kinds:
                continue  # local channel: the sender copies into ch.nxt
            buf = ch.host_nxt if self.staged else ch.nxt
            pair = [self.comm.Irecv(buf, source=ch.src_rank, tag=ch.edge.tag(ch.kind)),
                    self.comm.Irecv(ch.hnxt, source=ch.src_rank,
                                    tag=ch.edge.tag(ch.kind + "_hdr"))]
            self._reqs.extend(pair)
            self._pending.append((ch, pair))

    def get(self, edge: Edge, kind: str):
        """(data, header) that arrived on this channel at the end of the previous step."""
        ch = self.recv[(edge.eid, kind)]
        return ch.cur, ch.hcur

    def recv_from_below(self, edge: Edge):
        """The activation U_src sent up ``edge`` at the end of the previous step."""
        return self.get(edge, "act")

    def recv_from_above(self, edge: Edge):
        """The pseudo-gradient U_dst sent down ``edge`` at the end of the previous step."""
        return self.get(edge, "grad")

    def send_up(self, edge: Edge, h, valid: bool, frame: int = 0):
        """Isend an activation (N, *edge.act_shape) up ``edge``; None/invalid sends zeros."""
        self.post(edge, "act", h, valid, frame=frame)

    def send_down(self, edge: Edge, g, valid: bool, loss_step: int = 0):
        """Isend a pseudo-gradient down ``edge``; None/invalid sends zeros."""
        self.post(edge, "grad", g, valid, loss_step=loss_step)

    def post(self, edge: Edge, kind: str, data, valid: bool, frame: int = 0, loss_step: int = 0):
        """Send ``data`` (N, *edge.act_shape) on a channel; ``data=None`` or not valid sends
        an invalid message (zeros)."""
        ch = self.send_ch[(edge.eid, kind)]
        ok = bool(valid) and data is not None
        if not ok:
            data = ch.zeros
        elif tuple(data.shape) != (self.batch,) + tuple(edge.act_shape):
            raise ValueError(f"exchange: {ch.name()} expects shape "
                             f"{(self.batch,) + tuple(edge.act_shape)}, got {tuple(data.shape)}")
        hdr = ch.hsend
        hdr[0], hdr[1], hdr[2], hdr[3] = int(ok), frame, loss_step, 0
        if ch.dst_rank == self.rank:  # same rank: a copy into the receiver's next buffer
            rch = self.recv[(edge.eid, kind)]
            self.xp.copyto(rch.nxt, data)
            rch.hnxt[:] = hdr
            return
        tag = edge.tag(kind)
        if self.staged:
            backend.synchronize(data)
            ch.host_send[...] = backend.asnumpy(data)
            buf = ch.host_send
        else:
            backend.synchronize(data)  # kernels writing ``data`` must finish before MPI reads
            buf = data if data.flags.c_contiguous else self.xp.ascontiguousarray(data)
        self._keep.append(buf)
        self._reqs.append(self.comm.Isend(buf, dest=ch.dst_rank, tag=tag))
        self._reqs.append(self.comm.Isend(hdr, dest=ch.dst_rank, tag=edge.tag(kind + "_hdr")))

    def wait(self, step: int = -1):
        """Complete every request of this step; yields the core while polling."""
        if not self._reqs:
            return
        t0 = time.perf_counter()
        try:
            if self.wait_mode == "block":
                MPI.Request.Waitall(self._reqs)
            else:
                sleep = 2e-5
                while not MPI.Request.Testall(self._reqs):
                    time.sleep(sleep)
                    sleep = min(sleep * 2, self.poll_max_sleep)
                    if self.watchdog_s and time.perf_counter() - t0 > self.watchdog_s:
                        raise HangError(self._hang_message(step, time.perf_counter() - t0))
        except MPI.Exception as err:  # a neighbour died (kill -9, node failure): name it
            raise PeerLostError(self._lost_message(step, err)) from None
        self.wait_time += time.perf_counter() - t0
        self._reqs.clear()
        self._keep.clear()
        if self.staged:
            for ch, _ in self._pending:
                ch.nxt.set(ch.host_nxt)
        self._pending.clear()

    def _lost_message(self, step, err) -> str:
        failed = set()
        for ch, pair in self._pending:  # which receives fail: those peers are gone
            try:
                MPI.Request.Testall(pair)
            except MPI.Exception:
                failed.add(ch.src_rank)
        peers = sorted(failed) or sorted(
            {ch.src_rank for ch, _ in self._pending} |
            {ch.dst_rank for ch in self.send_ch.values() if ch.dst_rank != self.rank})
        names = []
        for p in peers:
            units = ",".join(f"U{l}" for l in self.placement.units_of(p))
            edges = [str(ch.edge) for ch in list(self.recv.values()) + list(self.send_ch.values())
                     if p in (ch.src_rank, ch.dst_rank)]
            names.append(f"rank {p} ({units}; {', '.join(sorted(set(edges)))})")
        what = "lost" if failed else "lost a neighbour; suspects"
        return (f"rank {self.rank}: {what} " + "; ".join(names) + f" at step {step} (MPI error: "
                f"{err.Get_error_string().strip()})")

    def _hang_message(self, step, waited):
        waiting = [f"{ch.name()} from rank {ch.src_rank}" for ch, pair in self._pending
                   if not MPI.Request.Testall(pair)]
        return (f"rank {self.rank}: no message for {waited:.0f}s at step {step}; waiting on: "
                + ("; ".join(waiting) if waiting else "sends to neighbours to complete"))

    def swap(self):
        """The messages received during this step become the current ones."""
        for ch in self.recv.values():
            ch.cur, ch.nxt = ch.nxt, ch.cur
            ch.hcur, ch.hnxt = ch.hnxt, ch.hcur

    def cancel(self):
        """Drop requests after an error (best effort; the job is about to abort)."""
        for r in self._reqs:
            try:
                r.Cancel()
            except Exception:
                pass
        self._reqs.clear()
        self._keep.clear()
        self._pending.clear()
