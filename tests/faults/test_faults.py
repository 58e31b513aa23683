"""Fault tests: a rank killed with SIGKILL, damaged checkpoints, bad data and config.

Every run goes through real mpiexec with a timeout. Bad input must give one clear line and
a non-zero exit, and must not touch what earlier runs wrote.
"""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import train_helpers as helpers

from ssmpi import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / ".." / "shared" / "fixtures"
ENV = dict(helpers.ENV, SSMPI_TRACEBACK="0")
TRAIN = helpers.TRAIN
base_args = helpers.base_args


@pytest.fixture(scope="module")
def motion(tmp_path_factory):
    return helpers.make_motion(tmp_path_factory.mktemp("motion"), env=ENV)


def run_train(n, args, timeout=120):
    return helpers.run_train(n, args, timeout=timeout, env=ENV)


def same_params(a, b):
    pa, pb = (ckpt.read_parameters(ckpt.latest_checkpoint(d)[0]) for d in (a, b))
    assert pa.keys() == pb.keys()
    for u in pa:
        for k in pa[u]:
            assert np.array_equal(pa[u][k], pb[u][k]), (u, k)


def _children(pid):
    """PIDs of every descendant of ``pid`` (only processes this test started)."""
    kids = {}
    for st in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(st.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(st.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


RANK_VARS = (b"PMI_RANK=", b"OMPI_COMM_WORLD_RANK=", b"PMIX_RANK=")  # MPICH, Open MPI


def _rank_of(environ):
    """The MPI rank in a process's environment (a list of b"KEY=VALUE"), or None."""
    for var in RANK_VARS:
        for e in environ:
            if e.startswith(var):
                return int(e[len(var):])
    return None


def _rank_pids(launcher_pid, prog="ssmpi.train"):
    """{rank: pid} of the ``prog`` processes under our own mpiexec (the launcher's rank
    variable). A rank's start-up watcher (a fork with the same command line and
    environment, ssmpi.program) is skipped."""
    found = {}
    for c in _children(launcher_pid):
        try:
            cmd = Path(f"/proc/{c}/cmdline").read_bytes()
            env = Path(f"/proc/{c}/environ").read_bytes().split(b"\0")
            ppid = int(Path(f"/proc/{c}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        rank = _rank_of(env) if prog.encode() in cmd else None
        if rank is not None:
            found[c] = (rank, ppid)
    return {rank: pid for pid, (rank, ppid) in found.items() if ppid not in found}


def _metric_lines(path):
    return len(path.read_text().splitlines()) if path.exists() else 0


# -- kill -9 of one rank -----------------------------------------------------------------
@pytest.mark.timeout(240)
def test_kill_one_rank_ends_the_job_and_resume_is_bitwise(motion, tmp_path):
    """SIGKILL to one rank (random rank, random step): the job ends within 10 s, non-zero;
    --resume from the last checkpoint reaches the uninterrupted run's parameters."""
    seed = int(os.environ.get("SSMPI_FAULT_SEED", time.time_ns() % 100000))
    rnd = random.Random(seed)
    victim, at = rnd.randrange(4), rnd.randrange(6, 20)
    why = f"(seed {seed}: rank {victim} killed after iteration {at})"
    extra = ["--set", "run.iterations=24", "--set", "run.checkpoint_every=4"]
    ref = run_train(4, base_args(motion, tmp_path, "ref", *extra))
    assert ref.returncode == 0, ref.stderr[-3000:]
    args = base_args(motion, tmp_path, "cut", *extra)
    proc = subprocess.Popen(["mpiexec", "-n", "4", *TRAIN, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    try:
        mfile = tmp_path / "cut" / "metrics.jsonl"
        t0 = time.monotonic()
        while _metric_lines(mfile) < at and proc.poll() is None and time.monotonic() - t0 < 90:
            time.sleep(0.01)
        ranks = _rank_pids(proc.pid)
        assert sorted(ranks) == [0, 1, 2, 3] and proc.poll() is None, why
        os.kill(ranks[victim], signal.SIGKILL)
        t_kill = time.monotonic()
        out, err = proc.communicate(timeout=30)
        dt = time.monotonic() - t_kill
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    text = out + err
    said = [ln for ln in text.splitlines()
            if any(w in ln for w in ("BAD TERMINATION", "] ERROR", "exited on"))]
    print(f"kill -9 of rank {victim}: exit {proc.returncode} {dt:.1f}s after the kill: {said}")
    assert dt < 10, f"the job took {dt:.1f} s to end {why}"
    assert proc.returncode != 0, why
    # some message says that a process died (which one: see the xfail test below); MPICH's
    # mpiexec: BAD TERMINATION, Open MPI's prterun: "... exited on signal 9"
    flat = " ".join(text.split())  # prterun wraps its lines
    assert "BAD TERMINATION" in text or "] ERROR " in text or "exited on signal" in flat, \
        text[-3000:]
    survivors = [pid for pid in ranks.values() if _alive(Path(f"/proc/{pid}"))]
    while survivors and time.monotonic() - t_kill < 10:  # the launcher may return first
        time.sleep(0.1)
        survivors = [pid for pid in survivors if _alive(Path(f"/proc/{pid}"))]
    for pid in survivors:  # ours: never leave them running
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"ranks still running 10 s after the kill {why}"
    done = _metric_lines(mfile)
    assert done < 24, f"the run finished before the kill {why}"
    # the newest checkpoint complete at kill time (the kill may land after iteration 4k's
    # metrics line and before its checkpoint's manifest)
    newest, _ = ckpt.latest_checkpoint(tmp_path / "cut")
    res = run_train(4, args + ["--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    # one metrics line per iteration: those logged after the checkpoint were dropped
    assert _train_iterations(tmp_path / "cut") == list(range(1, 25)), why
    if newest is not None:
        last = int(newest.name.split("-")[1])
        assert last in ((done // 4) * 4, (done // 4) * 4 - 4), (last, done, why)
        assert f"ckpt-{last:08d} (iteration {last})" in res.stdout, (res.stdout[-2000:], why)
    same_params(tmp_path / "ref", tmp_path / "cut")


def _train_iterations(run):
    """The iteration of every training line of metrics.jsonl, in order."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [m["iteration"] for m in lines if "loss" in m and "iteration" in m]


def _alive(proc_dir: Path) -> bool:
    try:
        state = (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.timeout(120)
@pytest.mark.xfail(strict=False, reason="MPICH's mpiexec kills the survivors at once (they rarely "
                   "get to raise PeerLostError, which names the lost rank and edge) and its own "
                   "message names a PID, not a rank")
@pytest.mark.parametrize("victim", [0, 2])
def test_kill_one_rank_message_names_it(motion, tmp_path, victim):
    args = base_args(motion, tmp_path, "k", "--set", "run.iterations=400")
    proc = subprocess.Popen(["mpiexec", "-n", "4", *TRAIN, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    try:
        mfile = tmp_path / "k" / "metrics.jsonl"
        t0 = time.monotonic()
        while _metric_lines(mfile) < 5 and proc.poll() is None and time.monotonic() - t0 < 90:
            time.sleep(0.01)
        ranks = _rank_pids(proc.pid)
        os.kill(ranks[victim], signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    text = out + err
    assert f"lost rank {victim} (U{victim + 1}" in text, text[-3000:]


# -- damaged checkpoints -----------------------------------------------------------------
@pytest.mark.timeout(200)
def test_resume_skips_truncated_and_garbled_checkpoints(motion, tmp_path):
    """Newest checkpoint truncated, the one before garbled: --resume says so, takes the
    newest intact one and still reaches the uninterrupted run's parameters."""
    extra = ["--set", "run.iterations=12", "--set", "run.checkpoint_every=4"]
    p = run_train(4, base_args(motion, tmp_path, "c", *extra))
    assert p.returncode == 0, p.stderr[-3000:]
    shutil.copytree(tmp_path / "c", tmp_path / "ref")
    cks = tmp_path / "c" / "checkpoints"
    assert sorted(x.name for x in cks.iterdir()) == [f"ckpt-{i:08d}" for i in (4, 8, 12)]
    f = cks / "ckpt-00000012" / "unit-02.h5"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])        # truncated
    m = cks / "ckpt-00000008" / "manifest.json"
    m.write_bytes(m.read_bytes()[:40] + b"\x00garbage\xff" + m.read_bytes()[60:])  # garbled
    res = run_train(4, base_args(motion, tmp_path, "c", *extra, "--resume"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "skipping checkpoint ckpt-00000012: unit-02.h5 is damaged (sha256 mismatch)" \
        in res.stderr, res.stderr
    assert "skipping checkpoint ckpt-00000008: manifest.json unreadable" in res.stderr
    assert f"resumed from {cks}/ckpt-00000004 (iteration 4)" in res.stdout
    assert _train_iterations(tmp_path / "c") == list(range(1, 13))  # 5..12 logged once
    same_params(tmp_path / "ref", tmp_path / "c")
    # the resumed run rewrote the damaged checkpoints
    assert ckpt.latest_checkpoint(tmp_path / "c") == (cks / "ckpt-00000012", [])


# -- bad input: one clear line, non-zero exit, nothing already written damaged -----------
def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                         p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def previous_run(motion, tmp_path_factory):
    """A finished run (checkpoints, metrics, config) that later bad runs must not touch."""
    out = tmp_path_factory.mktemp("runs")
    p = run_train(4, base_args(motion, out, "prev", "--set", "run.iterations=4",
                               "--set", "run.checkpoint_every=2"))
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def _copy_dataset(motion, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(motion, d)
    return d


def _truncate_shard(d):
    f = d / "train-00000-of-00002.h5"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


def _float_frames(d, nan=False):
    with h5py.File(d / "train-00000-of-00002.h5", "r+") as f:
        a = f["videos/000003"][...].astype(np.float32)
        if nan:
            a[2, 5, 5, 0] = np.nan
        del f["videos/000003"]
        f.create_dataset("videos/000003", data=a)


def _garble_manifest(d):
    (d / "manifest.json").write_text('{"format": "ssmpi-shards", "splits": ')


def _drop_shard(d):
    (d / "train-00001-of-00002.h5").unlink()


def _bad_label(d):
    with h5py.File(d / "train-00001-of-00002.h5", "r+") as f:
        f["index/label"][0] = 7  # the dataset has 4 classes


def _wrong_shape(d):
    with h5py.File(d / "train-00000-of-00002.h5", "r+") as f:
        a = f["videos/000001"][...]
        del f["videos/000001"]
        f.create_dataset("videos/000001", data=a[:, :8])


# (id, ranks, extra --set args, dataset damage, expected text in the one line)
BAD = [
    ("negative-lr", 4, ["optim.lr=-0.1"], None, "config key optim.lr: must be >= 0, got -0.1"),
    ("unknown-key", 4, ["optim.bogus=1"], None, "unknown config key optim.bogus"),
    ("nan-lr", 4, ["optim.lr=nan"], None, "config key optim.lr: must be a finite number"),
    ("nan-mean", 4, ["data.mean=nan"], None, "config key data.mean: must be a finite number"),
    ("ranks-vs-model", 5, [], None, "5 ranks"),
    ("missing-dataset", 4, ["data.root=/nonexistent/ssmpi-data"], None, "does not exist"),
    ("truncated-hdf5", 4, [], _truncate_shard, "train-00000-of-00002.h5"),
    ("wrong-dtype", 4, [], _float_frames, "frames have dtype float32, expected uint8"),
    ("nan-in-frames", 4, [], lambda d: _float_frames(d, nan=True),
     "frames have dtype float32, expected uint8"),
    ("wrong-frame-shape", 4, [], _wrong_shape, "frames have shape"),
    ("garbled-manifest", 4, [], _garble_manifest, "unreadable manifest"),
    ("missing-shard", 4, [], _drop_shard, "shard file missing"),
    ("label-out-of-range", 4, ["run.iterations=24"], _bad_label, "outside [0, 4)"),
]
BAD_PARAMS = [pytest.param(*b, id=b[0]) for b in BAD]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("case,n,sets,damage,message", BAD_PARAMS)
def test_bad_input_is_one_line_and_touches_nothing(motion, previous_run, tmp_path, case, n,
                                                   sets, damage, message):
    root = motion
    if damage is not None:
        root = _copy_dataset(motion, tmp_path)
        damage(root)
    before = _snapshot(previous_run)
    args = base_args(root, previous_run, "prev", "--set", "run.iterations=4")
    for s in sets:
        args += ["--set", s]
    t0 = time.monotonic()
    p = run_train(n, args, timeout=60)
    # the program's lines, without the launcher's report of a non-zero exit (Open MPI's
    # prterun adds a block and, now and then, a "PMIX ERROR ... UNREACH" line)
    lines = [ln for ln in p.stdout.splitlines() + helpers.program_lines(p.stderr) if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    print(f"{case}: exit {p.returncode} in {time.monotonic() - t0:.1f}s: {errors}")
    assert p.returncode != 0, (p.stdout + p.stderr)[-3000:]
    assert len(errors) == 1 and message in errors[0], (p.stdout + p.stderr)[-3000:]
    assert "Traceback" not in p.stderr
    assert _snapshot(previous_run) == before, "the failed run changed the earlier run's files"


# -- data tools: damaged / missing videos, malformed split lines -------------------------
def _fixture(*parts):
    p = FIXTURES.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"no fixtures at {FIXTURES.resolve()}")
    return p


def convert(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "data_prep.convert", *map(str, args),
                           "--workers", "1", "--quiet", "--short-side", "32", "--shards", "1"],
                          capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.mark.timeout(200)
def test_damaged_video_is_reported_and_skipped(tmp_path):
    src = _fixture("datasets", "hmdb51_mini")
    p = convert("hmdb51", src / "hmdb51_org", src / "testTrainMulti_7030_splits", tmp_path / "o")
    assert p.returncode == 0, p.stderr[-2000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("train:")]
    assert len(line) == 1 and "skipped 1 (1 unreadable, 0 missing)" in line[0], p.stdout
    rep = (tmp_path / "o" / "skipped-train.tsv").read_text().splitlines()
    assert len(rep) == 2 and rep[1].startswith("wave/Broken_wave_f_nm_np1_ba_bad_1.avi\t"), rep
    print(line[0], "|", rep[1])


@pytest.mark.timeout(200)
def test_missing_video_is_reported(tmp_path):
    src = _fixture("datasets", "kinetics_mini")
    p = convert("kinetics", src, src / "annotations", tmp_path / "o", "--splits", "train")
    assert p.returncode == 0, p.stderr[-2000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("train:")]
    assert len(line) == 1 and "0 unreadable, 1 missing" in line[0], p.stdout
    rep = (tmp_path / "o" / "skipped-train.tsv").read_text()
    assert "MISSINGvid01" in rep, rep
    print(line[0], "|", [x for x in rep.splitlines() if "MISSING" in x])


@pytest.mark.timeout(200)
def test_malformed_split_line_is_one_line_and_keeps_the_output(tmp_path):
    src = _fixture("datasets", "ucf101_mini")
    lists = tmp_path / "lists"
    shutil.copytree(src / "ucfTrainTestlist", lists)
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_text('{"an": "earlier conversion"}\n')
    before = _snapshot(out)
    f = lists / "trainlist01.txt"
    lines = f.read_bytes().split(b"\r\n")
    lines[1] = b"this line is not a video and a label"
    f.write_bytes(b"\r\n".join(lines))
    p = convert("ucf101", src / "UCF-101", lists, out)
    print(p.stderr.strip())
    assert p.returncode == 2
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "trainlist01.txt:2:" in err[0], p.stderr
    assert _snapshot(out) == before
