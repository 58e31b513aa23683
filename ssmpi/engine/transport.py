"""The transport: every MPI call of ssmpi except the gradient reduction and the final abort.

Three layers, each built on the one below:

1. :class:`Watch` and :meth:`Watch.wait`: **the one waiting primitive**. Every MPI wait of
   the program (point-to-point, collectives, barriers, the gradient allreduce) is a list of
   non-blocking requests completed here, under a watchdog. ``poll`` mode tests and sleeps
   with a short back-off (yields the core when ranks outnumber cores: MPICH's blocking
   waits busy-poll); ``block`` mode spins on the test (one rank per core).
   When a wait makes no progress for the watchdog time, the rank asks every other rank
   whether it still answers (a ping on a private communicator, which every waiting rank
   services), and one line names the ranks and units that stopped answering; one rank
   reports, the others stay quiet, and the job is aborted.
2. :class:`Comm`: a communicator whose collectives (barrier, bcast, gather, allgather,
   allreduce of scalars; Python objects are pickled into byte buffers) all wait through (1).
3. :class:`Transport`: the edges of the Sideways pipeline. Every edge U_i -> U_j has two
   *channels*, ``act`` (up) and ``grad`` (down), each a preallocated double buffer: the
   receivers read ``cur`` (the messages of step t-1) while step t's messages arrive in
   ``nxt``. One step of the transport::

       post_recvs()   Irecv every message of the *next* step into the nxt buffers
       inbox(l)       the messages of the previous step for unit l (cur buffers)
       send(outbox)   Isend activations up and pseudo-gradients down
       wait(step)     complete this step's sends and the next step's receives
       swap()         nxt becomes cur

   A channel whose ends are on the same rank is a copy into the receiver's ``nxt`` buffer
   (the serial executor is a Transport whose channels are all local: no MPI at all).
   :class:`Link` moves the arrays of the GPipe baseline through the same staging.

GPU buffers: without a CUDA-aware MPI (``cuda_aware=False``, the default) every device
array crosses MPI through a page-locked host buffer: a send queues one device -> host copy
per remote message of the outbox straight into its host buffer, synchronizes the stream
once, then posts the ``Isend``s; a receive copies host -> device after the wait, and the
stream is synchronized (once per step) before the next receive may reuse the host buffer.
With ``cuda_aware=True`` device buffers go to MPI directly, after one synchronisation per
outbox. ``tests/test_double*.py`` check all of this on the device-array double
(:mod:`ssmpi.backend_double`), where a device array handed to MPI raises and a copy is
done only at a synchronisation.
"""

from __future__ import annotations

import pickle
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from mpi4py import MPI

from .. import backend
from .message import ACT, GRAD, HEADER, Key, Message
from .topology import Edge, Placement, Topology

WAIT_MODES = ("poll", "block")
_TAG_PING, _TAG_PONG, _TAG_NOTICE = 1, 2, 3


class HangError(RuntimeError):
    """A wait made no progress within the watchdog time."""

    traceback = False  # the one line says it all (ssmpi.failure prints no traceback)


class PeerLostError(RuntimeError):
    """A rank of the job died: MPI failed a request."""


# -- start-up -------------------------------------------------------------------------------
def init_world(thread_level: int = None) -> "MPI.Intracomm":
    """Initialise MPI if nobody did (the programs import mpi4py with ``rc.initialize =
    False`` so that their signal handlers are installed *before* MPI_Init); returns
    COMM_WORLD."""
    if not MPI.Is_initialized():
        MPI.Init_thread(MPI.THREAD_MULTIPLE if thread_level is None else thread_level)
    return MPI.COMM_WORLD


def processor_name() -> str:
    return MPI.Get_processor_name()


