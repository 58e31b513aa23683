"""No hang anywhere (issue 12): a rank stopped with SIGSTOP ends any job, and signals are
not lost.

Each test starts a real ``mpiexec`` job and stops one rank itself (``os.kill(pid,
SIGSTOP)``) at a moment it recognises from outside: a number of lines in
``metrics.jsonl``, a file that appears, a shard that a rank opens. The job must end within
about the watchdog time, non-zero, with exactly one line naming the stopped rank, no
traceback, and no process left behind.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import train_helpers as helpers
from test_faults import _alive, _metric_lines
from test_faults import _rank_pids as rank_pids

ENV = dict(helpers.ENV, SSMPI_TRACEBACK="0")
WATCHDOG = 5  # seconds: the watchdog of these tests (engine.watchdog_factor = 0)
SLACK = 10  # seconds on top of the watchdog: ping round, abort, a loaded 2-core machine


@pytest.fixture(scope="module")
def motion(tmp_path_factory):
    return helpers.make_motion(tmp_path_factory.mktemp("motion"), env=ENV)


class Job:
    """``mpiexec -n n python -m prog args`` in its own session; :meth:`stop` SIGSTOPs a
    rank; :meth:`finish` waits for the end; :meth:`cleanup` leaves nothing running."""

    def __init__(self, n, args, prog="ssmpi.train", env=ENV):
        self.n, self.prog = n, prog
        self.proc = subprocess.Popen(["mpiexec", "-n", str(n), helpers.TRAIN[0], "-m", prog,
                                      *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, start_new_session=True)
        self.t0 = time.monotonic()
        self.ranks = {}
        self.t_stop = None

    def wait_for(self, cond, timeout=90, what="the moment to inject the fault"):
        while not cond():
            assert self.proc.poll() is None, f"the job ended before {what}: " + \
                self.proc.communicate()[1][-3000:]
            assert time.monotonic() - self.t0 < timeout, f"no {what} after {timeout}s"
            time.sleep(0.005)

    def find_ranks(self):
        self.wait_for(lambda: len(rank_pids(self.proc.pid, self.prog)) == self.n,
                      what="every rank to start")
        self.ranks = rank_pids(self.proc.pid, self.prog)
        return self.ranks

    def stop(self, rank):
        os.kill(self.ranks[rank], signal.SIGSTOP)
        self.t_stop = time.monotonic()

    def finish(self, timeout):
        """(stdout, stderr, seconds since the stop); fails if the job is still running."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.cleanup()
            out, err = self.proc.communicate()
            pytest.fail(f"the job hung: still running {timeout}s after the fault\n"
                        + err[-3000:])
        return out, err, time.monotonic() - (self.t_stop or self.t0)

    def leftovers(self, wait=10.0):
        """The ranks still alive ``wait`` seconds after the launcher ended (none expected)."""
        t = time.monotonic()
        alive = list(self.ranks.values())
        while True:
            alive = [p for p in alive if _alive(Path(f"/proc/{p}"))]
            if not alive or time.monotonic() - t > wait:
                return alive
            time.sleep(0.1)

    def cleanup(self):
        for pid in self.ranks.values():  # ours: SIGCONT so that a stopped rank can die
            if _alive(Path(f"/proc/{pid}")):
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture
def jobs():
    started = []
    yield started
    for j in started:
        j.cleanup()


def watched(*extra):
    return ["--set", f"engine.watchdog_s={WATCHDOG}", "--set", "engine.watchdog_factor=0",
            *extra]


def check_one_line(job, out, err, dt, victim, limit):
    """The job ended in time, non-zero, with one line naming ``victim``; no rank is left."""
    text = out + err
    named = [ln for ln in err.splitlines() if "stopped answering" in ln]
    hangs = [ln for ln in err.splitlines() if "HangError" in ln]
    print(f"exit {job.proc.returncode} {dt:.1f}s after the stop: {named}")
    assert job.proc.returncode != 0, text[-3000:]
    assert dt < limit, f"the job took {dt:.1f}s to end (limit {limit}s)"
    assert len(named) == 1 and len(hangs) == 1, err[-3000:]
    assert f"rank {victim} (U{victim + 1}) stopped answering" in named[0], err[-3000:]
    assert "Traceback" not in text
    left = job.leftovers()
    assert not left, f"ranks {left} still running after the job ended"
    return named[0]


