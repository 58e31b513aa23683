"""What every ssmpi program (``train``, ``evaluate``) does around its work.

- Signal handlers for SIGUSR1 / SIGTERM are installed **before** ``MPI_Init`` (mpi4py is
  imported with ``rc.initialize = False``): SLURM may signal while MPI starts. A signal asks
  for a clean stop (checkpoint, exit 99); the same signal a second time aborts at once.
- An uncaught exception on any rank prints one line naming the rank and unit and aborts
  the whole job (:mod:`ssmpi.failure`).
- Bad input (config, data, topology, checkpoint) is one line and exit 2: printed once by
  rank 0 when every rank fails alike, otherwise by the failing rank, which aborts the job.
- A full disk is one line naming the path, exit 1.

Exit codes: 0 done, 1 failed, 2 bad input, 99 stopped by a signal after a checkpoint.
"""

from __future__ import annotations

import errno
import signal
import sys
from typing import Callable

EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_REQUEUE = 0, 1, 2, 99


class Stopper:
    """SIGUSR1 / SIGTERM: finish the current iteration, checkpoint, exit for requeue.
    The same signal a second time aborts the job at once (an impatient user; SLURM's
    USR1-then-TERM, or a TERM forwarded as USR1 by the job script, still checkpoints)."""

    def __init__(self):
        self.flag = 0
        self.signame = ""
        self._seen = set()

    def install(self):
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if name in self._seen:
            raise KeyboardInterrupt(f"{name} a second time")
        self._seen.add(name)
        self.flag = 1
        self.signame = self.signame or name


def user_errors():
    """The exception types that mean bad input (exit 2)."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .engine.topology import TopologyError
    from .rundir import RunDirError

    return (ConfigError, DataError, TopologyError, CheckpointError, RunDirError)


def run(prog: str, body: Callable, argv_note: str = "") -> int:
    """Start MPI after the signal handlers, then ``body(comm, stopper) -> exit code``."""
    from . import failure

    failure.defer_mpi_init()  # our signal handlers first
    stopper = Stopper()
    stopper.install()
    failure.install()
    from .engine import transport

    world = transport.init_world()
    failure.set_context(world.Get_rank())
    comm = transport.Comm(world)
    errors = user_errors()
    try:
        return body(comm, stopper)
    except errors as e:
        return _input_error(prog, comm, e)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        sys.stderr.write(f"{failure.prefix()} {prog}: error: no space left on device: "
                         f"{e.filename or e}\n")
        sys.stderr.flush()
        failure.abort_job(EXIT_FAILED)
        return EXIT_FAILED


def _input_error(prog: str, comm, e) -> int:
    """Deterministic errors happen on every rank alike: exit cleanly with one line. An error
    on some ranks only would leave the others waiting: abort the job then."""
    from . import failure

    msg = f"{prog}: error: {e}"
    if comm.size == 1:
        sys.stderr.write(msg + "\n")
        return EXIT_INPUT
    if getattr(e, "collective", False) or type(e).__name__ in ("ConfigError", "TopologyError"):
        if comm.allreduce(1, what="agreeing on an input error") == comm.size:
            if comm.rank == 0:
                sys.stderr.write(msg + "\n")
            return EXIT_INPUT
    sys.stderr.write(f"{failure.prefix()} {msg}\n")
    sys.stderr.flush()
    failure.abort_job(EXIT_INPUT)
    return EXIT_INPUT
