"""data_prep.synthetic: determinism, format, and the single-frame property of `motion`."""

import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from data_prep import synthetic
from ssmpi.data import ClipLoader, open_dataset, video_key

MOTION = {"size": [32, 32], "frames": 16, "noise": 0.05, "subsample": 1, "seed": 0,
          "classes": 4, "speeds": [1], "square": 8}


def videos(root, split):
    ds = open_dataset(root, split)
    out = np.empty((ds.num_videos,) + (int(ds.num_frames[0]),) + ds.frame_shape, np.uint8)
    for v in range(ds.num_videos):
        s, k = ds._locate(v)
        with h5py.File(ds.shards[s], "r") as f:
            out[v] = f[video_key(k)][()]
    return out, ds.labels


@pytest.fixture(scope="module")
def motion(tmp_path_factory):
    out = tmp_path_factory.mktemp("motion")
    synthetic.generate("motion", out, splits={"train": 480, "test": 240}, params=MOTION,
                       shards=3, compression="lzf", quiet=True)
    return out


def softmax_regression(xtr, ytr, xte, yte, classes, iters=300, lr=0.5, l2=1e-3):
    """Test accuracy of a multinomial logistic regression (standardised features, GD)."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-8
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    w = np.zeros((xtr.shape[1], classes))
    b = np.zeros(classes)
    onehot = np.eye(classes)[ytr]
    for _ in range(iters):
        z = xtr @ w + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / len(xtr)
        w -= lr * (xtr.T @ g + l2 * w)
        b -= lr * g.sum(0)
    return float(((xte @ w + b).argmax(1) == yte).mean())


def grey(v):
    return v.astype(np.float64).mean(-1) / 255.0


def motion_energy(a, b):
    """Two frames -> [sum(dt * d/dx), sum(dt * d/dy)] (optical-flow constraint, wrap)."""
    dt = b - a
    gx = (np.roll(a, -1, -1) - np.roll(a, 1, -1)) / 2
    gy = (np.roll(a, -1, -2) - np.roll(a, 1, -2)) / 2
    return np.stack([(dt * gx).sum((-1, -2)), (dt * gy).sum((-1, -2))], -1)


def frame_energy(a):
    """One frame -> the same kind of products, from one frame only."""
    gx = (np.roll(a, -1, -1) - np.roll(a, 1, -1)) / 2
    gy = (np.roll(a, -1, -2) - np.roll(a, 1, -2)) / 2
    return np.stack([(a * gx).sum((-1, -2)), (a * gy).sum((-1, -2)), (gx * gy).sum((-1, -2)),
                     (gx * gx).sum((-1, -2)), (gy * gy).sum((-1, -2))], -1)


def accuracies(root):
    """Test accuracy of logistic regressions on single frames (raw pixels; gradient
    statistics of one frame) and on a pair of consecutive frames (motion energy)."""
    vtr, ytr = videos(root, "train")
    vte, yte = videos(root, "test")
    rng = np.random.default_rng(0)
    ttr = rng.integers(0, vtr.shape[1] - 1, len(vtr))
    tte = rng.integers(0, vte.shape[1] - 1, len(vte))
    gtr, gte = grey(vtr), grey(vte)
    ftr, fte = gtr[np.arange(len(vtr)), ttr], gte[np.arange(len(vte)), tte]
    acc_pix = softmax_regression(ftr.reshape(len(ftr), -1), ytr, fte.reshape(len(fte), -1),
                                 yte, 4)
    acc_stat = softmax_regression(frame_energy(ftr), ytr, frame_energy(fte), yte, 4)
    ntr, nte = gtr[np.arange(len(vtr)), ttr + 1], gte[np.arange(len(vte)), tte + 1]
    acc_pair = softmax_regression(motion_energy(ftr, ntr), ytr, motion_energy(fte, nte), yte, 4)
    return acc_pix, acc_stat, acc_pair


def test_single_frames_at_chance_frame_pairs_near_perfect(motion):
    acc_pix, acc_stat, acc_pair = accuracies(motion)
    # 240 test videos: chance is 0.25 +- 0.028; 0.36 is ~4 standard deviations
    assert acc_pix < 0.36, acc_pix
    assert acc_stat < 0.36, acc_stat
    assert acc_pair > 0.9, acc_pair


def test_single_frame_check_detects_a_leak(tmp_path, monkeypatch):
    """Control: the same check fails on a dataset whose frames do reveal the class."""
    real = synthetic.motion_video

    def leaky(rng, *, label, **kw):
        v = real(rng, label=label, **kw).astype(np.int16) + 6 * label
        return np.clip(v, 0, 255).astype(np.uint8)

    monkeypatch.setattr(synthetic, "motion_video", leaky)
    synthetic.generate("motion", tmp_path, splits={"train": 240, "test": 120},
                       params=dict(MOTION, frames=3), shards=1, compression="lzf", quiet=True)
    acc_pix, acc_stat, _ = accuracies(tmp_path)
    assert max(acc_pix, acc_stat) > 0.6, (acc_pix, acc_stat)


def test_single_frame_statistics_do_not_depend_on_class(motion):
    v, y = videos(motion, "train")
    g = grey(v)  # (N, T, H, W)
    # per-class mean image and per-class pixel variance: differences between classes are no
    # larger than between random halves of the same videos (a permutation null)
    def spread(labels):
        means = np.stack([g[labels == c].mean((0, 1)) for c in range(4)])
        return means.std(0).mean()

    observed = spread(y)
    rng = np.random.default_rng(1)
    null = [spread(rng.permutation(y)) for _ in range(20)]
    assert observed < np.mean(null) + 4 * np.std(null) + 1e-12, (observed, null)
    var = [g[y == c].var() for c in range(4)]
    assert np.ptp(var) < 0.05 * np.mean(var), var


def test_labels_are_motion_directions(motion):
    v, y = videos(motion, "train")
    g = grey(v[:40])
    d = np.diff(g, axis=1)  # the static background cancels; the change moves with the square
    for i in range(40):  # the best shift between successive differences is the class velocity
        dy, dx, _ = synthetic.motion_classes(4, [1])[y[i]]
        errs = {(a, b): np.abs(np.roll(d[i, 0], (a, b), (0, 1)) - d[i, 1]).mean()
                for a in (-1, 0, 1) for b in (-1, 0, 1)}
        assert min(errs, key=errs.get) == (dy, dx)


def test_deterministic_and_independent_of_shards(tmp_path):
    p = dict(MOTION, size=[12, 16], frames=6, square=4)
    synthetic.generate("motion", tmp_path / "a", splits={"train": 10}, params=p, shards=2,
                       quiet=True)
    synthetic.generate("motion", tmp_path / "b", splits={"train": 10}, params=p, shards=5,
                       quiet=True, workers=2)
    synthetic.generate("motion", tmp_path / "c", splits={"train": 10}, params=dict(p, seed=1),
                       shards=2, quiet=True)
    va, ya = videos(tmp_path / "a", "train")
    vb, yb = videos(tmp_path / "b", "train")
    vc, _ = videos(tmp_path / "c", "train")
    sa = {open_dataset(tmp_path / "a", "train").source(i): va[i] for i in range(10)}
    sb = {open_dataset(tmp_path / "b", "train").source(i): vb[i] for i in range(10)}
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k])
    assert not np.array_equal(va, vc)
    assert sorted(ya) == sorted(yb)


def test_options_classes_speeds_subsample(tmp_path):
    p = dict(MOTION, size=[24, 24], frames=4, square=6, classes=8, speeds=[1, 2], subsample=2)
    synthetic.generate("motion", tmp_path, splits={"train": 16}, params=p, shards=2, quiet=True)
    ds = open_dataset(tmp_path, "train")
    assert ds.num_classes == 8 and ds.frame_shape == (24, 24, 3)
    assert ds.class_names[4] == "right-2px"
    v, y = videos(tmp_path, "train")
    g = grey(v)
    i = int(np.flatnonzero(y == 5)[0])  # left at 2 px/frame, every 2nd frame kept: 4 px
    d = np.diff(g[i], axis=0)
    errs = {b: np.abs(np.roll(d[0], b, 1) - d[1]).mean() for b in range(-6, 7)}
    assert min(errs, key=errs.get) == -4
    with pytest.raises(ValueError):
        synthetic.motion_classes(6, [1, 2, 3, 4])


def test_frame_prediction_smooth_motion(tmp_path):
    p = {"size": [32, 32], "frames": 24, "noise": 0.0, "subsample": 1, "seed": 0,
         "glyphs": 2, "speed": 1.5}
    synthetic.generate("frame-prediction", tmp_path, splits={"train": 6, "test": 2},
                       params=p, shards=2, quiet=True)
    ds = open_dataset(tmp_path, "train")
    assert ds.task == "frames" and ds.num_classes == 0 and (ds.labels == -1).all()
    v, _ = videos(tmp_path, "train")
    g = grey(v)
    # consecutive frames are much closer than frames 8 apart (smooth, moving)
    d1 = np.abs(np.diff(g, axis=1)).mean()
    d8 = np.abs(g[:, 8:] - g[:, :-8]).mean()
    assert 0 < d1 < d8
    ld = ClipLoader(ds, batch_size=2, clip_len=16, extra_frames=8)
    b = next(iter(ld.epoch(0)))
    assert b.frames.shape == (2, 24, 32, 32, 3)
    ld.close()


def test_resume_reuses_finished_shards(tmp_path, capsys):
    p = dict(MOTION, size=[8, 8], frames=4, square=2)
    synthetic.generate("motion", tmp_path, splits={"train": 9}, params=p, shards=3)
    victim = tmp_path / "train-00001-of-00003.h5"
    keep = tmp_path / "train-00000-of-00003.h5"
    t_keep = keep.stat().st_mtime_ns
    victim.unlink()
    (tmp_path / "train-00002-of-00003.h5.partial").write_bytes(b"junk from a killed run")
    capsys.readouterr()
    synthetic.generate("motion", tmp_path, splits={"train": 9}, params=p, shards=3)
    assert "(2 reused)" in capsys.readouterr().out
    assert keep.stat().st_mtime_ns == t_keep and victim.exists()
    assert open_dataset(tmp_path, "train").num_videos == 9
    # other settings: nothing reused
    synthetic.generate("motion", tmp_path, splits={"train": 9}, params=dict(p, seed=5), shards=3)
    assert "(0 reused)" in capsys.readouterr().out


def test_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "data_prep.synthetic", "motion", "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "--classes" in r.stdout and "--noise" in r.stdout
    r = subprocess.run([sys.executable, "-m", "data_prep.synthetic", "motion", str(tmp_path),
                        "--videos", "8", "--test-videos", "4", "--shards", "2", "--size", "16",
                        "--frames", "5", "--seed", "3"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ds = open_dataset(tmp_path, "test")
    assert ds.num_videos == 4 and ds.frame_shape == (16, 16, 3)
    r = subprocess.run([sys.executable, "-m", "data_prep.synthetic", "motion", str(tmp_path),
                        "--classes", "3", "--speeds", "1,2"], capture_output=True, text=True)
    assert r.returncode == 2 and "multiple" in r.stderr


@pytest.mark.timeout(300)
def test_signal_keeps_complete_shards_and_the_same_command_resumes(tmp_path):
    """SIGTERM (a batch system's stop) or SIGINT while writing: one line, exit 128 + signal,
    no unfinished ``.partial`` shard left behind, complete shards kept; the same command
    then finishes the dataset."""
    sig = signal.SIGTERM
    cmd = [sys.executable, "-m", "data_prep.synthetic", "motion", str(tmp_path), "--videos",
           "2000", "--test-videos", "8", "--shards", "6", "--size", "32", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not list(tmp_path.glob("*.partial")) and time.monotonic() - t0 < 60:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"interrupted by {sig.name}"), err
    assert not list(tmp_path.glob("*.partial"))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert open_dataset(tmp_path, "train").num_videos == 2000


def test_every_shard_and_replica_holds_every_class(tmp_path):
    """Regression: labels i % classes with shards taking every S-th video gave each shard
    (and each data-parallel replica) a single class when S was a multiple of the classes."""
    out = tmp_path / "m"
    synthetic.main(["motion", str(out), "--size", "8", "--frames", "4", "--videos", "64",
                    "--test-videos", "8", "--shards", "4", "--classes", "4", "--quiet"])
    ds = open_dataset(out, "train")
    for r in range(2):
        ld = ClipLoader(ds, batch_size=4, clip_len=2, train=False, replica=r, n_replicas=2,
                        need_frames=False, drop_last=False)
        labels = np.concatenate([b.labels[b.video >= 0] for b in ld.epoch(0)])
        ld.close()
        assert len(set(labels.tolist())) == 4, (r, np.bincount(labels))


def test_backgrounds():
    """``background``: texture (the default, unchanged), flat grey, or a new texture per frame;
    an unknown one is refused by name."""
    cls = synthetic.motion_classes(4, [2])
    kw = dict(label=1, classes=cls, size=(16, 16), frames=4, square=4, noise=0.0, subsample=1)
    default = synthetic.motion_video(np.random.default_rng(5), **kw)
    tex = synthetic.motion_video(np.random.default_rng(5), background="texture", **kw)
    assert np.array_equal(default, tex)
    flat = synthetic.motion_video(np.random.default_rng(5), background="flat", **kw)
    # everything but the 4x4 square is grey (0.5 -> 128) in every frame
    assert all(((f != 128).any(-1)).sum() <= 16 for f in flat)
    assert all(((f == 128).all(-1)).sum() >= 16 * 16 - 16 for f in flat)
    dyn = synthetic.motion_video(np.random.default_rng(5), background="dynamic", **kw)
    # a still background keeps all but the square's pixels; a dynamic one keeps almost none
    same = lambda v: ((v[1:] == v[:-1]).all(-1)).mean()  # noqa: E731
    assert same(tex) > 0.85 and same(dyn) < 0.1
    with pytest.raises(ValueError, match="texture, flat, dynamic"):
        synthetic.motion_video(np.random.default_rng(5), background="sky", **kw)


def test_flat_background_single_frames_at_chance(tmp_path):
    """On flat grey the square is easy to see, but one frame still carries no class."""
    synthetic.generate("motion", tmp_path, splits={"train": 480, "test": 240},
                       params=dict(MOTION, background="flat"), shards=2, compression="lzf",
                       quiet=True)
    acc_pix, acc_stat, acc_pair = accuracies(tmp_path)
    assert acc_pix < 0.36 and acc_stat < 0.36, (acc_pix, acc_stat)
    assert acc_pair > 0.9, acc_pair
