"""Does this MPI read and write GPU memory (CUDA-aware)? Run on 2 ranks, in a subprocess:

    timeout 60 mpiexec -n 2 python tests/scripts/cuda_aware_probe.py

Rank 0 sends a CuPy array straight to MPI, rank 1 receives into one; prints
``cuda_aware: yes`` and exits 0 when the data arrives intact. An MPI that is not CUDA-aware
crashes here (a segmentation fault is the usual answer) or delivers garbage: run it only as
a probe, never inside a job that matters. ``benchmarks/gpu_check.sh`` uses it to decide
whether to run the ``cuda_aware`` tests (``SSMPI_CUDA_AWARE=1``).
"""

import sys

import numpy as np
from mpi4py import MPI

from ssmpi import backend


def main() -> int:
    cp = backend.select("gpu")
    backend.bind_local_device()
    comm = MPI.COMM_WORLD
    ref = np.arange(1 << 16, dtype=np.float32)
    if comm.rank == 0:
        buf = cp.asarray(ref)
        backend.synchronize()
        comm.Send(buf, dest=1, tag=3)
        return 0
    buf = cp.zeros(ref.shape, cp.float32)
    comm.Recv(buf, source=0, tag=3)
    ok = bool(np.array_equal(buf.get(), ref))
    print(f"cuda_aware: {'yes' if ok else 'no (garbage received)'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
