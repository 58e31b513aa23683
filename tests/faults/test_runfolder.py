"""Nothing lost silently (issue 12): evaluation errors, refused resumes, damaged
checkpoints, divergence, concurrent runs of one name, a full disk, planning without data.

Real ``mpiexec`` jobs under timeouts; every fault is made by the test itself. Bad input is
one line and exit 2 and leaves what was written before untouched; a failure (a full disk,
divergence) is one line and exit 1.
"""

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import train_helpers as helpers
from test_faults import _metric_lines, _snapshot

from ssmpi import checkpoint as ckpt
from ssmpi.rundir import resume_conflicts

ENV = dict(helpers.ENV, SSMPI_TRACEBACK="0")
base_args = helpers.base_args


@pytest.fixture(scope="module")
def motion(tmp_path_factory):
    return helpers.make_motion(tmp_path_factory.mktemp("motion"), env=ENV)


@pytest.fixture(scope="module")
def finished(motion, tmp_path_factory):
    """A finished 4-rank run with checkpoints at iterations 2 and 4."""
    out = tmp_path_factory.mktemp("runs")
    p = helpers.run_train(4, base_args(motion, out, "done", "--set", "run.iterations=4",
                                       "--set", "run.checkpoint_every=2"), env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    return out / "done"


def run_train(n, args, timeout=90):
    t0 = time.monotonic()
    p = helpers.run_train(n, args, timeout=timeout, env=ENV)
    p.seconds = time.monotonic() - t0
    return p


def evaluate(n, *args, timeout=90):
    t0 = time.monotonic()
    p = subprocess.run(["mpiexec", "-n", str(n), sys.executable, "-m", "ssmpi.evaluate",
                        *map(str, args)], capture_output=True, text=True, timeout=timeout,
                       env=ENV)
    p.seconds = time.monotonic() - t0
    return p


def error_lines(p):
    """The lines that say "error", without the launcher's own report of a non-zero exit
    (Open MPI's; MPICH's mpiexec adds nothing)."""
    return [ln for ln in p.stdout.splitlines() + helpers.program_lines(p.stderr)
            if "error" in ln.lower()]


def one_error(p, code, *words):
    """Exit ``code`` with exactly one error line holding every one of ``words``."""
    errors = error_lines(p)
    print(f"exit {p.returncode} in {p.seconds:.1f}s: {errors}")
    assert p.returncode == code, (p.stdout + p.stderr)[-3000:]
    assert len(errors) == 1, (p.stdout + p.stderr)[-3000:]
    for w in words:
        assert w in errors[0], (w, errors[0])
    assert "Traceback" not in p.stderr
    return errors[0]


def damaged_copy(motion, tmp_path, shard="test-00001-of-00002.h5"):
    d = tmp_path / "data"
    shutil.copytree(motion, d)
    (d / shard).unlink()
    return d


# -- 3. evaluation: bad input on some ranks is one line, at once --------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["missing-test-shard", "width", "k"])
def test_evaluate_bad_input_is_one_line(motion, finished, tmp_path, case):
    sets = {"missing-test-shard": f"data.root={damaged_copy(motion, tmp_path)}"
            if case == "missing-test-shard" else "",
            "width": "model.width=8", "k": "engine.k=3"}[case]
    words = {"missing-test-shard": ["test-00001-of-00002.h5", "shard file missing"],
             "width": ["does not fit this model", "width=8"],
             "k": ["does not fit this model", "k 2 (this run: 3)"]}[case]
    p = evaluate(2, "--checkpoint", finished, "--set", sets)  # 2 ranks x 2 units each
    one_error(p, 2, *words)
    assert p.seconds < 30


# -- 4. the evaluation split is checked before training -----------------------------------
@pytest.mark.timeout(120)
def test_missing_eval_shard_fails_at_start(motion, tmp_path):
    root = damaged_copy(motion, tmp_path)
    p = run_train(4, base_args(root, tmp_path, "ev", "--set", "run.eval_every=10",
                               "--set", "run.iterations=20"))
    one_error(p, 2, "test-00001-of-00002.h5: shard file missing")
    assert not (tmp_path / "ev").exists(), "the failed run wrote its run folder"


# -- 6. a resume that does not fit is refused before anything is written -------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("sets,keys", [
    (["model.width=8"], ["model.width: 4.0 -> 8.0"]),
    (["engine.fuse=add", "engine.k=3", "engine.mode=sideways", "model.units=5",
      "optim.name=sgd"],
     ["engine.fuse: 'concat' -> 'add'", "engine.k: 2 -> 3", "engine.mode: 'skip' -> "
      "'sideways'", "model.units: 4 -> 5", "optim.name: 'adam' -> 'sgd'"]),
], ids=["width", "fuse-k-mode-units-optimizer"])
def test_refused_resume_writes_nothing(motion, finished, sets, keys):
    before = _snapshot(finished)
    config = (finished / "config.toml").read_bytes()
    args = base_args(motion, finished.parent, "done", "--set", "run.iterations=8",
                     "--resume")
    for s in sets:
        args += ["--set", s]
    p = run_train(4, args)
    one_error(p, 2, "cannot resume", *keys)
    assert "resumed from" not in p.stdout
    assert (finished / "config.toml").read_bytes() == config
    assert _snapshot(finished) == before


