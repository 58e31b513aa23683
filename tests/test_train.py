"""The training program end to end: real mpiexec, real HDF5 shards, real checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import train_helpers as helpers
from train_helpers import ENV, base_args, make_motion, run_train

from ssmpi import checkpoint as ckpt
from ssmpi.config import ConfigError, load_config


@pytest.fixture(scope="module")
def motion(tmp_path_factory):
    return make_motion(tmp_path_factory.mktemp("motion"))


def final_params(run_dir):
    path, _ = ckpt.latest_checkpoint(run_dir)
    return ckpt.read_parameters(path)


@pytest.mark.timeout(200)
def test_train_evaluate_and_same_numbers(motion, tmp_path):
    p = run_train(4, base_args(motion, tmp_path, "a", "--set", "run.iterations=6",
                               "--set", "run.eval_every=3"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "done: 6 iterations" in p.stdout
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if "iteration" in m and "loss" in m]
    assert [m["iteration"] for m in train] == list(range(1, 7))
    assert all(np.isfinite(m["loss"]) and m["frames_per_s"] > 0 for m in train)
    assert set(train[0]["units"]) == {"1", "2", "3", "4"}
    final = lines[-1]
    assert final["final"] and 0 <= final["eval"]["clip_acc"] <= 1
    assert (tmp_path / "a" / "config.toml").is_file()
    # the evaluation CLI gives the same numbers, on another placement (serial executor)
    e = subprocess.run([sys.executable, "-m", "ssmpi.evaluate", "--checkpoint",
                        str(tmp_path / "a"), "--json", str(tmp_path / "e.json")],
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert e.returncode == 0, e.stderr[-2000:]
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["clip_acc"] == final["eval"]["clip_acc"]
    assert abs(ev["loss"] - final["eval"]["loss"]) <= 1e-6 * abs(final["eval"]["loss"])
    # curves
    pl = subprocess.run([sys.executable, "-m", "ssmpi.plot", str(tmp_path / "a")],
                        capture_output=True, text=True, timeout=120, env=ENV)
    assert pl.returncode == 0, pl.stderr
    assert (tmp_path / "a" / "loss.png").stat().st_size > 1000


@pytest.mark.timeout(300)
def test_resume_after_kill_reaches_the_same_parameters(motion, tmp_path):
    """Reset mode, same seed: kill -9 mid-run, --resume, final parameters bitwise equal."""
    extra = ["--set", "run.iterations=12", "--set", "run.checkpoint_every=4"]
    ref = run_train(4, base_args(motion, tmp_path, "ref", *extra))
    assert ref.returncode == 0, ref.stderr[-3000:]
    args = base_args(motion, tmp_path, "cut", *extra)
    proc = subprocess.Popen(["mpiexec", "-n", "4", sys.executable, "-m", "ssmpi.train", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                            start_new_session=True)
    man = tmp_path / "cut" / "checkpoints" / "ckpt-00000004" / "manifest.json"
    t0 = time.monotonic()
    while not man.exists() and time.monotonic() - t0 < 120 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert man.exists()
    assert not (tmp_path / "cut" / "checkpoints" / "ckpt-00000012").exists(), \
        "the run finished before it was killed; the test proves nothing"
    res = run_train(4, args + ["--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    # metrics.jsonl: the lines logged after the checkpoint, before the kill, are dropped
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().split(
        "\n") if x]
    assert [m["iteration"] for m in lines if "loss" in m] == list(range(1, 13))
    a, b = final_params(tmp_path / "ref"), final_params(tmp_path / "cut")
    assert a.keys() == b.keys()
    for l in a:
        for k in a[l]:
            assert np.array_equal(a[l][k], b[l][k]), (l, k)
    # and resuming really restored state: a fresh run of 8 iterations differs
    assert final_params(tmp_path / "ref")[1]["0.conv.w"].std() > 0


def test_damaged_checkpoint_is_skipped_with_a_reason(motion, tmp_path):
    p = run_train(2, base_args(motion, tmp_path, "d", "--set", "run.iterations=4",
                               "--set", "run.checkpoint_every=2", "--set",
                               "model.units=2"))
    assert p.returncode == 0, p.stderr[-2000:]
    newest = ckpt.list_checkpoints(tmp_path / "d")[0]
    f = newest / "unit-01.h5"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    path, skipped = ckpt.latest_checkpoint(tmp_path / "d")
    assert path.name == "ckpt-00000002"
    assert "unit-01.h5 is damaged" in skipped[0]


def test_dry_run_prints_plan(motion, tmp_path):
    p = run_train(1, base_args(motion, tmp_path, "dry", "--set", "engine.mode=skip",
                               "--dry-run"))
    assert p.returncode == 0, p.stderr
    assert "memory estimate per rank" in p.stdout and "U4" in p.stdout
    assert not (tmp_path / "dry").exists()


@pytest.mark.parametrize("setting,message", [
    ("optim.lr=-0.1", "config key optim.lr: must be >= 0"),
    ("engine.mode=backprop", "config key engine.mode: 'backprop' is not one of"),
    ("optim.bogus=1", "unknown config key optim.bogus"),
    ("data.batch_size=zero", "config key data.batch_size: expected int"),
])
def test_bad_config_is_one_line_and_exit_2(motion, tmp_path, setting, message):
    p = run_train(2, base_args(motion, tmp_path, "bad", "--set", setting))
    assert p.returncode == 2
    assert message in p.stderr
    assert len(helpers.program_lines(p.stderr)) == 1, p.stderr
    assert not (tmp_path / "bad").exists()


def test_rank_count_that_does_not_fit(motion, tmp_path):
    p = run_train(6, base_args(motion, tmp_path, "r6"))
    assert p.returncode == 2
    assert "6 ranks" in p.stderr and "only 4 units" in p.stderr
    assert len(helpers.program_lines(p.stderr)) == 1, p.stderr


def test_missing_dataset_is_one_line(tmp_path):
    p = run_train(2, base_args(tmp_path / "nope", tmp_path, "m"))
    assert p.returncode == 2
    assert "does not exist" in p.stderr and str(tmp_path / "nope") in p.stderr
    assert len(helpers.program_lines(p.stderr)) == 1, p.stderr


def test_config_file_errors(tmp_path):
    bad = tmp_path / "x.toml"
    bad.write_text("[optim]\nlr = 'fast'\n")
    with pytest.raises(ConfigError, match="config key optim.lr: expected float"):
        load_config(str(bad))
    bad.write_text("[optim\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.toml"))


def test_every_job_config_loads():
    root = Path(__file__).resolve().parents[1] / "jobs" / "configs"
    files = sorted(root.glob("*.toml"))
    assert files, "jobs/configs/ has no configs"
    for f in files:
        cfg = load_config(str(f))
        assert cfg.about, f"{f.name} must say which table it reproduces (about = ...)"


@pytest.mark.timeout(200)
def test_frame_prediction_task_end_to_end(tmp_path):
    root = tmp_path / "fp"
    subprocess.run([sys.executable, "-m", "data_prep.synthetic", "frame-prediction", str(root),
                    "--size", "16", "--videos", "8", "--test-videos", "4", "--frames", "24",
                    "--shards", "2", "--quiet"], check=True, env=ENV, timeout=120)
    args = ["--set", f"data.root={root}", "--set", f"run.out_dir={tmp_path}", "--set",
            "run.name=fp", "--set", "model.name=fullres", "--set", "model.units=4", "--set",
            "model.width=4", "--set", "data.batch_size=2", "--set", "data.clip_len=8",
            "--set", "run.iterations=3", "--set", "run.progress=false"]
    p = run_train(4, args)
    assert p.returncode == 0, p.stderr[-3000:]
    final = json.loads((tmp_path / "fp" / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["eval"]["l2"] > 0 and np.isfinite(final["eval"]["l2"])
    # a classification model on a frame-prediction dataset is a clear error
    bad = run_train(2, args[:-8] + ["--set", "model.name=tiny", "--set", "model.units=2"])
    assert bad.returncode == 2 and "needs a model with a frames head" in bad.stderr


@pytest.mark.timeout(200)
def test_stream_mode_trains(motion, tmp_path):
    p = run_train(4, base_args(motion, tmp_path, "s", "--set", "engine.clip_mode=stream",
                               "--set", "engine.update_every=4", "--set", "run.iterations=4"))
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if "iteration" in m and "loss" in m]
    assert len(train) == 4 and all(np.isfinite(m["loss"]) for m in train[1:])
    p0 = ckpt.read_parameters(ckpt.latest_checkpoint(tmp_path / "s")[0])
    assert all(np.isfinite(a).all() for d in p0.values() for a in d.values())


@pytest.mark.timeout(240)
def test_replicas_evaluate_the_whole_split(motion, tmp_path):
    """2 replicas x 2 units: the final evaluation counts every test video once (both
    replicas' shards); the evaluation CLI gives the same numbers, loss included, on any
    placement (1 rank; 2 ranks as 2 replicas; 4 ranks as 2 replicas x 2) and with a batch
    size that pads the last batch (16 videos in batches of 5; 2 replicas of 8 videos in
    batches of 3)."""
    p = run_train(4, base_args(motion, tmp_path, "r", "--set", "model.units=2", "--set",
                               "engine.replicas=2", "--set", "run.iterations=3"))
    assert p.returncode == 0, p.stderr[-3000:]
    final = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["eval"]["videos"] == 16 and final["eval"]["replicas"] == 2
    ref = final["eval"]
    for n, sets in [(1, []), (2, ["engine.replicas=2"]), (4, []), (1, ["data.batch_size=5"]),
                    (2, ["engine.replicas=2", "data.batch_size=3"])]:
        out = tmp_path / f"e{n}-{len(sets)}.json"
        cmd = [sys.executable, "-m", "ssmpi.evaluate", "--checkpoint", str(tmp_path / "r"),
               "--json", str(out)]
        for s in sets:
            cmd += ["--set", s]
        e = subprocess.run((["mpiexec", "-n", str(n)] if n > 1 else []) + cmd,
                           capture_output=True, text=True, timeout=120, env=ENV)
        assert e.returncode == 0, e.stderr[-2000:]
        ev = json.loads(out.read_text())
        print(n, sets, ev["replicas"], ev["loss"], ev["clip_acc"])
        assert ev["videos"] == 16 and ev["clips"] == 16, (n, sets, ev)
        assert ev["clip_acc"] == ref["clip_acc"] and ev["video_acc"] == ref["video_acc"]
        assert abs(ev["loss"] - ref["loss"]) <= 1e-6 * abs(ref["loss"]), (n, sets, ev, ref)
