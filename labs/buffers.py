"""Lab 5: break double buffering and watch the invariant tests catch it.

``labs/patches/single_buffer.patch`` gives every channel of the transport one buffer
instead of two (``cur`` = ``nxt``): the messages of step t then land in the buffer that
step t is reading. The checker runs the test the student names against a patched copy of
the code (it must fail there), checks the student's reading of the measured grid, and
checks that the student's own tree is repaired.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

from .common import ROOT, Verdict, answered, load_answers

TITLE = "Break double buffering (a provided patch) and watch the invariant tests catch it"
PATCH = ROOT / "labs" / "patches" / "single_buffer.patch"
WHY = "c"
U2_FRAME = 3

TEMPLATE = """\
# Lab 5: one buffer per channel instead of two.
# a test (pytest node id) that FAILS with the patch applied, e.g.
# "tests/test_something.py::test_name" or "tests/test_something.py::test_name[param]"
caught_by = "?"

# with the patch, on ONE rank (every channel a local copy): the frame on U2's direct input
# at step 3 (read it in the grid.txt of your patched run; the plan says 2)
u2_frame_at_step_3 = "?"

# tests/test_engine.py::test_constant_video_equals_backprop still passes with the patch.
# Why? (one letter)
#  a: it runs on one rank, where the transport is not used
#  b: it checks the forward pass only
#  c: every frame of its video is the same, so reading frame t instead of t-1 changes nothing
#  d: it uses float64
why_constant_video_passes = "?"
"""


def patch_applied(root: Path = ROOT) -> bool:
    """Is the lab's patch applied in ``root`` (it can be reverted)?"""
    p = subprocess.run(["git", "apply", "--check", "-R", str(PATCH)], cwd=root,
                       capture_output=True, text=True, timeout=60)
    return p.returncode == 0


def patched_copy(dest: Path, root: Path = ROOT) -> Path:
    """A copy of the code and tests in ``dest`` with the patch applied."""
    for d in ("ssmpi", "tests", "data_prep"):
        shutil.copytree(root / d, dest / d, ignore=shutil.ignore_patterns(
            "__pycache__", "*.pyc"))
    for f in ("setup.cfg", "ruff.toml"):
        if (root / f).is_file():
            shutil.copy(root / f, dest / f)
    if patch_applied(dest):
        return dest  # the student's tree was patched: the copy already is
    p = subprocess.run(["git", "apply", str(PATCH)], cwd=dest, capture_output=True,
                       text=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"the lab's patch does not apply to this code any more: "
                           f"{p.stderr.strip()}")
    return dest


def run_test(node: str, code: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one pytest node id with the code in ``code`` (MPI tests under mpiexec -n 2)."""
    env = dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    pytest = ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", node]
    if node.split("::")[0].endswith("_mpi.py"):
        cmd = ["mpiexec", "-n", "2", sys.executable, "-m", "mpi4py"] + pytest + [
            "--with-mpi", "-m", "mpi"]
    else:
        cmd = [sys.executable] + pytest
    return subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True,
                          timeout=timeout)


@lru_cache(maxsize=8)
def fails_with_patch(node: str) -> int:
    """pytest's exit code for ``node`` on a patched copy of the code (1: it failed)."""
    with tempfile.TemporaryDirectory() as d:
        return run_test(node, patched_copy(Path(d))).returncode


def check(answer: Path, base: Path) -> Verdict:
    v = Verdict()
    ans = load_answers(answer)
    if shutil.which("git") is None:
        v.note("git is not installed: cannot apply the patch")
        v.wrong.append("this lab needs git (git apply)")
        return v
    v.need(not patch_applied(), "the patch is still applied to your tree: revert it with "
           "git apply -R labs/patches/single_buffer.patch")
    frame = answered(v, ans, "u2_frame_at_step_3", int)
    if frame is not None:
        v.need(frame == U2_FRAME, f"u2_frame_at_step_3 = {frame} is not what the patched "
               "code does (record a 1-rank run with the patch: grid.txt)")
    why = answered(v, ans, "why_constant_video_passes", str)
    if why is not None:
        v.need(why.strip().lower() == WHY, f"why_constant_video_passes = {why!r} is not the "
               "reason")
    node = answered(v, ans, "caught_by", str)
    if node is not None:
        m = re.match(r"^tests/test_[\w]+\.py(::[\w]+(\[[^\]]+\])?)?$", node.strip())
        if not v.need(bool(m), f"caught_by = {node!r}: expected a pytest node id like "
                      "tests/test_x.py::test_y[param]"):
            return v
        if not v.need((ROOT / node.split("::")[0]).is_file(),
                      f"caught_by: {node.split('::')[0]} does not exist"):
            return v
        try:
            rc = fails_with_patch(node.strip())
        except RuntimeError as e:
            v.wrong.append(str(e))
            return v
        except subprocess.TimeoutExpired:
            v.wrong.append(f"caught_by: {node} did not finish within 300 s with the patch")
            return v
        if rc in (4, 5):  # pytest: usage error (no such node), no tests collected
            v.wrong.append(f"caught_by: pytest found no test {node}")
        elif v.need(rc != 0, f"caught_by: {node} passes with the patch applied: it "
                    "does not catch the bug"):
            v.note(f"with the patch: {node} fails, as it should")
    return v