def test_resume_conflicts_name_every_fixed_key():
    """Each key a checkpoint depends on, alone (in-process: no MPI needed)."""
    from ssmpi.config import load_config

    saved = load_config(None, ["model.name=tiny", "model.units=4"]).to_dict()
    for key, value in [("model.width", "8"), ("engine.fuse", "add"), ("engine.k", "3"),
                       ("engine.mode", "sideways"), ("model.units", "5"),
                       ("optim.name", "sgd"), ("model.name", "vgg8"),
                       ("run.dtype", "float64")]:
        now = load_config(None, ["model.name=tiny", "model.units=4", f"{key}={value}"])
        got = resume_conflicts(saved, now.to_dict())
        assert len(got) == 1 and got[0].startswith(key + ":"), (key, got)
    same = load_config(None, ["model.name=tiny", "model.units=4", "optim.lr=0.5",
                              "run.iterations=9"]).to_dict()
    assert resume_conflicts(saved, same) == []
    # a run folder written before a key existed resumes while the key keeps its default,
    # and is refused when the key is set to something else
    from ssmpi.config import Config
    older = {sec: {k: v for k, v in body.items() if not k.startswith("arch")}
             if isinstance(body, dict) else body for sec, body in saved.items()}
    assert resume_conflicts(older, same, Config().to_dict()) == []
    custom = load_config(None, ["model.name=custom", "model.units=4",
                                'model.arch=[["conv 8", "relu"], ["gap", "linear classes"]]'])
    got = resume_conflicts(older, custom.to_dict(), Config().to_dict())
    assert any(c.startswith("model.arch: []") for c in got), got