# -- 1. the waiting primitive --------------------------------------------------------------
class Watch:
    """The watchdog and waiting policy shared by every wait of this process.

    Parameters
    ----------
    comm : mpi4py communicator of the job (duplicated once for the watchdog's pings)
    wait_mode : ``"poll"`` (test + sleep back-off) or ``"block"`` (spin on the test)
    watchdog_s : the watchdog never fires before this many seconds without progress
        (0 = off)
    factor : ... and not before ``factor`` x the slowest step observed (:meth:`observe`)
    """

    def __init__(self, comm, wait_mode: str = "poll", watchdog_s: float = 0.0,
                 factor: float = 0.0, poll_max_sleep: float = 1e-3):
        self.configure(wait_mode, watchdog_s, factor)
        self.poll_max_sleep = poll_max_sleep
        self.pcomm = comm.Dup()  # pings never mix with the job's messages
        self.me, self.size = self.pcomm.Get_rank(), self.pcomm.Get_size()
        self.slowest = 0.0
        self.names: Dict[int, str] = {}  # rank -> "U3,U4" (set by the engine)
        self.reporter: Optional[int] = None  # a rank that announced it reports a hang
        self.detectors = set()  # ranks whose watchdog fired (they pinged us)
        self._pongs: List[MPI.Request] = []
        self._pong_buf = []
        self._last_service = 0.0

    def configure(self, wait_mode: str = "poll", watchdog_s: float = 0.0,
                  factor: float = 0.0):
        if wait_mode not in WAIT_MODES:
            raise ValueError(f"wait_mode {wait_mode!r} is not one of {', '.join(WAIT_MODES)}")
        self.wait_mode, self.watchdog_s, self.factor = wait_mode, float(watchdog_s), float(
            factor)

    def observe(self, step_seconds: float):
        """Record the duration of a step (an iteration): the watchdog scales with it."""
        self.slowest = max(self.slowest, float(step_seconds))

    def limit(self) -> float:
        """Seconds without progress before the watchdog fires (0 = never)."""
        if not self.watchdog_s:
            return 0.0
        return max(self.watchdog_s, self.factor * self.slowest)

    def name(self, rank: int) -> str:
        units = self.names.get(rank)
        return f"rank {rank}" + (f" ({units})" if units else "")

    # -- the wait -------------------------------------------------------------------------
    def wait(self, reqs: Sequence, what: str, peers: Sequence[int] = (),
             lost: Optional[Callable] = None, detail: Optional[Callable] = None) -> float:
        """Complete every request of ``reqs``; returns the seconds waited.

        ``what`` says what is awaited and ``peers`` from whom (ranks of this watch's
        communicator), ``detail()`` more about it, for the watchdog's message; ``lost(err)``
        builds the message of a :class:`PeerLostError` when MPI fails a request (a rank
        died)."""
        if not reqs:
            return 0.0
        t0 = time.perf_counter()
        limit = self.limit()
        poll = self.wait_mode == "poll"
        sleep, n = 2e-5, 0
        try:
            while not MPI.Request.Testall(reqs):
                n += 1
                if poll:
                    time.sleep(sleep)
                    sleep = min(sleep * 2, self.poll_max_sleep)
                elif n & 1023:
                    continue  # block: spin on the test, look at the clock now and then
                now = time.perf_counter()
                if now - self._last_service > 0.005:
                    self.service()
                    self._last_service = now
                    waited = now - t0
                    if limit and waited > limit:
                        self._fire(what + (f" ({detail()})" if detail else ""), peers, waited)
        except MPI.Exception as err:  # a rank died (kill -9, node failure): name it
            msg = lost(err) if lost is not None else (
                f"rank {self.me}: lost a rank of the job while waiting for {what} "
                f"({', '.join(self.name(p) for p in peers) or 'any rank'}; MPI error: "
                f"{err.Get_error_string().strip()})")
            raise PeerLostError(msg) from None
        return time.perf_counter() - t0

    # -- the watchdog's conversation ------------------------------------------------------
    def service(self):
        """Answer pings (we are alive and waiting) and note hang reports of other ranks."""
        st = MPI.Status()
        buf = np.empty(3, np.int64)
        while self.pcomm.Iprobe(MPI.ANY_SOURCE, _TAG_NOTICE, st):
            self.pcomm.Recv(buf, st.Get_source(), _TAG_NOTICE)
            self.reporter = int(buf[1])
        while self.pcomm.Iprobe(MPI.ANY_SOURCE, _TAG_PING, st):
            src = st.Get_source()
            self.pcomm.Recv(buf, src, _TAG_PING)
            self.detectors.add(src)
            pong = np.array([_TAG_PONG, self.me, int(self.me in self.detectors)], np.int64)
            self._pong_buf.append(pong)
            self._pongs.append(self.pcomm.Isend(pong, dest=src, tag=_TAG_PONG))
        if self._pongs and MPI.Request.Testall(self._pongs):
            self._pongs, self._pong_buf = [], []

    def _fire(self, what: str, peers: Sequence[int], waited: float):
        """The watchdog fired on this rank: find who stopped answering; report once."""
        self.detectors.add(self.me)
        ping_s = min(3.0, max(0.5, 0.2 * self.limit()))
        if self.reporter is None:
            answered = self._ping_round(ping_s)
            silent = [r for r in range(self.size) if r != self.me and r not in answered]
            lower = [r for r in self.detectors if r < self.me and r not in silent]
            if self.reporter is None and not lower:
                note = np.array([_TAG_NOTICE, self.me, 0], np.int64)
                for r in range(self.size):  # tell the others to stay quiet
                    if r != self.me and r not in silent:
                        self.pcomm.Isend(note, dest=r, tag=_TAG_NOTICE)
                waits = f"waited {waited:.0f}s for {what}"
                if peers:
                    waits += " from " + ", ".join(self.name(p) for p in peers)
                if silent:
                    raise HangError(
                        f"watchdog: {', '.join(self.name(r) for r in silent)} stopped "
                        f"answering (no reply within {ping_s:.1f}s); rank {self.me} {waits}")
                raise HangError(f"watchdog: no progress for {waited:.0f}s although every rank "
                                f"answers (ranks wait on each other); rank {self.me} {waits}")
        # another rank reports: keep answering until the job is aborted
        deadline = time.perf_counter() + ping_s + 30.0
        while time.perf_counter() < deadline:
            self.service()
            time.sleep(0.01)
        raise HangError(f"watchdog: rank {self.me} waited {waited:.0f}s for {what}; rank "
                        f"{self.reporter if self.reporter is not None else min(self.detectors)}"
                        " reported the hang but the job did not end")

    def _ping_round(self, ping_s: float) -> Dict[int, int]:
        """Ping every other rank; {rank: 1 if its watchdog fired too} of those that answer
        within ``ping_s`` seconds."""
        ping = np.array([_TAG_PING, self.me, 1], np.int64)
        others = [r for r in range(self.size) if r != self.me]
        sends = [self.pcomm.Isend(ping, dest=r, tag=_TAG_PING) for r in others]
        bufs = {r: np.zeros(3, np.int64) for r in others}
        recvs = {r: self.pcomm.Irecv(bufs[r], source=r, tag=_TAG_PONG) for r in others}
        answered: Dict[int, int] = {}
        deadline = time.perf_counter() + ping_s
        while recvs and time.perf_counter() < deadline:
            self.service()
            for r in list(recvs):
                if recvs[r].Test():
                    answered[r] = int(bufs[r][2])
                    if bufs[r][2]:
                        self.detectors.add(r)
                    del recvs[r]
            time.sleep(0.002)
        self._keep = (sends, ping, recvs, bufs)  # the job ends soon; never free these early
        return answered


