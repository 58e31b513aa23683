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

Buffers: on the CPU the reduction runs in place on ``Unit.grad``. A device array crosses
MPI through a host buffer unless ``cuda_aware=True`` (a CUDA-aware MPI reads the device
buffer after the stream is synchronized).
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
from mpi4py import MPI

from .. import backend
from .transport import Comm


class GradientReducer:
    """Combine the gradients of the units held by this rank across ``comm``'s replicas.

    Parameters
    ----------
    comm : :class:`~ssmpi.engine.transport.Comm` of the ranks owning the same units (one
        per replica), or None for a single replica (no communication)
    cuda_aware : hand device buffers to MPI directly
    """

    def __init__(self, comm: Optional[Comm] = None, *, cuda_aware: bool = False):
        self.comm = comm if comm is not None and comm.size > 1 else None
        self.cuda_aware = cuda_aware
        self._host: Dict[int, np.ndarray] = {}  # unit -> host staging buffer

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
        reqs, staged = [], []
        for u, n in zip(units, total):
            u.mean_grad()
            if n and u.count != n:
                u.grad *= u.count / n  # this replica's share of the mean over all steps
            elif not n:
                continue
            buf = u.grad
            if backend.is_device_array(buf) and not self.cuda_aware:
                host = self._host.get(u.l)
                if host is None:
                    host = self._host[u.l] = backend.pinned_empty(buf.shape, buf.dtype)
                backend.copy_to_host(buf, host)
                staged.append((host, u))
                buf = host
            else:
                backend.synchronize(buf)
            reqs.append(self.comm.mpi.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM))
        self.comm.wait(reqs, "the gradient allreduce of the other replicas")
        for host, u in staged:
            backend.copy_to_device(host, u.grad)
        if staged:
            backend.synchronize(staged[0][1].grad)
        return {u.l: bool(n) for u, n in zip(units, total)}
