"""jobs/class.sbatch under a real (throwaway, single-node) SLURM: an array of two seats.

Uses the harness and helpers of tests/test_slurm.py (it skips, saying why, where SLURM or
root is missing). The job runs in a copy of the repository, so its runs/ and data/ stay
out of the checkout.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_slurm import ENV, slurm, submit, wait_job  # noqa: F401 (slurm: a fixture)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("class")
    for d in ("ssmpi", "data_prep", "labs", "jobs"):
        shutil.copytree(REPO / d, ws / d, ignore=shutil.ignore_patterns("__pycache__",
                                                                        "answers"))
    subprocess.run([sys.executable, "-m", "data_prep.synthetic", "motion",
                    str(ws / "data" / "direction"), "--size", "16", "--classes", "2",
                    "--speeds", "2", "--square", "8", "--frames", "12", "--videos", "24",
                    "--test-videos", "8", "--quiet"], check=True, timeout=120,
                   env=dict(ENV, PYTHONPATH=str(REPO)))
    return ws


@pytest.mark.timeout(240)
def test_class_array_two_seats_with_srun(slurm, workspace):  # noqa: F811
    env = dict(slurm, PYTHONPATH=str(workspace), SSMPI_HOME=str(workspace))  # not the checkout
    job, log = submit(env, workspace / "jobs" / "class.sbatch", "grid", "--set",
                      "run.iterations=3", "--set", "run.eval_batches=1", sbatch="--array=1-2")
    st = wait_job(env, job, 200)
    logs = "".join(p.read_text() for p in log.parent.glob(f"class-srun-{job}*.out"))
    assert len(st) == 2 and all(s[:2] == ("COMPLETED", "0:0") for s in st.values()), \
        f"{st}\n{logs[-3000:]}"
    for seat in (1, 2):
        grid = workspace / "runs" / f"seat-{seat}" / "lab2-grid" / "grid.txt"
        text = grid.read_text()
        assert "3 ranks per pipeline" in text and "the measured grid equals the plan" in text
