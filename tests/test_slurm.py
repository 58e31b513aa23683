"""The job scripts of jobs/ against a real (throwaway, single-node) SLURM.

The harness tests/slurm/slurm-local.sh starts slurmctld + slurmd (auth/none, 8 CPUs) for
this module and always brings them down. Install SLURM first (CI: tests/slurm/ci_setup.sh);
without it, or without root, these tests skip and say why. The static checks at the end
need no SLURM. Each instance numbers its jobs from fresh ids, so MPICH segments that killed
jobs of earlier runs left in /dev/shm cannot hang these jobs (tests/test_slurm_jobids.py).
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from train_helpers import make_motion

from ssmpi import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
HARNESS = REPO / "tests" / "slurm" / "slurm-local.sh"
FIXTURES = REPO / ".." / "shared" / "fixtures"
ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
ITERS = 150  # ~10 s with 8 ranks on 2 cores: long enough to signal mid-run
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _why_no_slurm():
    if os.name != "posix" or os.geteuid() != 0:
        return "the throwaway SLURM needs root (slurmd runs jobs as any user)"
    for exe in ("/usr/sbin/slurmctld", "/usr/sbin/slurmd"):
        if not os.access(exe, os.X_OK):
            return f"{exe} is not installed (run: bash tests/slurm/ci_setup.sh)"
    for exe in ("sbatch", "scontrol", "srun", "mpiexec"):
        if shutil.which(exe) is None:
            return f"{exe} is not on PATH (run: bash tests/slurm/ci_setup.sh)"
    return None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm():
    """A running SLURM for this module: the environment its client commands need."""
    why = _why_no_slurm()
    if why:
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="ssmpi-slurm-"))
    env = dict(ENV, SLURM_LOCAL_ROOT=str(root), SLURM_CONF=str(root / "slurm.conf"),
               SLURM_LOCAL_CTLD_PORT=str(_free_port()), SLURM_LOCAL_D_PORT=str(_free_port()))
    try:
        try:
            up = subprocess.run(["bash", str(HARNESS), "up"], env=env, capture_output=True,
                                text=True, timeout=60)
        except subprocess.TimeoutExpired:
            up = None
        if up is None or up.returncode != 0:
            tail = (up.stderr[-1500:] if up is not None else "timed out after 60 s")
            pytest.skip(f"SLURM did not start: {tail}")
        env["SLURM_TEST_ROOT"] = str(root)
        yield env
    finally:
        subprocess.run(["bash", str(HARNESS), "down"], env=env, capture_output=True,
                       timeout=90)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def motion(tmp_path_factory):
    return make_motion(tmp_path_factory.mktemp("motion"), env=ENV)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory, motion):
    """A small 8-unit config (8 ranks) in a file, as a user would write one."""
    d = tmp_path_factory.mktemp("cfg")
    cfg = d / "tiny.toml"
    cfg.write_text(f"""about = "SLURM test: tiny 8-unit model on synthetic motion"
