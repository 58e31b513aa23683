"""No hangs: an exception on any rank ends the whole MPI job, naming the rank and unit."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
import warnings

_where = {"rank": None, "units": ""}


def set_context(rank: int, units: str = ""):
    """What to name in error messages, e.g. ``set_context(3, "U4")``."""
    _where["rank"], _where["units"] = rank, units


def prefix() -> str:
    r = _where["rank"]
    u = f" {_where['units']}" if _where["units"] else ""
    return f"[rank {r}{u}]" if r is not None else "[ssmpi]"


def report(exc_type, exc, tb, *, full: bool = True) -> str:
    """The message printed for a fatal error: one clear line, then the traceback."""
    line = f"{prefix()} ERROR {exc_type.__name__}: {exc}"
    text = line + "\n"
    full = full and getattr(exc, "traceback", True) is not False  # e.g. a watchdog report
    if full and os.environ.get("SSMPI_TRACEBACK", "1") != "0":
        text += "".join(traceback.format_exception(exc_type, exc, tb))
    return text


def abort_job(code: int = 1):
    """Abort every rank of the job (``MPI_Abort``), or exit if MPI is not initialised.

    Before the abort the rank waits ``SSMPI_ABORT_DELAY`` seconds (0.3): the launcher
    (MPICH's Hydra) kills every process as soon as the abort reaches it, and stderr that a
    rank has written but the launcher has not yet forwarded would be lost with it, taking
    the one line that names the rank and the error along (seen once in CI: an empty
    stderr). Signals get their default action first: the line is written, and a launcher
    that terminates the ranks (Open MPI's sends SIGTERM) must not meet the program's
    stop handler, whose KeyboardInterrupt would print a traceback from the hook."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (ValueError, OSError):  # not the main thread: nothing to do
            pass
    try:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            if MPI.COMM_WORLD.Get_size() > 1:
                time.sleep(float(os.environ.get("SSMPI_ABORT_DELAY", "0.3")))
            MPI.COMM_WORLD.Abort(code)
    except Exception:
        pass
    os._exit(code)


def warn(message: str):
    """A warning on stderr, one line, naming this rank (and its units)."""
    sys.stderr.write(f"{prefix()} WARNING {message}\n")
    sys.stderr.flush()


def _showwarning(message, category, filename, lineno, file=None, line=None):
    warn(f"{category.__name__}: {message} ({os.path.basename(filename)}:{lineno})")


def defer_mpi_init():
    """Make the next ``from mpi4py import MPI`` leave MPI uninitialised (the program calls
    ``MPI_Init`` itself, after installing its signal handlers)."""
    import mpi4py

    mpi4py.rc.initialize = False
    mpi4py.rc.finalize = True


def install(comm=None):
    """Install hooks so that an uncaught exception (main thread or any thread) prints a
    one-line error with the rank and unit, then aborts the whole job."""
    if comm is not None and _where["rank"] is None:
        _where["rank"] = comm.Get_rank()

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, KeyboardInterrupt):
            sys.stderr.write(f"{prefix()} interrupted{f' ({exc})' if str(exc) else ''}\n")
            sys.stderr.flush()
            abort_job(130)
        sys.stderr.write(report(exc_type, exc, tb))
        sys.stderr.flush()
        abort_job(1)

    def thook(args):
        hook(args.exc_type, args.exc_value, args.exc_traceback)

    sys.excepthook = hook
    threading.excepthook = thook
    warnings.showwarning = _showwarning
