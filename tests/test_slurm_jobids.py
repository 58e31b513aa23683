"""Stale MPICH segments cannot hang the throwaway SLURM's jobs (issue 17).

MPICH under `srun --mpi=pmi2` names its shared-memory segment after the job step
(/dev/shm/mpich_shm_<FNV-1a of "JOBID.STEPID">_<node>). A rank killed with SIGKILL leaves it
behind, and a later step with the same ids spins in MPI_Init until its time limit. The
harness (tests/slurm/slurm-local.sh) therefore starts every instance at job ids that no
earlier instance on the machine used, and its `down` removes the segments of its own steps.

Here: SLURM A runs an srun MPICH job, the test kills it with SIGKILL and sees its segment
stay; A's `down` removes exactly that segment. Then the machine is made to look like one
where an earlier teardown never ran: a copy of the real stale segment under A's ids and
under the ids 1 and 2 (what killed jobs of the old harness left, which broke CI). SLURM B
then runs two srun steps at once, and its ids are not A's.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_slurm import ENV, HARNESS, TERMINAL, _free_port, _why_no_slurm, job_states

SHM = Path("/dev/shm")


def fnv1a(text):
    """32-bit FNV-1a, as MPICH's HASH_FNV hashes the PMI job id."""
    h = 2166136261
    for c in text.encode():
        h = ((h ^ c) * 16777619) & 0xFFFFFFFF
    return h


def segment(job, step, node=0):
    """Where MPICH keeps the shared memory of step JOB.STEP on node NODE."""
    return SHM / f"mpich_shm_{fnv1a(f'{job}.{step}'):x}_{node}"


class Slurm:
    """One throwaway SLURM instance (the harness) in its own folder, on free ports."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="ssmpi-slurm-ids-"))
        self.env = dict(ENV, SLURM_LOCAL_ROOT=str(self.root),
                        SLURM_CONF=str(self.root / "slurm.conf"),
                        SLURM_LOCAL_CTLD_PORT=str(_free_port()),
                        SLURM_LOCAL_D_PORT=str(_free_port()))
        self.log = ""
        self.running = False

    def harness(self, cmd, timeout):
        p = subprocess.run(["bash", str(HARNESS), cmd], env=self.env, capture_output=True,
                           text=True, timeout=timeout)
        self.log += p.stderr
        return p

    def up(self, skip=False):
        """Start; returns the FirstJobId that the harness logged (None if none)."""
        self.running = True
        p = self.harness("up", 60)
        if p.returncode != 0 and skip:  # as tests/test_slurm.py: no SLURM here
            pytest.skip(f"SLURM did not start: {p.stderr[-1500:]}")
        assert p.returncode == 0, f"SLURM did not start:\n{p.stderr[-2000:]}"
        m = re.search(r"FirstJobId=(\d+)", p.stderr)
        return int(m.group(1)) if m else None

    def down(self):
        if self.running:
            self.running = False
            p = self.harness("down", 90)
            assert p.returncode == 0, p.stderr[-2000:]

    def submit(self, name, limit_min, body):
        script = self.root / f"{name}.sbatch"
        script.write_text(f"#!/bin/bash\n#SBATCH -J {name} -n 2 -t {limit_min}\n"
                          f"#SBATCH -o {self.root}/%x-%j.out\n{body}")
        p = subprocess.run(["sbatch", "--parsable", str(script)], env=self.env,
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        job = p.stdout.strip().split(";")[0]
        return job, self.root / f"{name}-{job}.out"

    def wait(self, job, timeout):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            st = job_states(self.env, job)
            if st.get(job, ("",))[0] in TERMINAL:
                return st[job]
            time.sleep(0.2)
        st = job_states(self.env, job)
        subprocess.run(["scancel", job], env=self.env, timeout=30)
        return st.get(job)

    def cleanup(self):
        try:
            self.down()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def srun(code):
    return f'srun -n 2 --mpi=pmi2 {sys.executable} -c "{code}"\n'


SLEEPER = srun("from mpi4py import MPI; import time; c = MPI.COMM_WORLD; c.Barrier(); "
               "print('rank', c.rank, 'in MPI', flush=True); time.sleep(120)")
HELLO = srun("from mpi4py import MPI; c = MPI.COMM_WORLD; c.Barrier(); "
             "print('rank', c.rank, 'of', c.size, flush=True)")


def create(path, data):
    """Write a new file (never one that exists); returns whether it did."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


