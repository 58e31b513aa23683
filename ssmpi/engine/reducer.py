"""The gradient reducer: the only place where replicas combine their gradients.

Data parallel x depth parallel: R replicas of the pipeline; the R ranks that own the same
units form one communicator. Before an update, unit U_l on replica r holds the gradient
summed over its n_r valid steps, S_r, and the count n_r (``Unit.grad``, ``Unit.count``).
The update uses the mean over every valid step of every replica::

    g = (S_1 + ... + S_R) / (n_1 + ... + n_R)       computed as  sum_r (S_r / n_r) (n_r / n)

(the second form is the first; it keeps the per-replica means, so that with equal counts
and R a power of two the result is bitwise the mean of the replicas' means). A unit whose
total count n is 0 takes no optimizer step on any replica (an optimizer step with a zero
gradient still moves Adam and momentum).

How the sums travel (``mode``):

- ``host`` (the default on a GPU without a CUDA-aware MPI): every device gradient is copied
  into a page-locked host buffer (all copies queued, one synchronisation), reduced by MPI
  there, and copied back (one synchronisation before the buffers may be reused). On the CPU
  the reduction runs in place on ``Unit.grad``.
- ``cuda_aware``: device buffers go to MPI directly, after one synchronisation (needs a
  CUDA-aware MPI; with any other MPI a device buffer is refused or crashes).
- ``nccl``: NCCL through CuPy (:class:`ssmpi.backend.NcclComm`), queued on the stream (no
  host copy, no synchronisation; later kernels see the sums). Needs one GPU per rank of the
  replica communicator (NCCL refuses two ranks on one device); not under the watchdog.
- ``auto``: ``cuda_aware`` when the engine's ``cuda_aware`` is set, else ``host``.

The valid-step counts always travel through MPI (host integers).
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
from mpi4py import MPI

from .. import backend
from .transport import Comm
from .transport import processor_name as transport_host

MODES = ("auto", "host", "cuda_aware", "nccl")


class GradientReducer:
    """Combine the gradients of the units held by this rank across ``comm``'s replicas.

    Parameters
    ----------
    comm : :class:`~ssmpi.engine.transport.Comm` of the ranks owning the same units (one
        per replica), or None for a single replica (no communication)
    cuda_aware : hand device buffers to MPI directly (what ``mode="auto"`` follows)
    mode : ``auto`` | ``host`` | ``cuda_aware`` | ``nccl`` (see the module docstring); with
        ``nccl`` the constructor is a collective of ``comm`` (it builds the NCCL
        communicator) and raises :class:`ssmpi.backend.BackendError` without a GPU
    """

    def __init__(self, comm: Optional[Comm] = None, *, cuda_aware: bool = False,
                 mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"allreduce mode {mode!r} is not one of {', '.join(MODES)}")
        self.comm = comm if comm is not None and comm.size > 1 else None
        self.mode = ("cuda_aware" if cuda_aware else "host") if mode == "auto" else mode
        self.cuda_aware = self.mode == "cuda_aware"
        self._host: Dict[int, np.ndarray] = {}  # unit -> host staging buffer
        self._nccl = None
        if self.mode == "nccl" and self.comm is not None:
            self._nccl = self._make_nccl(self.comm)

    @staticmethod
    def _make_nccl(comm: Comm):
        """The NCCL communicator of ``comm``'s ranks (a collective)."""
        backend.check_nccl()  # every rank: a clear error without a GPU
        keys = comm.allgather((transport_host(), backend.device_key()),
                              what="the GPUs of the replicas (NCCL)")
        if len(set(keys)) < len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            raise backend.BackendError(
                f"engine.allreduce = 'nccl': ranks of one replica group share a GPU ({dup}); "
                f"NCCL needs one GPU per rank: use 'host'")
        uid = comm.bcast(backend.nccl_unique_id() if comm.rank == 0 else None, root=0,
                         what="the NCCL unique id")
        comm.barrier(what="the start of NCCL")  # every rank is here: the init will not hang
        return backend.NcclComm(comm.size, uid, comm.rank)

    @property
    def replicas(self) -> int:
        return 1 if self.comm is None else self.comm.size

    def reduce(self, units) -> Dict[int, bool]:
        """Turn every unit's accumulated gradient into the mean over all valid steps of all
        replicas (in place). Returns {unit: take an optimizer step?} (total count > 0)."""
        if self.comm is None:
            for u in units:
                u.mean_grad()
            return {u.l: u.count > 0 for u in units}
        counts = np.array([u.count for u in units], np.int64)
        total = np.empty_like(counts)
        self.comm.wait([self.comm.mpi.Iallreduce(counts, total, op=MPI.SUM)],
                       "the valid-step counts of the other replicas")
        bufs, staged, device = [], [], False
        for u, n in zip(units, total):
            u.mean_grad()
            if n and u.count != n:
                u.grad *= u.count / n  # this replica's share of the mean over all steps
            elif not n:
                continue
            buf = u.grad
            if backend.is_device_array(buf) and self.mode == "host":
                host = self._host.get(u.l)
                if host is None:
                    host = self._host[u.l] = backend.pinned_empty(buf.shape, buf.dtype)
                backend.copy_to_host(buf, host, blocking=False)
                staged.append((host, u))
                buf = host
            else:
                device = device or backend.is_device_array(buf)
            bufs.append(buf)
        if self._nccl is not None:
            self._nccl.allreduce_sum(bufs)  # on the stream: the optimizer's kernels follow
            return {u.l: bool(n) for u, n in zip(units, total)}
        if staged or device:  # the host copies (or the kernels writing the gradients) are done
            backend.synchronize()
        reqs = [self.comm.mpi.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM) for buf in bufs]
        self.comm.wait(reqs, "the gradient allreduce of the other replicas")
        for host, u in staged:
            backend.copy_to_device(host, u.grad)
        if staged:  # the host buffers may be reused by the next reduce
            backend.synchronize()
        return {u.l: bool(n) for u, n in zip(units, total)}
