"""Smoke tests of the study scripts (experiments/study_*.py, issues 8 and 16): they run end to
end on tiny datasets, write their per-run JSON and report, resume a run stopped half-way to the
same numbers, and what they measure has the properties it must have."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")


def _run(script, *args, timeout=600):
    p = subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args], env=ENV,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


@pytest.mark.timeout(900)
def test_study_motion_quick(tmp_path):
    _run("study_motion.py", "--quick", "--out", str(tmp_path), "--data", str(tmp_path / "d"),
         "--only", "base,probe-dir,dir-inputsc-freeze1,stream")
    runs = tmp_path / "quick" / "runs"
    keys = {p.stem for p in runs.glob("*.json")}
    for m in ("sideways", "skip", "skip-add", "fa-skip", "bptt", "twoframe", "causal3d"):
        assert f"base__{m}__s0" in keys
    assert {"probe-dir__skip__s0", "probe-dir__bptt__s0", "dir-inputsc-freeze1__skip__s0",
            "stream__skip__s0"} <= keys
    skip = json.loads((runs / "base__skip__s0.json").read_text())
    assert [it for it, _ in skip["curve"]] == [20, 40]
    assert all(0 <= a <= 1 for _, a in skip["curve"])
    # the head gets the exact loss gradient: its pseudo/exact cosine is 1 by construction
    assert skip["align"] and all(a["cos"]["4"] > 0.999 for a in skip["align"])
    assert all(abs(a["dcos"]["4"] - 1) < 1e-3 for a in skip["align"])
    probe = json.loads((runs / "probe-dir__bptt__s0.json").read_text())
    assert [p["it"] for p in probe["probes"]] == [0, 20]
    assert all(p["units"]["4"]["ecos"] > 0.999 for p in probe["probes"])
    # the frozen identity stem stays the identity, the input shortcut exists (5 units)
    frz = json.loads((runs / "dir-inputsc-freeze1__skip__s0.json").read_text())
    assert frz["cfg"]["stem"] and len(frz["align"][0]["cos"]) == 5
    assert (tmp_path / "quick" / "results.md").read_text().count("| base |") == 7


@pytest.mark.timeout(900)
def test_study_frames_quick(tmp_path):
    _run("study_frames.py", "--quick", "--out", str(tmp_path), "--data", str(tmp_path / "d"))
    runs = sorted((tmp_path / "quick" / "runs").glob("*.json"))
    assert runs
    res = (tmp_path / "quick" / "results.md").read_text()
    assert "sideways" in res and "skip" in res and "bptt" in res


@pytest.mark.timeout(900)
def test_study_motion_architectures_and_resume(tmp_path):
    """An architecture-file variant (4 directions, 32x32) with its BPTT twin and the remedy
    variants run; a run stopped half-way continues to the same numbers as one that was not."""
    _run("study_motion.py", "--quick", "--out", str(tmp_path / "a"), "--data",
         str(tmp_path / "d"), "--only", "keep-ema,keep-plateau,keep-stale")
    # the 8-unit variants for 20 iterations (half of --quick's 40): what is checked of them
    # is there after the first evaluation, and they are most of this test's time
    _run("study_motion.py", "--quick", "--out", str(tmp_path / "a"), "--data",
         str(tmp_path / "d"), "--iters", "20", "--only",
         "vgg8n-dir4-lr5e-4,vgg8n-dir4-flat-sideways,vgg8n-dir4-flat-freeze3-wd-lr5e-4")
    runs = tmp_path / "a" / "quick" / "runs"
    # the Sideways control on the flat background: its own test set, no Skip-Sideways probes
    side = json.loads((runs / "vgg8n-dir4-flat-sideways__sideways__s0.json").read_text())
    assert side["cfg"]["background"] == "flat" and side["probes"] == []
    assert [p.name for p in (tmp_path / "d").iterdir() if p.name.endswith("_flat")]
    r = json.loads((runs / "vgg8n-dir4-lr5e-4__skip__s0.json").read_text())
    assert r["cfg"]["arch"] == "vgg8n" and len(r["arch_units"]) == 8
    assert len(r["align"][0]["cos"]) == 8 and r["probes"]
    assert r["align"][0]["cos"]["8"] > 0.999  # the head's gradient is exact
    pn, en, step = r["align"][0]["norms"]["8"]
    assert abs(pn - en) <= 1e-5 * en and step > 0
    assert (runs / "vgg8n-dir4-lr5e-4__bptt__s0.json").exists()
    # U1-U3 frozen (unit_lr 0) stay frozen under weight decay: it is lr x wd x theta
    wd = json.loads((runs / "vgg8n-dir4-flat-freeze3-wd-lr5e-4__skip__s0.json").read_text())
    assert wd["cfg"]["wd"] > 0
    assert [wd["align"][0]["norms"][str(l)][2] for l in (1, 2, 3)] == [0, 0, 0]
    assert all(wd["align"][0]["norms"][str(l)][2] > 0 for l in range(4, 9))
    # the direction-dependent part of the gradients at the first and the last weights: the
    # head's pseudo-gradient is exact, so its part is too
    _run("study_motion.py", "--quick", "--out", str(tmp_path / "a"), "--data",
         str(tmp_path / "d"), "--analyse", "vgg8n-dir4-lr5e-4__skip__s0", "--analyse-batches", "1")
    an = json.loads((tmp_path / "a" / "quick" / "analysis" / "vgg8n-dir4-lr5e-4__skip__s0.json")
                    .read_text())
    for when in ("initial", "final"):
        assert len(an[when]) == 8 and an[when]["8"]["mcos"] > 0.999
        assert abs(an[when]["8"]["mnorm"] - 1) < 1e-3
        assert all(abs(v["mcos"]) <= 1 + 1e-6 for v in an[when].values())
        cm = np.array(an[f"confusion_{when}"])  # every test video once, [true, predicted]
        assert cm.shape == (4, 4) and cm.sum() == 32
        # each unit's weight norm, and the test loss at each valid step of a clip
        assert sorted(an[f"norm_{when}"], key=int) == [str(l) for l in range(1, 9)]
        assert an[f"step_loss_{when}"] and np.isfinite(an[f"step_loss_{when}"]).all()
    assert an["norm_final"]["8"] != an["norm_initial"]["8"]  # the head trained
    cm = np.array(an["confusion_final"])
    assert abs(np.trace(cm) / 32 - r["final_acc"]) < 1e-9  # the run's own final accuracy
    stale = json.loads((runs / "keep-stale__skip__s0.json").read_text())
    assert stale["align"][0]["norms"]["1"][2] == 0  # the frozen stem does not move
    # stopped after iteration 20 with its state saved, then continued: the same numbers
    args = [sys.executable, str(ROOT / "experiments" / "study_motion.py"), "--quick", "--out",
            str(tmp_path / "b"), "--data", str(tmp_path / "d"), "--only", "keep-ema,keep-plateau"]
    p = subprocess.run(args + ["--stop-after", "20"], env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode != 0 and "--stop-after" in p.stderr, p.stderr[-2000:]
    assert list((tmp_path / "b" / "quick" / "partial").glob("keep-ema__skip__s0.npz"))
    _run("study_motion.py", *args[2:])
    for v in ("keep-ema", "keep-plateau"):
        a = json.loads((runs / f"{v}__skip__s0.json").read_text())
        b = json.loads((tmp_path / "b" / "quick" / "runs" / f"{v}__skip__s0.json").read_text())
        for k in ("curve", "loss", "align"):
            assert a[k] == b[k], (v, k)
    assert not list((tmp_path / "b" / "quick" / "partial").glob("keep-ema__skip__s0.npz"))
    # a finished run asked for more iterations continues from its end: the same numbers as a
    # run made that long from the start
    _run("study_motion.py", *args[2:-1], "keep-plateau", "--iters", "60")
    _run("study_motion.py", "--quick", "--out", str(tmp_path / "c"), "--data",
         str(tmp_path / "d"), "--only", "keep-plateau", "--iters", "60")
    a, b = (json.loads((tmp_path / x / "quick" / "runs" / "keep-plateau__skip__s0.json")
                       .read_text()) for x in ("b", "c"))
    assert [i for i, _ in a["curve"]] == [20, 40, 60]
    for k in ("curve", "loss", "align"):
        assert a[k] == b[k], k


def test_fresh_clips_are_new_every_iteration_and_resume_the_same_sequence():
    """``cfg["fresh"]``: each training batch is drawn anew (the probe of ALGORITHM.md), from
    the batch number alone, so a resumed run sees the batches an unbroken one would."""
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import study_motion as sm
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    cfg = dict(sm.ARCH, arch="probe", lr=5e-4, fresh=True, batch=4, T=6)
    g = sm.train_batches(None, cfg, seed=3)
    first = [next(g) for _ in range(3)]
    g.close()
    b = first[0]
    assert b.frames.shape == (4, 6, 32, 32, 3) and b.frames.dtype == np.float32
    assert b.labels.dtype == np.int64 and set(b.labels) <= {0, 1, 2, 3}
    assert not np.array_equal(first[0].frames, first[1].frames)
    again = sm.train_batches(None, cfg, seed=3, start=2)  # resumed at batch 2
    c = next(again)
    again.close()
    assert c.index == 2 and np.array_equal(c.frames, first[2].frames)
    assert np.array_equal(c.labels, first[2].labels)
    # the ClipLoader's normalisation: (x / 255 - 0.5) / 0.25 on uint8 pixels
    assert np.allclose(np.rint(((b.frames * 0.25) + 0.5) * 255), (b.frames * 0.25 + 0.5) * 255,
                       atol=1e-3)
    other = next(sm.train_batches(None, cfg, seed=4))
    assert not np.array_equal(other.frames, b.frames)


@pytest.mark.timeout(300)
def test_probe_torch_twin_equals_bptt():
    """experiments/probe_torch.py rebuilds the probe model's temporal graph in PyTorch (an
    independent reference, skipped without torch): with ssmpi's weights its loss, clip
    probabilities and autograd gradients equal ssmpi's exact BPTT in float64."""
    pytest.importorskip("torch")
    p = _run("probe_torch.py", "--check", "--T", "6", timeout=300)
    assert "AGREE" in p.stdout and "DISAGREE" not in p.stdout, p.stdout