# -- 1. a stopped rank, in every kind of wait ----------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("n,victim,mode", [(5, 2, "poll"), (4, 1, "block")])
def test_stopped_rank_in_the_step_loop(motion, tmp_path, jobs, n, victim, mode):
    """SIGSTOP of one rank a few iterations into training: the job ends within the
    watchdog time (poll and block waits alike), naming that rank once."""
    job = Job(n, helpers.base_args(motion, tmp_path, "s", "--set", f"model.units={n}",
                                   "--set", "run.iterations=400", "--set",
                                   f"engine.wait_mode={mode}", *watched()))
    jobs.append(job)
    job.find_ranks()
    job.wait_for(lambda: _metric_lines(tmp_path / "s" / "metrics.jsonl") >= 3)
    job.stop(victim)
    out, err, dt = job.finish(timeout=WATCHDOG + 60)
    check_one_line(job, out, err, dt, victim, WATCHDOG + SLACK)
    assert _metric_lines(tmp_path / "s" / "metrics.jsonl") < 400


@pytest.mark.timeout(120)
def test_stopped_rank_while_the_others_are_in_a_collective(motion, tmp_path, jobs):
    """Rank 0 stops while it draws the timeline (run.trace: rank 0 alone writes the JSON
    and the PNG) and the others have gone on into the final checkpoint's gather and
    barrier: they name rank 0 within the watchdog time."""
    job = Job(4, helpers.base_args(motion, tmp_path, "c", "--set", "run.iterations=4",
                                   "--set", "run.trace=2", *watched()))
    jobs.append(job)
    job.find_ranks()
    trace = tmp_path / "c" / "trace.json"
    job.wait_for(trace.exists, what="the timeline")
    job.stop(0)
    out, err, dt = job.finish(timeout=WATCHDOG + 60)
    line = check_one_line(job, out, err, dt, 0, WATCHDOG + SLACK)
    assert "checkpoint ckpt-00000004" in line, line  # the gather or the barrier of save()
    assert not (tmp_path / "c" / "checkpoints" / "ckpt-00000004" / "manifest.json").exists()