# -- 2. collectives ------------------------------------------------------------------------
_WATCHES: Dict[str, Watch] = {}
_PREDEFINED = {"world": lambda: MPI.COMM_WORLD, "self": lambda: MPI.COMM_SELF}


class Comm:
    """An MPI communicator whose every wait goes through a :class:`Watch`.

    Wrap the job's communicator once (a collective: the watch duplicates it); sub-
    communicators from :meth:`split` share the watch. ``Comm(c)`` of a Comm returns it.
    """

    def __new__(cls, comm=None, watch: Optional[Watch] = None, **watch_kw):
        if isinstance(comm, Comm):
            return comm
        return super().__new__(cls)

    def __init__(self, comm=None, watch: Optional[Watch] = None, **watch_kw):
        if isinstance(comm, Comm):
            return
        self.mpi = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.mpi.Get_rank(), self.mpi.Get_size()
        # what free() releases: the communicator of a split, the watch's duplicate of a
        # communicator that is not predefined (never a communicator the caller handed in)
        self._owns_mpi, self._owns_watch = False, False
        if watch is None:
            # one watch for each of the predefined communicators, made once: a Dup is a
            # collective and communicators are a finite resource. Every other communicator
            # gets its own (every rank of it takes this same path, so the Dup matches).
            key = next((k for k, c in _PREDEFINED.items() if self.mpi is c()), None)
            watch = _WATCHES.get(key) if key else None
            if watch is None:
                watch = Watch(self.mpi, **watch_kw)
                if key:
                    _WATCHES[key] = watch
                else:
                    self._owns_watch = True
            elif watch_kw:
                watch.configure(**watch_kw)
        self.watch = watch
        # this communicator's ranks as the watch's ranks (for the watchdog's messages)
        self._to_watch = MPI.Group.Translate_ranks(self.mpi.Get_group(), list(
            range(self.size)), self.watch.pcomm.Get_group())

    def Get_rank(self) -> int:
        return self.rank

    def Get_size(self) -> int:
        return self.size

    def watch_ranks(self, ranks: Sequence[int]) -> List[int]:
        return [int(self._to_watch[r]) for r in ranks]

    def wait(self, reqs, what: str, peers: Sequence[int] = (), lost=None,
             detail=None) -> float:
        """Complete ``reqs`` (requests on this communicator) under the watchdog; ``peers``
        are ranks of this communicator."""
        return self.watch.wait(reqs, what, self.watch_ranks(peers), lost, detail)

    def split(self, color: int, key: int) -> "Comm":
        # MPI_Comm_split blocks outside the watch: meet in a watched barrier first, so that
        # a rank that stopped before it is named instead of leaving the others in the split
        self.barrier(what="every rank to split the communicator")
        sub = Comm(self.mpi.Split(color, key), self.watch)
        sub._owns_mpi = True
        return sub

    def free(self):
        """Release the MPI communicators this Comm made (a collective of its ranks):
        communicators are a finite resource (MPICH has about 2000 context ids per process), and
        a program that builds engines again and again (tests, studies) would run out. Free
        the communicators split from this one first: they share its watch. Idempotent."""
        if self._owns_watch and self.watch.pcomm != MPI.COMM_NULL:
            self.watch.pcomm.Free()
        if self._owns_mpi and self.mpi != MPI.COMM_NULL:
            self.mpi.Free()

    # -- collectives (every rank of the communicator calls them) -------------------------
    def barrier(self, what: str = "a barrier"):
        self.wait([self.mpi.Ibarrier()], what)

    def allreduce(self, value, op: str = "sum", what: str = "an allreduce"):
        """Reduce a number (or a 1-D array of numbers) over all ranks: sum, max or min."""
        floating = np.asarray(value).dtype.kind == "f"
        arr = np.array(value, dtype=np.float64 if floating else np.int64, ndmin=1)
        out = np.empty_like(arr)
        self.wait([self.mpi.Iallreduce(arr, out, op={"sum": MPI.SUM, "max": MPI.MAX,
                                                     "min": MPI.MIN}[op])], what)
        return out if np.ndim(value) else out[0].item()

    def bcast(self, obj, root: int = 0, what: str = "a broadcast"):
        """``obj`` of ``root`` on every rank (pickled)."""
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if self.rank == root \
            else b""
        n = np.array([len(data)], np.int64)
        self.wait([self.mpi.Ibcast(n, root=root)], what, [root])
        buf = np.frombuffer(bytearray(data), np.uint8) if self.rank == root else np.empty(
            int(n[0]), np.uint8)
        self.wait([self.mpi.Ibcast(buf, root=root)], what, [root])
        return obj if self.rank == root else pickle.loads(buf.tobytes())

    def gather(self, obj, root: int = 0, what: str = "a gather"):
        """[obj of every rank] on ``root``, None elsewhere."""
        data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
        n = np.array([data.size], np.int64)
        counts = np.empty(self.size, np.int64) if self.rank == root else None
        self.wait([self.mpi.Igather(n, counts, root=root)], what)
        if self.rank != root:
            self.wait([self.mpi.Igatherv(data, None, root=root)], what, [root])
            return None
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
        buf = np.empty(int(counts.sum()), np.uint8)
        self.wait([self.mpi.Igatherv(data, [buf, counts, displs, MPI.BYTE], root=root)], what)
        return [pickle.loads(buf[d:d + c].tobytes()) for d, c in zip(displs, counts)]

    def gather_dicts(self, mine: dict, root: int = 0, what: str = "a gather"):
        """The union of every rank's dict on ``root`` (e.g. {unit: parameters}), None
        elsewhere."""
        parts = self.gather(mine, root=root, what=what)
        if parts is None:
            return None
        out = {}
        for d in parts:
            out.update(d)
        return out

    def allgather(self, obj, what: str = "an allgather"):
        """[obj of every rank] on every rank."""
        data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
        n = np.array([data.size], np.int64)
        counts = np.empty(self.size, np.int64)
        self.wait([self.mpi.Iallgather(n, counts)], what)
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
        buf = np.empty(int(counts.sum()), np.uint8)
        self.wait([self.mpi.Iallgatherv(data, [buf, counts, displs, MPI.BYTE])], what)
        return [pickle.loads(buf[d:d + c].tobytes()) for d, c in zip(displs, counts)]