[run]
name = "tiny"
out_dir = "{d / 'runs'}"
iterations = {ITERS}
log_every = 1
progress = false
[model]
name = "tiny"
units = 8
width = 4
[engine]
mode = "skip"
[data]
root = "{motion}"
batch_size = 4
clip_len = 8
[optim]
lr = 1e-3
""")
    return cfg


def submit(env, script, *args, launcher="srun", sbatch=""):
    """jobs/submit.sh with test settings; returns (job id, path of the job's output)."""
    out = Path(env["SLURM_TEST_ROOT"]) / f"{Path(script).stem}-{launcher}-%j.out"
    e = dict(env, PARTITION="debug", CPU_PARTITION="debug", TIME="10", DATA_TIME="10",
             SIGNAL_LEAD="30", SSMPI_LAUNCHER=launcher, SSMPI_PYTHON=sys.executable,
             EXTRA_SBATCH=f"--parsable --cpus-per-task=1 --output={out} {sbatch}")
    p = subprocess.run(["bash", str(JOBS / "submit.sh"), str(JOBS / script), *map(str, args)],
                       env=e, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip().split(";")[0]
    assert job.isdigit(), p.stdout
    return job, Path(str(out).replace("%j", job))


def job_states(env, job):
    """{job id (array tasks: J_i): (state, exit code, restarts)}."""
    p = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True,
                       text=True, timeout=30)
    out = {}
    for line in p.stdout.splitlines():
        f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        jid = f.get("JobId", "?")
        if f.get("ArrayTaskId"):
            jid = f"{f['ArrayJobId']}_{f['ArrayTaskId']}"
        out[jid] = (f.get("JobState"), f.get("ExitCode"), int(f.get("Restarts", 0)))
    return out


def wait_job(env, job, timeout, log=None):
    """Wait until every task of the job is in a terminal state; returns job_states()."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = job_states(env, job)
        if st and all(s[0] in TERMINAL for s in st.values()):
            return st
        time.sleep(0.3)
    subprocess.run(["scancel", job], env=env, timeout=30)
    text = log.read_text()[-3000:] if log is not None and log.exists() else ""
    pytest.fail(f"job {job} not finished after {timeout} s: {job_states(env, job)}\n{text}")


def metrics(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "loss" in m and "iteration" in m], lines[-1]


def params(run_dir):
    path, _ = ckpt.latest_checkpoint(run_dir)
    return ckpt.read_parameters(path)


def assert_same_params(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for u in pa:
        for k in pa[u]:
            assert np.array_equal(pa[u][k], pb[u][k]), (u, k)


def run_dir(cfg, name):
    return cfg.parent / "runs" / name


@pytest.fixture(scope="module")
def reference(slurm, tiny_config):
    """An uninterrupted job: jobs/train_cpu.sbatch, srun --mpi=pmi2, 8 ranks."""
    job, log = submit(slurm, "train_cpu.sbatch", tiny_config, "--set", "run.name=ref")
    st = wait_job(slurm, job, 120, log)
    return job, st, log, run_dir(tiny_config, "ref")


@pytest.mark.timeout(150)
def test_training_job_srun(reference):
    job, st, log, rd = reference
    text = log.read_text()
    assert st[job][:2] == ("COMPLETED", "0:0"), text[-3000:]
    assert "8 ranks via srun" in text and f"done: {ITERS} iterations" in text, text[-3000:]
    train, final = metrics(rd)
    assert [m["iteration"] for m in train] == list(range(1, ITERS + 1))
    assert all(np.isfinite(m["loss"]) for m in train)
    assert set(train[0]["units"]) == {str(u) for u in range(1, 9)}
    assert final["final"] and 0 <= final["eval"]["clip_acc"] <= 1
    assert final["eval"]["videos"] == 16


@pytest.mark.timeout(150)
def test_training_job_mpiexec_same_parameters(slurm, tiny_config, reference):
    job, log = submit(slurm, "train_cpu.sbatch", tiny_config, "--set", "run.name=mpx",
                      launcher="mpiexec")
    st = wait_job(slurm, job, 120, log)
    text = log.read_text()
    assert st[job][:2] == ("COMPLETED", "0:0"), text[-3000:]
    assert "8 ranks via mpiexec" in text, text[-3000:]
    train, final = metrics(run_dir(tiny_config, "mpx"))
    assert [m["iteration"] for m in train] == list(range(1, ITERS + 1))
    assert final["final"]
    assert_same_params(reference[3], run_dir(tiny_config, "mpx"))


@pytest.mark.timeout(200)
@pytest.mark.parametrize("launcher,target", [
    ("srun", "batch"),     # --signal=B:USR1@N: the batch shell forwards it to the ranks
    ("mpiexec", "steps"),  # --signal=USR1@N: SLURM signals the ranks directly
])
def test_usr1_checkpoints_requeues_and_resumes(slurm, tiny_config, reference, launcher,
                                                target):
    name = f"sig-{launcher}"
    rd = run_dir(tiny_config, name)
    job, log = submit(slurm, "train_cpu.sbatch", tiny_config, "--set", f"run.name={name}",
                      launcher=launcher)
    t0 = time.monotonic()
    mfile = rd / "metrics.jsonl"
    while time.monotonic() - t0 < 90:  # signal mid-run, after a few iterations
        if mfile.exists() and len(mfile.read_text().splitlines()) >= 5:
            break
        assert job_states(slurm, job)[job][0] not in TERMINAL, log.read_text()[-3000:]
        time.sleep(0.1)
    else:
        pytest.fail(f"no metrics after 90 s\n{log.read_text()[-3000:]}")
    who = ["--batch"] if target == "batch" else []
    subprocess.run(["scancel", "--signal=USR1", *who, job], env=slurm, check=True, timeout=30)
    st = wait_job(slurm, job, 150, log)
    text = log.read_text()
    assert st[job] == ("COMPLETED", "0:0", 1), text[-4000:]  # exactly one requeue
    m = re.search(r"stopped by signal at iteration (\d+)", text)
    assert m, text[-4000:]
    n = int(m.group(1))
    assert 5 <= n < ITERS, "the job was not stopped mid-run"
    assert f"scontrol requeue {job}" in text
    assert f"job {job} restart 1 on" in text and "--resume" in text
    assert f"resumed from {rd}/checkpoints/ckpt-{n:08d} (iteration {n})" in text, text[-4000:]
    assert f"done: {ITERS - n} iterations" in text, text[-4000:]
    assert (rd / "checkpoints" / f"ckpt-{n:08d}" / "manifest.json").is_file()
    train, final = metrics(rd)
    assert [m["iteration"] for m in train] == list(range(1, ITERS + 1))
    assert final["final"]
    # reset mode, same seed: stopping and resuming changes nothing, bit for bit
    assert_same_params(reference[3], rd)


@pytest.mark.timeout(150)
def test_ablation_array_job(slurm, tiny_config):
    """Two tasks of the grid (k=2 concat, k=2 add) on the tiny config; the GPU script on
    a cluster without GPUs (--gpus-per-task=0)."""
    job, log = submit(slurm, "ablation_grid.sbatch", "--set", "run.iterations=6",
                      sbatch="--array=0-1 --gpus-per-task=0 "
                      f"--export=ALL,ABLATION_CONFIG={tiny_config}")
    st = wait_job(slurm, job, 120)
    assert set(st) == {f"{job}_0", f"{job}_1"}, st
    assert all(s[:2] == ("COMPLETED", "0:0") for s in st.values()), st
    for fuse in ("concat", "add"):
        rd = run_dir(tiny_config, f"tiny_k2_{fuse}")
        train, final = metrics(rd)
        assert [m["iteration"] for m in train] == list(range(1, 7)) and final["final"]
        assert f'fuse = "{fuse}"' in (rd / "config.toml").read_text()


@pytest.mark.timeout(150)
def test_data_prep_job_on_the_hmdb51_fixture(slurm, tmp_path):
    src = FIXTURES / "datasets" / "hmdb51_mini"
    if not src.is_dir():
        pytest.skip(f"no fixtures at {FIXTURES.resolve()}")
    out = tmp_path / "hmdb"
    job, log = submit(slurm, "data_prep.sbatch", "hmdb51", src / "hmdb51_org",
                      src / "testTrainMulti_7030_splits", out, "--shards", "1",
                      "--short-side", "32", sbatch="--cpus-per-task=2")
    st = wait_job(slurm, job, 120, log)
    text = log.read_text()
    assert st[job][:2] == ("COMPLETED", "0:0"), text[-3000:]
    assert (out / "manifest.json").is_file() and "data_prep finished" in text
    skipped = (out / "skipped-train.tsv").read_text()
    assert "Broken_wave_f_nm_np1_ba_bad_1.avi" in skipped, skipped


# -- static checks of the job scripts (no SLURM needed) ---------------------------------
SCRIPTS = sorted(JOBS.glob("*.sbatch")) + sorted(JOBS.glob("*.sh"))


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_job_script_syntax_and_header(path):
    p = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    text = path.read_text()
    if path.suffix == ".sbatch":
        lines = text.splitlines()
        assert lines[0] == "#!/bin/bash"
        assert lines[1].startswith("# Submit (from the repository root):"), lines[1]
        assert f"jobs/submit.sh jobs/{path.name}" in "\n".join(lines[1:4])
        directives = [ln for ln in lines if ln.startswith("#SBATCH")]
        for opt in ("--partition", "-p ", "--account", "-A ", "--time", "-t "):
            assert not any(opt in d for d in directives), f"{path.name}: {opt} hard-coded"
        assert "set -euo pipefail" in text
        if path.name not in ("data_prep.sbatch", "class.sbatch"):  # class: short labs, no
            assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text  # requeue
            ranks = 4 if path.name.startswith("motion32_") else 8  # the probe model: 4 units
            assert f"#SBATCH --ntasks-per-node={ranks}" in text
            if "_cpu" not in path.name:
                assert "#SBATCH --gpus-per-task=1" in text
    else:
        assert "set -euo pipefail" in text or path.name in ("lib.sh", "site.sh")


def test_every_config_has_a_job_script():
    for cfg in sorted((JOBS / "configs").glob("*.toml")):
        script = JOBS / f"{cfg.stem}.sbatch"
        assert script.is_file(), f"no jobs/{script.name} for {cfg.name}"
        assert f"ssmpi_train jobs/configs/{cfg.name} " in script.read_text()


def test_ablation_grid_matches_the_array():
    text = (JOBS / "ablation_grid.sbatch").read_text()
    ks = re.search(r"^KS=\((.*)\)$", text, re.M).group(1).split()
    fuses = re.search(r"^FUSES=\((.*)\)$", text, re.M).group(1).split()
    assert f"#SBATCH --array=0-{len(ks) * len(fuses) - 1}\n" in text