@pytest.mark.timeout(180)
def test_second_slurm_runs_srun_jobs_after_a_killed_one():
    why = _why_no_slurm()
    if why:
        pytest.skip(why)
    if not SHM.is_dir():
        pytest.skip("no /dev/shm")
    a, b = Slurm(), Slurm()
    created = []  # the files in /dev/shm that this test made; removed at the end
    try:
        # -- SLURM A: an srun MPICH job killed with SIGKILL leaves its segment ------------
        first_a = a.up(skip=True)
        job_a, out_a = a.submit("sleeper", 2, SLEEPER)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:
            if out_a.exists() and out_a.read_text().count("in MPI") == 2:
                break
            assert job_states(a.env, job_a)[job_a][0] not in TERMINAL, out_a.read_text()
            time.sleep(0.2)
        else:
            pytest.fail(f"job {job_a}: ranks not in MPI after 60 s")
        stale = segment(job_a, 0)
        assert stale.is_file(), (f"no {stale.name} while step {job_a}.0 runs: "
                                 f"{sorted(p.name for p in SHM.glob('mpich_*'))}")
        subprocess.run(["scancel", "--signal=KILL", job_a], env=a.env, check=True, timeout=30)
        st = a.wait(job_a, 30)
        assert st and st[0] in TERMINAL, st
        assert stale.is_file(), "SIGKILL should leave the segment behind"
        data = stale.read_bytes()
        # other programs' segments, which A's down must leave alone: a step A never ran,
        # and a name of the kind MPICH's mpiexec uses (hash of a Hydra KVS name)
        decoys = [segment(job_a, 7), SHM / f"mpich_shm_{fnv1a(f'kvs_{os.getpid()}_0'):x}_0"]
        created += [d for d in decoys if create(d, b"decoy")]
        a.down()
        a_removed_own = not stale.exists()
        a_kept_decoys = all(d.exists() for d in created)

        # -- a machine where an earlier teardown never ran: stale segments ----------------
        for job, step in [(job_a, 0), (job_a, 1), (int(job_a) + 1, 0), (1, 0), (2, 0)]:
            path = segment(job, step)
            if create(path, data):
                created.append(path)

        # -- SLURM B: its srun steps run, at job ids no earlier instance used -------------
        first_b = b.up()
        t0 = time.monotonic()
        job_b, out_b = b.submit("hello", 1, HELLO + HELLO)
        st = b.wait(job_b, 45)
        text = out_b.read_text() if out_b.exists() else ""
        assert st and st[:2] == ("COMPLETED", "0:0"), (
            f"job {job_b} of the second SLURM: {st} after {time.monotonic() - t0:.0f} s "
            f"(stale segments: {[p.name for p in created]})\n{text[-2000:]}")
        assert sorted(re.findall(r"rank (\d) of 2", text)) == ["0", "0", "1", "1"], text
        b.down()

        assert first_a is not None and first_b is not None, a.log + b.log
        assert int(job_a) == first_a and int(job_b) == first_b, (job_a, job_b, a.log, b.log)
        assert first_a >= 1000 and first_b >= first_a + 1000, (first_a, first_b)
        assert "FirstJobId=" in a.log and "no earlier instance" in a.log, a.log
        assert a_removed_own, f"A's down left {stale.name} of its killed step\n{a.log}"
        assert f"{stale.name} (step {job_a}.0)" in a.log, a.log
        assert a_kept_decoys, f"A's down removed a file not of its steps\n{a.log}"
        # B's down removes nothing: none of its steps was killed, none of these is B's
        assert "removed" not in b.log, b.log
        assert all(p.exists() for p in created), b.log
        assert not any(segment(job_b, s).exists() for s in (0, 1))
    finally:
        for s in (a, b):
            s.cleanup()
        for p in created:
            p.unlink(missing_ok=True)