@pytest.fixture(scope="module")
def finished_run(motion, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    p = helpers.run_train(4, helpers.base_args(motion, out, "done", "--set",
                                               "run.iterations=4"), env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    return out / "done"


def _python_threads(pid):
    """The threads of ``pid`` named as its main thread (Python threads; MPICH's own thread
    is named "async", Open MPI's PMIx thread is named as the main one)."""
    name = Path(f"/proc/{pid}/comm").read_text()
    return {t for t in os.listdir(f"/proc/{pid}/task") if t != str(pid)
            and Path(f"/proc/{pid}/task/{t}/comm").read_text() == name}


def _opened(pid, pattern):
    return any(pattern in os.readlink(f"/proc/{pid}/fd/{fd}")
               for fd in os.listdir(f"/proc/{pid}/fd"))


def _evaluating(pid, state):
    """Has rank ``pid`` started the evaluation loop? The loader opens the test shards, and
    the loop starts its prefetch thread: a thread that was not there before the shards were
    open (the MPI library's threads start earlier, in MPI_Init)."""
    try:
        threads = _python_threads(pid)
        if not _opened(pid, "test-0000"):
            state["before"] = threads
            return False
        return "before" in state and bool(threads - state["before"])
    except OSError:
        return False


@pytest.mark.timeout(120)
def test_stopped_rank_during_evaluation(motion, finished_run, jobs):
    """``ssmpi.evaluate``: rank 1 stops once rank 0 reads the test split (the evaluation
    runs): the job ends within the watchdog time, naming rank 1."""
    job = Job(4, ["--checkpoint", str(finished_run), "--set", "data.eval_clips_per_video=4",
                  *watched()], prog="ssmpi.evaluate")
    jobs.append(job)
    ranks = job.find_ranks()
    state = {}
    job.wait_for(lambda: _evaluating(ranks[0], state), what="the evaluation")
    job.stop(1)
    out, err, dt = job.finish(timeout=WATCHDOG + 60)
    line = check_one_line(job, out, err, dt, 1, WATCHDOG + SLACK)
    assert "messages of step" in line or "evaluation results" in line, line
    assert "clip accuracy" not in out


# -- 2. SIGTERM while a rank is stopped ----------------------------------------------------
@pytest.mark.timeout(120)
def test_sigterm_while_a_rank_is_stopped(motion, tmp_path, jobs):
    """Rank 2 stops; then every rank gets SIGTERM (what scancel does). The ranks catch it
    (to checkpoint after the step), but the step cannot finish: the watchdog still ends
    the job, naming rank 2."""
    job = Job(4, helpers.base_args(motion, tmp_path, "t", "--set", "run.iterations=400",
                                   *watched()))
    jobs.append(job)
    ranks = job.find_ranks()
    job.wait_for(lambda: _metric_lines(tmp_path / "t" / "metrics.jsonl") >= 3)
    job.stop(2)
    time.sleep(0.5)
    for pid in ranks.values():
        os.kill(pid, signal.SIGTERM)
    out, err, dt = job.finish(timeout=WATCHDOG + 60)
    check_one_line(job, out, err, dt, 2, WATCHDOG + SLACK)
    assert "stopped by signal" not in err  # no checkpoint claimed: the step never ended


# -- a rank stopped while the job starts ---------------------------------------------------
@pytest.mark.timeout(120)
def test_stopped_rank_during_startup(motion, tmp_path, jobs):
    """Rank 1 stops the moment it appears, before MPI_Init: the others wait in MPI_Init
    (which holds the GIL), so the start-up guard (SSMPI_STARTUP_S) ends the job."""
    limit = 4
    job = Job(4, helpers.base_args(motion, tmp_path, "u", "--set", "run.iterations=40"),
              env=dict(ENV, SSMPI_STARTUP_S=str(limit)))
    jobs.append(job)
    job.wait_for(lambda: 1 in rank_pids(job.proc.pid), what="rank 1 to appear")
    job.ranks = rank_pids(job.proc.pid)
    job.stop(1)
    out, err, dt = job.finish(timeout=limit + 60)
    job.ranks = rank_pids(job.proc.pid) or job.ranks
    print(f"exit {job.proc.returncode} after {dt:.1f}s: "
          f"{[ln for ln in err.splitlines() if 'ERROR' in ln]}")
    assert job.proc.returncode != 0
    assert dt < limit + SLACK, f"took {dt:.1f}s"
    assert "MPI start-up did not complete within 4s" in err, err[-3000:]
    assert "Traceback" not in err
    assert not job.leftovers()


# -- 14. a signal during start-up is not lost ----------------------------------------------
def _catches(pid, sig):
    """Has process ``pid`` installed a handler for ``sig`` (SigCgt in /proc/pid/status)?"""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return False


@pytest.mark.timeout(120)
def test_signal_during_startup_stops_cleanly(motion, tmp_path, jobs):
    """SIGUSR1 to every rank as soon as it has its handler (installed first thing, before
    NumPy and MPI_Init): the job stops cleanly after its first iteration, with a checkpoint,
    exit 99, instead of dying from the signal's default action. (Before the handler, i.e.
    while the interpreter itself starts, the default action still applies: measured.)"""
    job = Job(4, helpers.base_args(motion, tmp_path, "e", "--set", "run.iterations=40"))
    jobs.append(job)
    sent = {}
    while len(sent) < 4:
        assert time.monotonic() - job.t0 < 60 and job.proc.poll() is None, \
            job.proc.communicate()[1][-3000:]
        for rank, pid in rank_pids(job.proc.pid).items():
            if rank not in sent and _catches(pid, signal.SIGUSR1):
                os.kill(pid, signal.SIGUSR1)
                sent[rank] = round(time.monotonic() - job.t0, 2)
                job.ranks[rank] = pid
        time.sleep(0.001)
    out, err, dt = job.finish(timeout=60)
    print(f"SIGUSR1 sent (s after mpiexec started): {sent}; exit {job.proc.returncode} "
          f"{time.monotonic() - job.t0 - max(sent.values()):.1f}s after the last signal")
    assert job.proc.returncode == 99, err[-3000:]
    assert "stopped by signal at iteration 1;" in err, err[-3000:]
    assert (tmp_path / "e" / "checkpoints" / "ckpt-00000001" / "manifest.json").is_file()
    assert "Traceback" not in err


@pytest.mark.timeout(120)
def test_second_sigterm_aborts_at_once(motion, tmp_path, jobs):
    """Rank 2 stops; SIGTERM to every rank, and again a second later: the same signal a
    second time aborts the job at once (an impatient user)."""
    job = Job(4, helpers.base_args(motion, tmp_path, "t2", "--set", "run.iterations=400"))
    jobs.append(job)
    ranks = job.find_ranks()
    job.wait_for(lambda: _metric_lines(tmp_path / "t2" / "metrics.jsonl") >= 3)
    job.stop(2)
    for _ in range(2):
        time.sleep(1.0)
        t_term = time.monotonic()
        for pid in ranks.values():
            os.kill(pid, signal.SIGTERM)
    out, err, _ = job.finish(timeout=60)
    dt = time.monotonic() - t_term
    lines = [ln for ln in err.splitlines() if "interrupted" in ln]
    print(f"exit {job.proc.returncode} {dt:.1f}s after the second SIGTERM: {lines}")
    assert job.proc.returncode != 0
    assert dt < 5, f"{dt:.1f}s after the second signal"
    assert lines and all("SIGTERM a second time" in ln for ln in lines), err
    assert "Traceback" not in err
    assert not job.leftovers()
