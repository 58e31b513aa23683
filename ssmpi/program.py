"""What every ssmpi program (``train``, ``evaluate``) does around its work.

- Signal handlers for SIGUSR1 / SIGTERM are installed **before** ``MPI_Init`` (mpi4py is
  imported with ``rc.initialize = False``): SLURM may signal while MPI starts. A signal asks
  for a clean stop (checkpoint, exit 99); the same signal a second time aborts at once.
- The GPU is bound **before** ``MPI_Init`` too (:func:`bind_device_early`): a CUDA-aware
  MPI opens its CUDA context on the current device at initialisation, which would be GPU 0
  on every rank otherwise. The device comes from ``SSMPI_DEVICE``, else from the command
  line's ``--config`` / ``--set run.device=...`` (read without MPI; the program selects again
  from the full config later, with the same result).
- An uncaught exception on any rank prints one line naming the rank and unit and aborts
  the whole job (:mod:`ssmpi.failure`).
- Bad input (config, data, topology, checkpoint) is one line and exit 2: printed once by
  rank 0 when every rank fails alike, otherwise by the failing rank, which aborts the job.
- A full disk is one line naming the path, exit 1.
- ``MPI_Init`` runs under a start-up guard (``SSMPI_STARTUP_S``, 120 s): a forked watcher
  kills the rank when MPI has not started by then (a rank that never started, or stopped).

Exit codes: 0 done, 1 failed, 2 bad input, 99 stopped by a signal after a checkpoint.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import sys
import warnings
from typing import Callable

EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_REQUEUE = 0, 1, 2, 99
# MPI_Init and the watchdog's first collective must complete within this many seconds
# (SSMPI_STARTUP_S): a rank that never starts, or stops while the job starts, would
# otherwise leave the others in MPI_Init forever (it holds the GIL: no thread can help)
STARTUP_S = 120.0


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


_STOPPER = None


def install_signals() -> Stopper:
    """Install the SIGUSR1 / SIGTERM handlers (once per process); the programs call this
    first thing, before their heavy imports."""
    global _STOPPER
    if _STOPPER is None:
        _STOPPER = Stopper()
        _STOPPER.install()
    return _STOPPER


class AgreedError(RuntimeError):
    """Bad input found by some ranks and made known to every rank (one line, exit 2)."""

    collective = True


def user_errors():
    """The exception types that mean bad input (exit 2)."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .engine.topology import TopologyError
    from .rundir import RunDirError

    return (ConfigError, DataError, TopologyError, CheckpointError, RunDirError, AgreedError)


def agree(comm, fn: Callable, what: str):
    """``fn()`` on every rank; bad input on any rank becomes an :class:`AgreedError` on
    every rank (so it is printed once, and no rank is left waiting). Returns ``fn()``."""
    out, err = None, None
    try:
        out = fn()
    except user_errors() as e:
        err = str(e)
    errors = [e for e in comm.allgather(err, what=what) if e]
    if errors:
        raise AgreedError(errors[0])
    return out


def _startup_guard():
    """Fork a watcher that kills this rank unless :func:`run` closes the returned pipe
    within ``SSMPI_STARTUP_S`` seconds (when this rank ends, the pipe closes too). A fork,
    not a new interpreter: it costs nothing when MPI starts in time."""
    limit = float(os.environ.get("SSMPI_STARTUP_S", STARTUP_S))
    if limit <= 0 or not hasattr(os, "fork"):
        return None
    rank = next((os.environ[k] for k in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID")
                 if k in os.environ), "?")
    parent = os.getpid()
    r, w = os.pipe()
    with warnings.catch_warnings():  # Python >= 3.12 warns about fork with BLAS threads;
        warnings.simplefilter("ignore")  # the child only waits on a pipe, then exits
        pid = os.fork()
    if pid == 0:  # the watcher: no imports, no locks, never returns
        try:
            for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            os.close(w)
            if not select.select([r], [], [], limit)[0] and os.getppid() == parent:
                os.write(2, f"[rank {rank}] ERROR MPI start-up did not complete within "
                            f"{limit:.0f}s (a rank of the job did not start, or was stopped; "
                            f"SSMPI_STARTUP_S); killing this rank\n".encode())
                os.kill(parent, signal.SIGKILL)
        finally:
            os._exit(0)
    os.close(r)
    _GUARDS.append(pid)
    return w


_GUARDS = []  # watcher pids, reaped by run()


def early_device(argv=None) -> str:
    """The device the command line asks for, found without MPI, with the precedence of
    ``backend.select(cfg.run.device)``: ``run.device`` of ``--config FILE`` and ``--set
    run.device=X`` (the last one wins) unless it is ``auto``, else ``$SSMPI_DEVICE``, else
    ``"auto"``. Anything unreadable counts as ``"auto"`` (the program reports it later)."""
    import os

    device = _device_in_argv(sys.argv[1:] if argv is None else list(argv))
    if device == "auto":
        device = (os.environ.get("SSMPI_DEVICE", "") or "auto").lower()
    return device


def _device_in_argv(argv) -> str:
    """``run.device`` of ``--config`` then of every ``--set`` (the last one wins), or auto."""
    device = "auto"
    for i, a in enumerate(argv):
        val = a.split("=", 1)[1] if a.startswith("--config=") else (
            argv[i + 1] if a == "--config" and i + 1 < len(argv) else None)
        if val is not None:
            try:
                from .config import tomllib

                with open(val, "rb") as f:
                    dev = tomllib.load(f).get("run", {}).get("device")
                if isinstance(dev, str):
                    device = dev.lower()
            except Exception:
                pass
    for i, a in enumerate(argv):
        val = a.split("=", 1)[1] if a.startswith("--set=") else (
            argv[i + 1] if a == "--set" and i + 1 < len(argv) else "")
        key, _, dev = val.partition("=")
        if key.strip() == "run.device" and dev.strip():
            device = dev.strip().strip("'\"").lower()
    return device


def bind_device_early(argv=None):
    """Select the device of the command line and bind this rank's GPU (node-local rank from
    the launcher's environment), before MPI starts. Returns the device id, or None (CPU, or
    any error: the program selects again after ``MPI_Init`` and reports errors there)."""
    device = early_device(argv)
    if device == "cpu":
        return None
    from . import backend

    try:
        backend.select(device)
        return backend.bind_local_device()
    except Exception:
        return None


def run(prog: str, body: Callable, argv_note: str = "") -> int:
    """Start MPI after the signal handlers and the GPU binding, then
    ``body(comm, stopper) -> exit code``."""
    from . import failure

    failure.defer_mpi_init()  # our signal handlers first
    stopper = install_signals()
    failure.install()
    from .engine import transport

    guard = None if transport.MPI.Is_initialized() else _startup_guard()
    bind_device_early()  # before MPI_Init: a CUDA-aware MPI opens its context there
    world = transport.init_world()
    failure.set_context(world.Get_rank())
    comm = transport.Comm(world)  # from here on, every wait is under the watchdog
    if guard is not None:
        os.close(guard)
        for pid in _GUARDS:  # the watcher sees the pipe close and exits: reap it
            os.waitpid(pid, 0)
        _GUARDS.clear()
    errors = user_errors()
    try:
        code = body(comm, stopper)
        # a rank that stops now would leave the others in MPI_Finalize, which no watchdog
        # sees: meet here first
        comm.barrier(what="every rank to finish")
        return code
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
