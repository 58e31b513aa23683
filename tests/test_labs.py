"""Every lab's check accepts a right answer (exit 0) and rejects a wrong one (exit 1).

The right answers here are written by hand (the provenance tables, the grid counts, the
multiple-choice letters), or, where a lab asks about the student's own runs, computed from
run folders built here the way the trainer writes them (config.toml from ssmpi.config,
metrics.jsonl lines, Chrome-trace events, grid.txt from the plan). The real commands of the
labs run in tests/test_tutorial.py; lab 5's patch is applied for real below.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # labs/ is run from the repository root, not installed

from labs import buffers, check  # noqa: E402
from ssmpi.config import load_config  # noqa: E402

PROVENANCE_RIGHT = """\
frames
unit\\t 1   2   3   4   5   6   7   8   9
U5     .   .   .   .  1-3 2-4 3-5 4-6 5-7
U4     .   .   .  1-3 2-4 3-5 4-6 5-7 6-8
U3     .   .  1-2 2-3 3-4 4-5 5-6 6-7 7-8
U2     .   1   2   3   4   5   6   7   8
U1     1   2   3   4   5   6   7   8   9
loss
U5     .   .   .   .   5   6   7   8   9
U4     .   .   .   .   .   5   6   7   8
U3     .   .   .   .   .   .   5   6   7
U2     .   .   .   .   .   .   .   5   6
U1     .   .   .   .   .   .   .   .   5
"""


def run_check(lab, answer, cwd, capsys):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        rc = check.main([lab, str(answer)])
    finally:
        os.chdir(old)
    return rc, capsys.readouterr().out


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def make_run(root: Path, name: str, config: str, sets=(), metrics=(), events=(),
             grid: str = None) -> Path:
    """A run folder as ssmpi.train writes it: resolved config.toml, metrics.jsonl,
    trace.json (Chrome events: (rank, cat, start ms, duration ms)), grid.txt."""
    run = root / "runs" / name
    run.mkdir(parents=True)
    cfg = load_config(str(ROOT / config), [f"run.name={name}", *sets])
    (run / "config.toml").write_text(cfg.to_toml())
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if events:
        ev = [{"name": "x", "cat": c, "ph": "X", "pid": 0, "tid": r, "ts": t * 1e3,
               "dur": d * 1e3, "args": {"step": 1}} for r, c, t, d in events]
        (run / "trace.json").write_text(json.dumps({"traceEvents": ev}))
    if grid is not None:
        (run / "grid.txt").write_text(grid)
    return run


def test_list_and_templates(capsys):
    assert check.main(["--list"]) == 0
    assert len(check.LABS) >= 6
    for name in check.LABS:
        assert check.main([name, "--template"]) == 0
        assert "?" in capsys.readouterr().out


def test_unreadable_answers_exit_2(tmp_path, capsys):
    assert run_check("waiting", tmp_path / "missing.toml", tmp_path, capsys)[0] == 2
    bad = write(tmp_path / "bad.toml", "faster = \n")
    assert run_check("waiting", bad, tmp_path, capsys)[0] == 2
    short = write(tmp_path / "p.txt", "frames\nU5 . .\n")
    assert run_check("provenance", short, tmp_path, capsys)[0] == 2


def test_blank_templates_are_not_right(tmp_path, capsys):
    for name in check.LABS:
        f = tmp_path / name
        assert check.main([name, "--template"]) == 0
        f.write_text(capsys.readouterr().out)
        rc, out = run_check(name, f, tmp_path, capsys)
        assert rc == 1 and "NOT YET" in out, (name, out)


# -- lab 1 ------------------------------------------------------------------------------------
def test_provenance(tmp_path, capsys):
    right = write(tmp_path / "right.txt", PROVENANCE_RIGHT)
    assert run_check("provenance", right, tmp_path, capsys)[0] == 0
    # the same with the plan's notation ("5(1)", "1,2,3") is also right
    alt = PROVENANCE_RIGHT.replace("  5   6   7   8   9\n", "  5(1) 6(2) 7(3) 8(4) 9(5)\n") \
        .replace("1-3 2-4 3-5 4-6 5-7\nU4", "1,2,3 2-4 3-5 4-6 5-7\nU4")
    assert alt != PROVENANCE_RIGHT
    assert run_check("provenance", write(tmp_path / "alt.txt", alt), tmp_path, capsys)[0] == 0
    # Sideways' answer (one frame per unit) is wrong for Skip-Sideways, and says where
    wrong = PROVENANCE_RIGHT.replace("1-3 2-4 3-5 4-6 5-7 6-8", "1 2 3 4 5 6")
    rc, out = run_check("provenance", write(tmp_path / "w.txt", wrong), tmp_path, capsys)
    assert rc == 1 and "U4 t=4 (1)" in out and "6 of 45" in out
    assert "1-3" not in out.split("U4 t=4")[1][:40]  # it names the cell, not the answer
    # the loss steps of Sideways' closed form shifted by one: wrong
    wrong = PROVENANCE_RIGHT.replace("U1     .   .   .   .   .   .   .   .   5",
                                     "U1     .   .   .   .   .   .   .   5   6")
    assert run_check("provenance", write(tmp_path / "w2.txt", wrong), tmp_path, capsys)[0] == 1


# -- lab 2 ------------------------------------------------------------------------------------
def grid_text(measured_equals_plan=True, ranks=3):
    from ssmpi.engine import plan
    from ssmpi.engine.topology import Placement, Topology

    topo = Topology(plan.chain_spec(6), mode="skip", k=2)
    pl = Placement(6, ranks)
    text = plan.render_grid(topo, pl, 12, 12, title=f"measured: iteration 2 of lab2-grid, "
                            f"{ranks} ranks ({pl.describe()})")
    return text + ("\n\nthe measured grid equals the plan (python -m ssmpi.plan)\n"
                   if measured_equals_plan else "\n\nTHE MEASURED GRID DIFFERS FROM THE PLAN:\n")


def test_grid(tmp_path, capsys):
    make_run(tmp_path, "lab2-grid", "labs/configs/grid.toml", grid=grid_text())
    make_run(tmp_path, "lab2-differs", "labs/configs/grid.toml", grid=grid_text(False))
    make_run(tmp_path, "lab2-2ranks", "labs/configs/grid.toml", grid=grid_text(ranks=2))
    right = ('first_vjp_step = [10, 8, 6]\nmpi_messages_per_step = 12\n'
             'valid_mpi_messages_after_step_6 = 7\nrun = "runs/lab2-grid"\n')
    assert run_check("grid", write(tmp_path / "a.toml", right), tmp_path, capsys)[0] == 0
    for old, new in [("[10, 8, 6]", "[11, 9, 6]"),  # U_l's first gradient at 2L-l-... off by one
                     ("= 12", "= 6"),  # one channel per edge
                     ("= 7", "= 12"),  # invalid messages counted as valid
                     ("lab2-grid", "lab2-differs"), ("lab2-grid", "lab2-2ranks")]:
        rc, out = run_check("grid", write(tmp_path / "b.toml", right.replace(old, new)),
                            tmp_path, capsys)
        assert rc == 1, (old, new, out)


# -- lab 3 ------------------------------------------------------------------------------------
def test_placement(tmp_path, capsys):
    cfg = "labs/configs/placement.toml"
    # contiguous: rank 0 computes most; balanced: more even
    # the numbers of a real pair of runs (docs/INSTRUCTOR.md, lab 3)
    make_run(tmp_path, "lab3-contiguous", cfg, events=[
        (0, "compute", 0, 285), (1, "compute", 0, 276), (2, "compute", 0, 98),
        (3, "compute", 0, 7), (2, "wait", 98, 187), (3, "wait", 7, 278)])
    make_run(tmp_path, "lab3-balanced", cfg, ["engine.placement=balanced"], events=[
        (0, "compute", 0, 216), (1, "compute", 0, 180), (2, "compute", 0, 94),
        (3, "compute", 0, 141)])
    make_run(tmp_path, "lab3-worse", cfg, ["engine.placement=balanced"], events=[
        (0, "compute", 0, 561), (1, "compute", 0, 230), (2, "compute", 0, 60),
        (3, "compute", 0, 10)])
    make_run(tmp_path, "lab3-other", cfg, ["engine.placement=balanced", "engine.k=3"],
             events=[(0, "compute", 0, 216), (1, "compute", 0, 180), (2, "compute", 0, 94),
                     (3, "compute", 0, 141)])
    right = ('slowest_rank = 0\nslowest_units = [1, 2]\n'
             'contiguous_run = "runs/lab3-contiguous"\nbalanced_run = "runs/lab3-balanced"\n')
    assert run_check("placement", write(tmp_path / "a.toml", right), tmp_path, capsys)[0] == 0
    for old, new in [("slowest_rank = 0", "slowest_rank = 3"),  # the rank that waits most
                     ("[1, 2]", "[3, 4]"),
                     ("lab3-balanced", "lab3-worse"),  # not more even
                     ("lab3-balanced", "lab3-other"),  # another model
                     ("lab3-balanced", "lab3-contiguous")]:  # not balanced
        rc, out = run_check("placement", write(tmp_path / "b.toml", right.replace(old, new)),
                            tmp_path, capsys)
        assert rc == 1, (old, new, out)


# -- lab 4 ------------------------------------------------------------------------------------
def test_waiting(tmp_path, capsys):
    cfg = "labs/configs/waiting.toml"
    fin = lambda fps: [{"iteration": 1, "loss": 0.7}, {"final": True, "frames_per_s": fps,
                                                        "eval": {"clip_acc": 0.5}}]
    make_run(tmp_path, "lab4-poll", cfg, metrics=fin(422.0))
    make_run(tmp_path, "lab4-block", cfg, ["engine.wait_mode=block"], metrics=fin(222.0))
    make_run(tmp_path, "lab4-block-b16", cfg, ["engine.wait_mode=block", "data.batch_size=16"],
             metrics=fin(222.0))
    right = ('poll_run = "runs/lab4-poll"\nblock_run = "runs/lab4-block"\nfaster = "poll"\n'
             'speedup = 1.9\nwhy = "b"\n')
    assert run_check("waiting", write(tmp_path / "a.toml", right), tmp_path, capsys)[0] == 0
    for old, new in [('faster = "poll"', 'faster = "block"'), ("1.9", "1.2"),
                     ('why = "b"', 'why = "a"'), ("lab4-block\"", "lab4-block-b16\""),
                     ('block_run = "runs/lab4-block"', 'block_run = "runs/lab4-poll"')]:
        rc, out = run_check("waiting", write(tmp_path / "b.toml", right.replace(old, new)),
                            tmp_path, capsys)
        assert rc == 1, (old, new, out)


# -- lab 5 ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def patched(tmp_path_factory):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    return buffers.patched_copy(tmp_path_factory.mktemp("patched"))


def test_the_patch_applies_and_is_not_applied_here(patched):
    assert not buffers.patch_applied(ROOT)
    assert buffers.patch_applied(patched)
    assert "ch.cur = ch.nxt" in (patched / "ssmpi" / "engine" / "transport.py").read_text()


@pytest.mark.timeout(120)
def test_patched_code_reads_frame_t_at_step_t(patched):
    """The checker's u2_frame_at_step_3: on one rank with one buffer per channel, U2 reads
    the frame that U1 sent in the same step."""
    code = (
        "import numpy as np\n"
        "from mpi4py import MPI\n"
        "from engine_helpers import make_engine\n"
        "eng = make_engine(MPI.COMM_SELF, L=4, record='headers')\n"
        "eng.run_clip(6, np.zeros((2, 6, 8, 8, 3), np.float32), np.array([0, 1]))\n"
        "print({(r.l, r.t): r.frame for r in eng.records}[(2, 3)])\n")
    for code_dir, frame in ((patched, buffers.U2_FRAME), (ROOT, 2)):  # unpatched: t-1 = 2
        env = dict(os.environ, PYTHONPATH=f"{code_dir}{os.pathsep}{code_dir / 'tests'}")
        out = subprocess.run([sys.executable, "-c", code], cwd=code_dir, env=env,
                             capture_output=True, text=True, timeout=100, check=True).stdout
        assert int(out.strip()) == frame == (3 if code_dir == patched else 2)


@pytest.mark.timeout(300)
def test_buffers(tmp_path, capsys):
    right = ('caught_by = "tests/test_engine.py::test_first_valid_gradient_at_2L_minus_l'
             '[sideways]"\nu2_frame_at_step_3 = 3\nwhy_constant_video_passes = "c"\n')
    assert run_check("buffers", write(tmp_path / "a.toml", right), tmp_path, capsys)[0] == 0
    # the constant-video test does not catch it: naming it is wrong
    wrong = right.replace("test_first_valid_gradient_at_2L_minus_l[sideways]",
                          "test_constant_video_equals_backprop[3-sideways-concat-1]")
    rc, out = run_check("buffers", write(tmp_path / "b.toml", wrong), tmp_path, capsys)
    assert rc == 1 and "does not catch the bug" in out, out
    for old, new in [("= 3", "= 2"), ('"c"', '"a"'),
                     ("[sideways]", "[no-such-param]")]:
        rc, out = run_check("buffers", write(tmp_path / "c.toml", right.replace(old, new)),
                            tmp_path, capsys)
        assert rc == 1, (old, new, out)


# -- lab 6 ------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_memory(tmp_path, capsys):
    """The student's numbers: the tool's table at T = 8 and 24 (the checker measures at 8
    and 32: the slope must not depend on where it is taken)."""
    from labs import memory

    assert memory.main(["--T", "8", "24"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    (_, s8, b8), (_, s64, b64) = rows
    slope = (float(b64) - float(b8)) / 16
    assert abs(float(s64) - float(s8)) < 0.02 * float(s8)  # flat
    assert slope > 0.5  # grows
    right = (f'skip_grows = "no"\nskip_mib_at_32 = {float(s64)}\n'
             f'bptt_mib_per_frame = {slope:.3f}\nwhy = "b"\n')
    assert run_check("memory", write(tmp_path / "a.toml", right), tmp_path, capsys)[0] == 0
    for old, new in [('"no"', '"yes"'), (f"{slope:.3f}", f"{2 * slope:.3f}"),
                     (f"= {float(s64)}", f"= {float(b64)}"), ('"b"', '"d"')]:
        rc, out = run_check("memory", write(tmp_path / "b.toml", right.replace(old, new)),
                            tmp_path, capsys)
        assert rc == 1, (old, new, out)


# -- lab 7 ------------------------------------------------------------------------------------
def test_motion(tmp_path, capsys):
    cfg = "jobs/configs/demo_direction.toml"
    fin = lambda acc: [{"final": True, "frames_per_s": 500.0, "eval": {"clip_acc": acc}}]
    make_run(tmp_path, "demo-sideways", cfg, ["engine.mode=sideways"], metrics=fin(0.502))
    make_run(tmp_path, "demo-skip", cfg, metrics=fin(0.992))
    make_run(tmp_path, "skip-unlearned", cfg, metrics=fin(0.55))
    make_run(tmp_path, "skip-no-input", cfg, ["model.input_unit=false"], metrics=fin(0.992))
    right = ('sideways_run = "runs/demo-sideways"\nskip_run = "runs/demo-skip"\n'
             'top_frames_sideways = "4"\ntop_frames_skip = "4-6"\nwithout_input_unit = "b"\n')
    assert run_check("motion", write(tmp_path / "a.toml", right), tmp_path, capsys)[0] == 0
    alt = right.replace('"4"', "4").replace('"4-6"', '"4,5,6"')
    assert run_check("motion", write(tmp_path / "alt.toml", alt), tmp_path, capsys)[0] == 0
    for old, new in [('"4-6"', '"4"'), ('= "4"\n', '= "8"\n'), ('"b"', '"a"'),
                     ("runs/demo-skip", "runs/skip-unlearned"),
                     ("runs/demo-skip", "runs/skip-no-input"),
                     ('skip_run = "runs/demo-skip"', 'skip_run = "runs/demo-sideways"')]:
        rc, out = run_check("motion", write(tmp_path / "b.toml", right.replace(old, new)),
                            tmp_path, capsys)
        assert rc == 1, (old, new, out)


# -- lab 8 ------------------------------------------------------------------------------------
def test_replicas(tmp_path, capsys):
    cfg = "labs/configs/replicas.toml"
    upd = lambda ranks, ms: [(r, c, t, d) for r in range(ranks) for c, t, d in
                             [("compute", 0, 100), ("update", 100, ms), ("compute", 300, 100),
                              ("update", 400, ms)]]
    make_run(tmp_path, "lab8-r1", cfg, events=upd(2, 0.3))
    make_run(tmp_path, "lab8-r2", cfg, ["engine.replicas=2"], events=upd(4, 40.0))
    make_run(tmp_path, "lab8-r2-lr", cfg, ["engine.replicas=2", "optim.lr=1e-2"],
             events=upd(4, 40.0))
    right = ('single_run = "runs/lab8-r1"\nreplicated_run = "runs/lab8-r2"\n'
             'partner_of_rank_1 = 3\nupdate_ms_single = 0.3\nupdate_ms_replicated = 40\n')
    assert run_check("replicas", write(tmp_path / "a.toml", right), tmp_path, capsys)[0] == 0
    for old, new in [("= 3", "= 2"), ("= 40", "= 0.3"), ("= 0.3\n", "= 40\n"),
                     ('"runs/lab8-r2"', '"runs/lab8-r2-lr"'),
                     ('replicated_run = "runs/lab8-r2"', 'replicated_run = "runs/lab8-r1"')]:
        rc, out = run_check("replicas", write(tmp_path / "b.toml", right.replace(old, new)),
                            tmp_path, capsys)
        assert rc == 1, (old, new, out)


# -- the class job ------------------------------------------------------------------------------
@pytest.mark.timeout(200)
def test_class_job_runs_a_seat_without_slurm(tmp_path):
    """jobs/class.sbatch outside SLURM (launcher mpiexec, SLURM_* set by hand): seat 3's
    lab 2 run lands in runs/seat-3/ and records its grid."""
    ws = tmp_path / "ws"
    for d in ("ssmpi", "data_prep", "labs", "jobs"):
        shutil.copytree(ROOT / d, ws / d, ignore=shutil.ignore_patterns("__pycache__",
                                                                        "answers"))
    subprocess.run([sys.executable, "-m", "data_prep.synthetic", "motion",
                    str(ws / "data" / "direction"), "--size", "16", "--classes", "2",
                    "--speeds", "2", "--square", "8", "--frames", "12", "--videos", "24",
                    "--test-videos", "8", "--quiet"], check=True, timeout=120,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    env = dict(os.environ, SSMPI_HOME=str(ws), SLURM_ARRAY_TASK_ID="3", SLURM_NTASKS="8",
               SLURM_JOB_ID="1", SSMPI_LAUNCHER="mpiexec", PYTHONPATH=str(ws))
    p = subprocess.run(["bash", str(ws / "jobs" / "class.sbatch"), "grid",
                        "--set", "run.iterations=3", "--set", "run.eval_batches=1"],
                       cwd=ws, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    grid = ws / "runs" / "seat-3" / "lab2-grid" / "grid.txt"
    assert "the measured grid equals the plan" in grid.read_text()
    p = subprocess.run(["bash", str(ws / "jobs" / "class.sbatch"), "nonsense"], cwd=ws,
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "nonsense" in p.stderr