def as_comm(comm=None, **watch_kw) -> Comm:
    """A :class:`Comm` for ``comm`` (an mpi4py communicator, a Comm, or None = world)."""
    return comm if isinstance(comm, Comm) else Comm(comm, **watch_kw)


# -- 3. the edges of the pipeline ---------------------------------------------------------
class _Channel:
    """One direction of one edge, seen from this rank."""

    def __init__(self, edge: Edge, kind: str, src_rank: int, dst_rank: int):
        self.edge, self.kind, self.key = edge, kind, (edge.eid, kind)
        self.src_rank, self.dst_rank = src_rank, dst_rank
        self.cur = self.nxt = None  # receiver side: device arrays (N, *shape)
        self.hcur = self.hnxt = None  # receiver side: headers
        self.host_nxt = None  # receiver side: host staging buffer (GPU without CUDA-aware MPI)
        self.host_send = None  # sender side: host staging buffer
        self.zeros = None  # sender side: what an invalid message carries
        self.hsend = np.zeros(HEADER, np.int64)
        self.tag = edge.tag(kind)
        self.htag = edge.tag(kind + "_hdr")

    def name(self) -> str:
        what = "activation" if self.kind == ACT else "pseudo-gradient"
        return f"{what} on {self.edge}"


class Transport:
    """All channels that touch this rank's units (see the module docstring).

    ``comm=None`` (or a one-rank placement) makes every channel local: the serial executor.
    """

    def __init__(self, topo: Topology, placement: Placement, comm: Optional[Comm], batch: int,
                 *, dtype=np.float32, xp=None, cuda_aware: bool = False, kinds=(ACT, GRAD)):
        self.topo, self.placement, self.comm = topo, placement, comm
        self.rank = comm.rank if comm is not None else 0
        self.replica = placement.replica_of(self.rank)
        self.units = placement.units_of(self.rank)
        self.xp = backend.xp() if xp is None else xp
        self.dtype = np.dtype(dtype)
        self.cuda_aware = cuda_aware
        self.batch = None
        self.recv: Dict[Key, _Channel] = {}  # channels whose receiver is here
        self.send_ch: Dict[Key, _Channel] = {}  # channels whose sender is here
        mine = set(self.units)
        for e in topo.edges:
            for kind in (ACT, GRAD) if e.grad else (ACT,):
                src, dst = (e.src, e.dst) if kind == ACT else (e.dst, e.src)
                ch = _Channel(e, kind, placement.rank_of(src, self.replica),
                              placement.rank_of(dst, self.replica))
                if dst in mine:
                    self.recv[ch.key] = ch
                if src in mine:
                    self.send_ch[ch.key] = ch
        # the channels each unit reads: inbound activations, outbound pseudo-gradients
        self._reads = {l: [ch for ch in self.recv.values()
                           if (ch.edge.dst if ch.kind == ACT else ch.edge.src) == l]
                       for l in self.units}
        self._reqs: List[MPI.Request] = []
        self._pending: List[Tuple[_Channel, list]] = []  # receives in flight
        self._keep = []  # arrays referenced by sends in flight
        self.wait_time = 0.0  # seconds spent in wait()
        self.set_batch(batch)

    def _staged(self, peer: int) -> bool:
        """Does a message to/from ``peer`` cross MPI through a host buffer?"""
        return peer != self.rank and self.xp is not np and not self.cuda_aware

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
            ch.hcur, ch.hnxt = np.zeros(HEADER, np.int64), np.zeros(HEADER, np.int64)
            if self._staged(ch.src_rank):
                ch.host_nxt = backend.pinned_empty(shape, self.dtype)
        for ch in self.send_ch.values():
            shape = (self.batch,) + tuple(ch.edge.act_shape)
            ch.zeros = xp.zeros(shape, self.dtype)
            if self._staged(ch.dst_rank):
                ch.host_send = backend.pinned_empty(shape, self.dtype)

    def reset(self):
        """Zero every receive buffer and mark it invalid (start of a clip in reset mode)."""
        if self._reqs:
            raise RuntimeError("transport.reset() with messages in flight")
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

    # -- one step ----------------------------------------------------------------------
    def inbox(self, l: int) -> Dict[Key, Message]:
        """The messages of the previous step that unit ``l`` reads."""
        return {ch.key: Message(ch.cur, bool(ch.hcur[0]), int(ch.hcur[1]), int(ch.hcur[2]))
                for ch in self._reads[l]}

    def post_recvs(self, kinds=(ACT, GRAD)):
        """Irecv every message of the given kinds that a unit here reads at the next step."""
        comm = self.comm
        for ch in self.recv.values():
            if ch.src_rank == self.rank or ch.kind not in kinds:
                continue  # local channel: the sender copies into ch.nxt
            buf = ch.host_nxt if ch.host_nxt is not None else ch.nxt
            pair = [comm.mpi.Irecv(buf, source=ch.src_rank, tag=ch.tag),
                    comm.mpi.Irecv(ch.hnxt, source=ch.src_rank, tag=ch.htag)]
            self._reqs.extend(pair)
            self._pending.append((ch, pair))

    def send(self, outbox):
        """Send every (edge, kind, Message) of an outbox; invalid messages carry zeros."""
        posts = []  # (buffer, header, channel) of the remote messages
        staged = device = False
        for edge, kind, msg in outbox:
            ch = self.send_ch[(edge.eid, kind)]
            ok = msg.valid and msg.data is not None
            data = msg.data if ok else ch.zeros
            if ok and tuple(data.shape) != (self.batch,) + edge.act_shape:
                raise ValueError(f"transport: {ch.name()} expects shape "
                                 f"{(self.batch,) + tuple(edge.act_shape)}, got "
                                 f"{tuple(data.shape)}")
            hdr = msg.header(ch.hsend)
            hdr[0] = int(ok)
            if ch.dst_rank == self.rank:  # same rank: a copy into the receiver's next buffer
                rch = self.recv[ch.key]
                self.xp.copyto(rch.nxt, data)
                rch.hnxt[:] = hdr
                continue
            if ch.host_send is not None:  # device -> host staging, queued on the stream
                backend.copy_to_host(data, ch.host_send, blocking=False)
                buf, staged = ch.host_send, True
            else:
                device = device or backend.is_device_array(data)
                buf = data if data.flags.c_contiguous else self.xp.ascontiguousarray(data)
            posts.append((buf, hdr, ch))
        if staged or device:  # the copies (and the kernels writing ``data``) are done
            backend.synchronize()
        for buf, hdr, ch in posts:
            self._keep.append(buf)
            self._reqs.append(self.comm.mpi.Isend(buf, dest=ch.dst_rank, tag=ch.tag))
            self._reqs.append(self.comm.mpi.Isend(hdr, dest=ch.dst_rank, tag=ch.htag))

    def wait(self, step: int = -1):
        """Complete this step's sends and the next step's receives (under the watchdog)."""
        if not self._reqs:
            return
        peers = sorted({ch.src_rank for ch, _ in self._pending} |
                       {ch.dst_rank for ch in self.send_ch.values()
                        if ch.dst_rank != self.rank})
        self.wait_time += self.comm.wait(self._reqs, f"the messages of step {step}", peers,
                                         lost=lambda err: self._lost_message(step, err),
                                         detail=self._waiting_on)
        self._reqs.clear()
        self._keep.clear()
        staged = [ch for ch, _ in self._pending if ch.host_nxt is not None]
        for ch in staged:
            backend.copy_to_device(ch.host_nxt, ch.nxt)
        if staged:  # the next receive reuses host_nxt: the copies must have run
            backend.synchronize(staged[0].nxt)
        self._pending.clear()

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

    def _waiting_on(self) -> str:
        """The messages still in flight (for the watchdog's message)."""
        names = [f"{ch.name()} from rank {ch.src_rank}" for ch, pair in self._pending
                 if not MPI.Request.Testall(pair)]
        return "; ".join(names) if names else "sends to neighbours to complete"

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