# -- 7. --resume with every checkpoint damaged --------------------------------------------
@pytest.mark.timeout(150)
def test_resume_with_every_checkpoint_damaged(motion, finished, tmp_path):
    run = tmp_path / "dmg"
    shutil.copytree(finished, run)
    for c in ckpt.list_checkpoints(run):
        (c / "manifest.json").write_text("garbage")
    before = _snapshot(run)
    args = base_args(motion, tmp_path, "dmg", "--set", "run.iterations=4", "--resume")
    p = run_train(4, args)
    one_error(p, 2, "every checkpoint", "ckpt-00000004: manifest.json unreadable",
              "ckpt-00000002: manifest.json unreadable", "--start-over")
    assert _snapshot(run) == before
    p = run_train(4, args + ["--start-over"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "every checkpoint is damaged (--start-over)" in p.stderr
    assert "resumed from" not in p.stdout and "done: 4 iterations" in p.stdout
    assert train_iterations(run) == [1, 2, 3, 4]


def train_iterations(run):
    """The iteration of every training line of metrics.jsonl, in order."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [m["iteration"] for m in lines if "loss" in m and "iteration" in m]


# -- 7b. a fresh run into the folder of a finished one ---------------------------------------
@pytest.mark.timeout(150)
def test_fresh_run_sets_the_earlier_run_aside(motion, finished, tmp_path):
    """Without --resume, a run of an existing name starts from scratch; the earlier run's
    checkpoints and metrics move to earlier/<time>/ (left in place, its newer checkpoint would
    be what a later --resume picks and what pruning keeps)."""
    run = tmp_path / "again"
    shutil.copytree(finished, run)
    old_metrics = (run / "metrics.jsonl").read_bytes()
    p = run_train(2, base_args(motion, tmp_path, "again", "--set", "run.iterations=2",
                               "--set", "run.checkpoint_every=2"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "held an earlier run" in p.stderr and "moved to" in p.stderr, p.stderr
    (earlier,) = (run / "earlier").iterdir()
    assert [c.name for c in ckpt.list_checkpoints(earlier)] == ["ckpt-00000004",
                                                                "ckpt-00000002"]
    assert (earlier / "metrics.jsonl").read_bytes() == old_metrics
    assert [c.name for c in ckpt.list_checkpoints(run)] == ["ckpt-00000002"]
    assert train_iterations(run) == [1, 2]
    assert ckpt.latest_checkpoint(run)[0].name == "ckpt-00000002"


# -- 8. metrics.jsonl after a resume: one line per iteration ------------------------------
@pytest.mark.timeout(150)
def test_resume_after_stop_keeps_one_metrics_line_per_iteration(motion, tmp_path):
    """A run stopped by SIGUSR1 (exit 99), then a resume from an older checkpoint (the
    newest one damaged): the lines after the checkpoint are dropped, each iteration is
    logged once, and the final line comes last."""
    args = base_args(motion, tmp_path, "m", "--set", "run.iterations=400", "--set",
                     "run.checkpoint_every=3", "--set", "run.eval_every=3")
    proc = subprocess.Popen(["mpiexec", "-n", "4", *helpers.TRAIN, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, start_new_session=True)
    try:
        t0 = time.monotonic()
        while _metric_lines(tmp_path / "m" / "metrics.jsonl") < 8 and proc.poll() is None \
                and time.monotonic() - t0 < 90:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGUSR1)  # mpiexec forwards it to every rank
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == 99, err[-3000:]
    done = train_iterations(tmp_path / "m")
    stop = done[-1]
    assert done == list(range(1, stop + 1))
    newest = ckpt.list_checkpoints(tmp_path / "m")[0]
    assert newest.name == f"ckpt-{stop:08d}"
    (newest / "manifest.json").write_text("garbage")  # resume from the one before
    older, _ = ckpt.latest_checkpoint(tmp_path / "m")
    at = int(older.name.split("-")[1])
    assert at < stop
    total = stop + 2
    p = run_train(4, base_args(motion, tmp_path, "m", "--set", f"run.iterations={total}",
                               "--set", "run.checkpoint_every=3", "--set",
                               "run.eval_every=3", "--resume"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"(iteration {at}); metrics.jsonl: " in p.stdout, p.stdout
    assert train_iterations(tmp_path / "m") == list(range(1, total + 1))
    lines = [json.loads(x) for x in (tmp_path / "m" / "metrics.jsonl").read_text().split(
        "\n") if x]
    evals = [m["iteration"] for m in lines if "eval" in m and not m.get("final")]
    assert evals == [i for i in range(3, total, 3)], evals
    assert lines[-1].get("final") and sum(bool(m.get("final")) for m in lines) == 1


# -- 9. engine.k beyond the model ----------------------------------------------------------
@pytest.mark.timeout(60)
def test_k_larger_than_the_model_is_rejected(motion, tmp_path):
    p = run_train(1, base_args(motion, tmp_path, "k", "--set", "engine.k=5"))
    one_error(p, 2, "engine.k = 5", "4 units", "k <= 3")
    assert not (tmp_path / "k").exists()


# -- 10. divergence ------------------------------------------------------------------------
def _finite_checkpoint(path):
    for f in path.glob("unit-*.h5"):
        with h5py.File(f, "r") as h:
            arrays = [h["theta"][...]] + [h["optim"][k][()] for k in h["optim"]]
            if not all(np.isfinite(a).all() for a in arrays):
                return False
    return True


@pytest.mark.timeout(120)
@pytest.mark.parametrize("diverge_loss,words", [
    (None, ["DivergenceError", "training diverged at iteration", "run.diverge_loss"]),
    (0, ["DivergenceError", "optimizer state 'v' is not finite", "no checkpoint written"]),
], ids=["loss", "optimizer-state"])
def test_divergence_stops_and_keeps_the_good_checkpoints(motion, tmp_path, diverge_loss,
                                                         words):
    """Adam with lr = 1e6 and a checkpoint every iteration: exit 1 with one line; no
    checkpoint with non-finite numbers exists, and the good one before is kept (with the
    loss check off, the checkpoint refuses the non-finite optimizer state)."""
    extra = ["--set", "optim.name=adam", "--set", "optim.lr=1e6", "--set",
             "run.iterations=40", "--set", "run.checkpoint_every=1", "--set",
             "run.keep_checkpoints=1"]
    if diverge_loss is not None:
        extra += ["--set", f"run.diverge_loss={diverge_loss}"]
    p = run_train(4, base_args(motion, tmp_path, "div", *extra))
    lines = [ln for ln in p.stderr.splitlines() if "ERROR" in ln]
    print(f"exit {p.returncode} in {p.seconds:.1f}s: {lines}")
    assert p.returncode == 1, p.stderr[-3000:]
    assert len(lines) == 1 and all(w in lines[0] for w in words), p.stderr[-3000:]
    kept = ckpt.list_checkpoints(tmp_path / "div")
    assert kept, "the last good checkpoint was pruned"
    assert all(ckpt.check(c) and _finite_checkpoint(c) for c in kept)
    assert f"the last good one: {kept[0]}" in lines[0] or \
        f"the last good checkpoint: {kept[0]}" in lines[0], lines[0]
    assert "done:" not in p.stdout


# -- 11. one run per run folder -------------------------------------------------------------
@pytest.mark.timeout(150)
def test_second_run_of_the_same_name_is_refused(motion, tmp_path):
    args = base_args(motion, tmp_path, "lk", "--set", "model.units=2")
    first = subprocess.Popen(["mpiexec", "-n", "2", *helpers.TRAIN, *args, "--set",
                              "run.iterations=2000"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV,
                             start_new_session=True)
    try:
        t0 = time.monotonic()
        while _metric_lines(tmp_path / "lk" / "metrics.jsonl") < 2 and first.poll() is None \
                and time.monotonic() - t0 < 90:
            time.sleep(0.01)
        lock = json.loads((tmp_path / "lk" / "run.lock").read_text())
        second = run_train(2, args + ["--set", "run.iterations=3"])
        one_error(second, 2, f"in use by pid {lock['pid']} on host {socket.gethostname()}")
        os.killpg(first.pid, signal.SIGUSR1)  # stop the first run cleanly
        out, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
    assert first.returncode == 99, err[-3000:]
    its = train_iterations(tmp_path / "lk")
    assert its == list(range(1, len(its) + 1)), "the second run wrote metrics"
    assert not (tmp_path / "lk" / "run.lock").exists(), "the lock outlived its run"


@pytest.mark.timeout(120)
def test_stale_lock_is_taken_over(motion, tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "run.lock").write_text(json.dumps(
        dict(host=socket.gethostname(), pid=gone.pid, started=time.time() - 60)))
    p = run_train(1, base_args(motion, tmp_path, "st", "--set", "model.units=2", "--set",
                               "run.iterations=2"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"taking over the stale lock {tmp_path / 'st' / 'run.lock'} (pid {gone.pid}" \
        in p.stderr, p.stderr
    assert not (tmp_path / "st" / "run.lock").exists()


def test_lock_of_a_killed_process_is_stale_even_as_a_zombie(tmp_path):
    """kill -9 leaves ranks that nobody reaps where PID 1 does not (containers, CI): a
    zombie holds no run folder. A live holder still does."""
    from ssmpi.rundir import RunDirError, RunLock
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "run.lock").write_text(json.dumps(
            dict(host=socket.gethostname(), pid=holder.pid, started=time.time())))
        with pytest.raises(RunDirError, match=f"in use by pid {holder.pid}"):
            RunLock(tmp_path).acquire()
        holder.kill()
        time.sleep(0.2)  # not reaped: a zombie now
        warned = []
        RunLock(tmp_path).acquire(warn=warned.append).release()
        assert warned and f"pid {holder.pid}" in warned[0]
    finally:
        holder.kill()
        holder.wait()


# -- 12. a full disk -----------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (skips where mounting is not permitted)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                       capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def fill(disk, leave_kib=0):
    """Fill ``disk`` up, then free ``leave_kib`` KiB again."""
    f = disk / f"filler{len(list(disk.glob('filler*')))}"
    with open(f, "wb", buffering=0) as fh:  # unbuffered: close() has nothing left to write
        try:
            while fh.write(b"\0" * 4096):
                pass
        except OSError as e:
            assert e.errno == errno.ENOSPC
    os.truncate(f, max(0, f.stat().st_size - leave_kib * 1024))


def _sha(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


@pytest.mark.timeout(150)
def test_disk_full_during_a_checkpoint(motion, small_disk):
    """The checkpoint that does not fit is removed (no .tmp left), the earlier ones stay
    intact, one line says "no space left on device", exit 1; a resume on the still-full
    disk is one clear line and exit 1 too (not 2: the input is fine)."""
    args = base_args(motion, small_disk, "full", "--set", "run.checkpoint_every=2")
    p = run_train(4, args + ["--set", "run.iterations=4"])
    assert p.returncode == 0, p.stderr[-3000:]
    run = small_disk / "full"
    good = {c.name: _sha(c) for c in ckpt.list_checkpoints(run)}
    assert sorted(good) == ["ckpt-00000002", "ckpt-00000004"]
    fill(small_disk, leave_kib=24)  # room for the metrics, not for a checkpoint (~60 KiB)
    p = run_train(4, args + ["--set", "run.iterations=8", "--resume"])
    one_error(p, 1, "no space left on device", "ckpt-00000006", "earlier ones are intact")
    assert not [x for x in run.rglob("*") if ".tmp" in x.name]
    assert {c.name: _sha(c) for c in ckpt.list_checkpoints(run)} == good
    assert all(ckpt.check(run / "checkpoints" / c) for c in good)
    fill(small_disk)  # now not a byte is left
    p = run_train(4, args + ["--set", "run.iterations=8", "--resume"])
    one_error(p, 1, "no space left on device", str(run))
    assert not [x for x in run.rglob("*") if ".tmp" in x.name or x.name == "run.lock"]
    assert {c.name: _sha(c) for c in ckpt.list_checkpoints(run)} == good


# -- 13. planning without the data ---------------------------------------------------------
@pytest.mark.timeout(60)
def test_dry_run_without_the_dataset(tmp_path):
    args = ["--set", "data.root=/nonexistent/ssmpi-data", "--set", f"run.out_dir={tmp_path}",
            "--set", "model.name=tiny", "--set", "model.units=4", "--dry-run"]
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "ssmpi.train", *args, "--set", "data.crop=16",
                        "--set", "model.num_classes=5"], capture_output=True, text=True,
                       timeout=60, env=ENV)
    p.seconds = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    assert "(no dataset at /nonexistent/ssmpi-data" in p.stdout
    assert "memory estimate per rank" in p.stdout and "linear-5" in p.stdout
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "ssmpi.train", *args], capture_output=True,
                       text=True, timeout=60, env=ENV)
    p.seconds = time.monotonic() - t0
    one_error(p, 2, "no dataset here", "data.crop and model.num_classes")
    assert not any(tmp_path.iterdir())


def test_prune_hashes_each_checkpoint_once_and_still_sees_damage(tmp_path, monkeypatch):
    """prune runs after every save: unchanged checkpoints are not read again, a file changed
    since (damage) is hashed again and the checkpoint counts as damaged."""
    def fake(it):
        c = tmp_path / "checkpoints" / f"ckpt-{it:08d}"
        c.mkdir(parents=True)
        (c / "unit-01.h5").write_bytes(bytes([it]) * 1000)
        (c / "manifest.json").write_text(json.dumps(dict(
            format=ckpt.FORMAT, n_units=1, iteration=it, units={"1": dict(
                file="unit-01.h5", sha256=hashlib.sha256(bytes([it]) * 1000).hexdigest())})))
        return c

    hashed = []
    real = ckpt._sha256
    monkeypatch.setattr(ckpt, "_sha256", lambda p: hashed.append(p.parent.name) or real(p))
    for it in (1, 2, 3):
        fake(it)
        ckpt.prune(tmp_path, keep=2)
    assert [c.name for c in ckpt.list_checkpoints(tmp_path)] == ["ckpt-00000003",
                                                                 "ckpt-00000002"]
    assert sorted(hashed) == ["ckpt-00000001", "ckpt-00000002", "ckpt-00000003"]
    # damage the newest: it is hashed again, fails, and goes (a newer intact one exists)
    f = tmp_path / "checkpoints" / "ckpt-00000003" / "unit-01.h5"
    f.write_bytes(b"\0" * 1000)
    os.utime(f, ns=(time.time_ns() + 10**9,) * 2)
    hashed.clear()
    fake(4)
    ckpt.prune(tmp_path, keep=2)
    assert sorted(hashed) == ["ckpt-00000003", "ckpt-00000004"]
    assert [c.name for c in ckpt.list_checkpoints(tmp_path)] == ["ckpt-00000004",
                                                                 "ckpt-00000002"]
    assert ckpt.latest_checkpoint(tmp_path)[0].name == "ckpt-00000004"
