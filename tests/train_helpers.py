"""Helpers for tests that run the trainer under a real mpiexec."""

import os
import subprocess
import sys

ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
TRAIN = [sys.executable, "-m", "ssmpi.train"]


def make_motion(root, env=ENV):
    """A small synthetic motion dataset (48 train / 16 test videos of 10 frames, 16x16)."""
    subprocess.run([sys.executable, "-m", "data_prep.synthetic", "motion", str(root), "--size",
                    "16", "--videos", "48", "--test-videos", "16", "--frames", "10",
                    "--shards", "2", "--quiet"], check=True, env=env, timeout=120)
    return root


def base_args(root, out, name, *extra):
    """Trainer options for a tiny, fast 4-unit run on ``root``, written to ``out/name``."""
    return ["--set", f"data.root={root}", "--set", f"run.out_dir={out}", "--set",
            f"run.name={name}", "--set", "model.name=tiny", "--set", "model.units=4", "--set",
            "model.width=4", "--set", "data.batch_size=4", "--set", "data.clip_len=8",
            "--set", "run.progress=false", "--set", "optim.lr=1e-3", *extra]


def run_train(n, args, timeout=120, env=ENV, **kw):
    """``mpiexec -n n python -m ssmpi.train args`` with captured output."""
    return subprocess.run(["mpiexec", "-n", str(n), *TRAIN, *args], capture_output=True,
                          text=True, timeout=timeout, env=env, **kw)


def program_lines(stderr: str):
    """The non-empty lines of ``stderr`` that the program wrote, without the launcher's own
    report of a non-zero exit (Open MPI's prterun prints a dashed block, and sometimes a
    ``PMIX ERROR`` line or a libevent ``[warn] Epoll MOD(4) on fd N failed`` line when a rank
    exits while its socket is still registered, whatever the program said; MPICH's mpiexec
    prints nothing). The program itself never writes either marker."""
    out, in_block = [], False
    for ln in stderr.splitlines():
        if ln.startswith("-----"):
            in_block = not in_block
            continue
        if in_block or not ln.strip() or "PMIX ERROR" in ln or ln.startswith("[warn] "):
            continue
        out.append(ln)
    return out