# Earlier name of the Transport
Exchange = Transport


class Link:
    """Point-to-point of device arrays with one neighbouring rank (the GPipe stages), with
    the Transport's staging: ``send`` and ``post_recv`` return requests for
    :meth:`Comm.wait`; after the wait, :meth:`finish` completes the staged receives."""

    def __init__(self, comm: Comm, peer: int, shape, dtype, xp=None, cuda_aware: bool = False):
        self.comm, self.peer = comm, peer
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.xp = backend.xp() if xp is None else xp
        self.staged = self.xp is not np and not cuda_aware
        self._host: List[np.ndarray] = []  # staging buffers, one per message in flight
        self._landing: List[Tuple[np.ndarray, object]] = []
        self._keep = []

    def _host_buf(self, i: int) -> np.ndarray:
        while len(self._host) <= i:
            self._host.append(backend.pinned_empty(self.shape, self.dtype))
        return self._host[i]

    def send(self, arr, tag: int, slot: int = 0):
        """Isend ``arr`` (shape ``shape``); ``slot`` picks a staging buffer that must not be
        in flight already."""
        if self.staged:
            buf = self._host_buf(slot)
            backend.copy_to_host(arr, buf)
        else:
            backend.synchronize(arr)
            buf = arr if arr.flags.c_contiguous else self.xp.ascontiguousarray(arr)
        self._keep.append(buf)
        return self.comm.mpi.Isend(buf, dest=self.peer, tag=tag)

    def post_recv(self, out, tag: int, slot: int = 0):
        """Irecv into the device array ``out`` (landing after :meth:`finish`)."""
        if not self.staged:
            return self.comm.mpi.Irecv(out, source=self.peer, tag=tag)
        buf = self._host_buf(slot)
        self._landing.append((buf, out))
        return self.comm.mpi.Irecv(buf, source=self.peer, tag=tag)

    def finish(self, out=None):
        """Copy staged receives to the device (all of them, or the one landing in ``out``)."""
        done = [(b, o) for b, o in self._landing if out is None or o is out]
        for buf, dst in done:
            backend.copy_to_device(buf, dst)
        if done:  # the staging buffers may be reused as soon as this returns
            backend.synchronize(done[0][1])
        self._landing = [(b, o) for b, o in self._landing if not (out is None or o is out)]

    def release(self):
        """Forget the arrays of completed sends."""
        self._keep.clear()
