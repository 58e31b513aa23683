"""data_prep.convert and data_prep.inspect on the real fixture clips and miniature layouts."""

import hashlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from data_prep import convert as cv
from data_prep import inspect as ins
from ssmpi.data import ClipLoader, open_dataset

ROOT = Path(__file__).resolve().parents[1]
# the shared fixtures sit next to the checkout; SSMPI_FIXTURES points elsewhere (a worktree)
FIX = Path(os.environ.get("SSMPI_FIXTURES") or ROOT.parent / "shared" / "fixtures")
VIDEOS = FIX / "videos"
DS = FIX / "datasets"
pytestmark = pytest.mark.skipif(not (FIX / "README.md").is_file(), reason="no shared/fixtures")
pytest.importorskip("av")

HMDB = (DS / "hmdb51_mini" / "hmdb51_org", DS / "hmdb51_mini" / "testTrainMulti_7030_splits")
UCF = (DS / "ucf101_mini" / "UCF-101", DS / "ucf101_mini" / "ucfTrainTestlist")
KIN = (DS / "kinetics_mini", DS / "kinetics_mini" / "annotations")


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


# ------------------------------------------------------------------ decoding


@pytest.mark.parametrize(
    "name, n, hw",
    [
        ("k400_arm_wrestling_demo.mp4", 250, (128, 170)),  # 280 frames at 28 fps -> 25 fps
        ("mm_test.avi", 164, (128, 171)),  # 25 fps: every frame
        ("mm_test.mp4", 250, (128, 170)),  # 30 fps -> 25
        ("flipping_a_pancake.mkv", 258, (128, 227)),  # 310 at 30 fps, no frame count header
        ("unordered.mov", 3, (128, 128)),  # 4 frames at 32 fps, out of order in the container
    ],
)
def test_decode_fixture(name, n, hw):
    frames, info = cv.decode_video(VIDEOS / name)
    assert frames.dtype == np.uint8 and frames.shape == (n,) + hw + (3,)
    if name != "unordered.mov":  # that one is a flat white test clip
        assert frames.std() > 5  # real picture content


def test_decode_keeps_source_rate_and_size():
    frames, info = cv.decode_video(VIDEOS / "mm_test.mp4", fps=0, short_side=0)
    assert frames.shape == (300, 256, 340, 3) and info["orig_fps"] == 30.0
    assert info["orig_frames"] == 300


def test_rotation_metadata_is_honoured():
    frames, info = cv.decode_video(VIDEOS / "video_90.mov", fps=0, short_side=0)
    assert frames.shape == (3, 568, 320, 3)  # stored 568x320 landscape, displayed portrait
    assert info["rotation"] == 270  # counter-clockwise quarter turns x 90 (= 90 clockwise)
    import av

    with av.open(str(VIDEOS / "video_90.mov")) as c:
        raw = next(c.decode(video=0)).to_ndarray(format="rgb24")
    np.testing.assert_array_equal(frames[0], np.rot90(raw, k=-1))  # clockwise


def test_resampling_picks_frames_by_time():
    full, _ = cv.decode_video(VIDEOS / "mm_test.mp4", fps=0, short_side=64)
    half, _ = cv.decode_video(VIDEOS / "mm_test.mp4", fps=15, short_side=64)
    assert len(half) == 150
    np.testing.assert_array_equal(half, full[::2])


def test_corrupted_video_is_an_error_never_short():
    with pytest.raises(cv.VideoError, match="decode error after 28 frames"):
        cv.decode_video(VIDEOS / "corrupted.mp4")
    with pytest.raises(cv.VideoError, match="truncated: decoded 1 of the 75"):
        cv.decode_video(HMDB[0] / "wave" / "Broken_wave_f_nm_np1_ba_bad_1.avi")
    with pytest.raises(cv.VideoError, match="cannot open"):
        cv.decode_video(VIDEOS / "nonexistent.mp4")


# ------------------------------------------------------------------ layouts end to end


def test_hmdb51(tmp_path, capsys):
    classes, items, missing = cv.layout_hmdb51(*HMDB, split_id=1)
    assert classes == ["brush_hair", "cartwheel", "wave"]
    assert len(items["train"]) == 4 and len(items["test"]) == 3  # the broken one is listed
    cv.convert("hmdb51", tmp_path, classes=classes, items=items, missing=missing,
               shards="2", workers=2, quiet=True)
    out = capsys.readouterr().out
    assert "train: stored 3 videos (225 frames) in 2 shards" in out
    assert "skipped 1 (1 unreadable, 0 missing)" in out
    report = (tmp_path / "skipped-train.tsv").read_text().splitlines()
    assert len(report) == 2 and report[1].startswith("wave/Broken_wave_f_nm_np1_ba_bad_1.avi\t")
    assert "truncated" in report[1]
    ds = open_dataset(tmp_path, "train")
    assert ds.num_videos == 3 and ds.class_names == classes
    assert sorted(ds.labels) == [0, 1, 2] and (ds.num_frames == 75).all()
    assert ds.frame_shape == (128, 171, 3) and ds.manifest["fps"] == 25.0
    srcs = {ds.source(v) for v in range(3)}
    assert "wave/Broken_wave_f_nm_np1_ba_bad_1.avi" not in srcs
    assert ds.manifest["splits"]["train"]["skipped"][0]["reason"].startswith("truncated")
    # stored frames are exactly the decoded frames
    v = [i for i in range(3) if ds.source(i).startswith("cartwheel/")][0]
    want, _ = cv.decode_video(HMDB[0] / ds.source(v))
    ld = ClipLoader(ds, batch_size=3, clip_len=75, train=False, mean=0, std=1, crop=None)
    b = next(iter(ld.epoch(0)))
    i = list(b.video).index(v)
    np.testing.assert_allclose(b.frames[i], want / 255.0, atol=1e-6)
    assert b.labels[i] == 1
    ld.close()
    # a resumed run reuses every shard and reports the same skips
    t = [p.stat().st_mtime_ns for p in sorted(tmp_path.glob("*.h5"))]
    cv.convert("hmdb51", tmp_path, classes=classes, items=items, missing=missing, shards="2",
               workers=2, quiet=True)
    out = capsys.readouterr().out
    assert "(2 reused); skipped 1" in out
    assert [p.stat().st_mtime_ns for p in sorted(tmp_path.glob("*.h5"))] == t


def test_ucf101_crlf(tmp_path):
    classes, items, missing = cv.layout_ucf101(*UCF, split_id=1)
    assert classes == ["ApplyEyeMakeup", "Archery", "Basketball"]
    assert [it["label"] for it in items["test"]] == [0, 1, 2]
    first = items["train"][0]["source"]
    assert first == "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi"  # CRLF stripped
    cv.convert("ucf101", tmp_path, classes=classes, items=items, missing=missing,
               shards="train=3,test=1", workers=1, quiet=True, compression="lzf")
    tr, te = open_dataset(tmp_path, "train"), open_dataset(tmp_path, "test")
    assert len(tr.shards) == 3 and len(te.shards) == 1
    assert sorted(te.labels) == [0, 1, 2]


def test_kinetics_missing_video_reported(tmp_path, capsys):
    classes, items, missing = cv.layout_kinetics(*KIN)
    assert classes == ["arm wrestling", "flipping pancake", "playing basketball"]
    assert sorted(items) == ["train", "val"]
    assert missing["train"] == [("arm wrestling/MISSINGvid01_000000_000010", "missing on disk")]
    cv.convert("kinetics", tmp_path, classes=classes, items=items, missing=missing,
               shards="2", workers=2, quiet=True, short_side=64)
    out = capsys.readouterr().out
    assert "train: stored 3 videos" in out and "(0 unreadable, 1 missing)" in out
    assert "MISSINGvid01" in (tmp_path / "skipped-train.tsv").read_text()
    ds = open_dataset(tmp_path, "val")
    assert ds.num_videos == 2 and ds.frame_shape == (64, 85, 3)
    labels = {ds.source(v): int(ds.labels[v]) for v in range(2)}
    assert labels["validate/arm_wrestling/D9bZ5s1QkQw_000020_000030.mp4"] == 0


def test_folder_layout_with_damaged_and_rotated(tmp_path, capsys):
    root = tmp_path / "src"
    for cls, names in {"a": ["mm_test.avi", "corrupted.mp4"],
                       "b": ["video_90.mov", "unordered.mov"]}.items():
        (root / cls).mkdir(parents=True)
        for nm in names:
            os.symlink(VIDEOS / nm, root / cls / nm)
    (root / "a" / "notes.txt").write_text("not a video")
    out = tmp_path / "out"
    r = run("data_prep.convert", "folder", str(root), str(out), "--shards", "2", "--workers",
            "2", "--short-side", "32", "--split", "train", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "stored 3 videos" in r.stdout and "skipped 1 (1 unreadable, 0 missing)" in r.stdout
    assert "a/corrupted.mp4\tdecode error" in (out / "skipped-train.tsv").read_text()
    ds = open_dataset(out, "train")
    assert not ds.uniform_shape and ds.frame_shape == (32, 32, 3)
    with pytest.raises(ValueError, match="different sizes; set crop"):
        ClipLoader(ds, batch_size=1, clip_len=2)
    ld = ClipLoader(ds, batch_size=3, clip_len=2, crop=32, train=False, drop_last=False)
    b = next(iter(ld.epoch(0)))
    assert b.frames.shape == (3, 2, 32, 32, 3)
    ld.close()
    rot = [v for v in range(3) if ds.source(v) == "b/video_90.mov"][0]
    s, k = ds._locate(rot)
    assert tuple(ds._ix(s)[n][k] for n in ("height", "width")) == (57, 32)  # portrait


# ------------------------------------------------------------------ SIGTERM / SIGINT


@pytest.fixture(scope="module")
def many_videos(tmp_path_factory):
    """A folder dataset of 16 real clips (links to the UCF101 fixtures) and the output of an
    uninterrupted conversion of it; 8 shards of 2 videos, about 3 s with 2 workers."""
    root = tmp_path_factory.mktemp("many")
    src = root / "src"
    clips = sorted((UCF[0]).rglob("*.avi"))
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        for k in range(8):
            c = clips[k % len(clips)]
            os.symlink(c, src / cls / f"{k}_{c.name}")
    ref = root / "ref"
    proc = _start(_convert_args(src, ref), root)
    rc = _wait(proc, 60)
    assert rc == 0, (root / "stderr").read_text()
    # a finished conversion leaves nothing behind either: the forkserver and the resource
    # tracker are reaped, not left as zombies where PID 1 does not reap (containers)
    assert not proc.left, f"processes left behind (pid, state): {proc.left}"
    return src, ref


def _start(args, logs):
    """The command in a new session (its own process group), stdout/stderr to ``logs``."""
    with open(logs / "stdout", "w") as so, open(logs / "stderr", "w") as se:
        return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdout=so,
                                stderr=se, start_new_session=True)


def _wait(proc, timeout):
    """Its exit code; then what is left in its process group (which a test asserts is
    nothing) is listed and killed, so that even a failing test leaves no process running."""
    try:
        return proc.wait(timeout=timeout)
    finally:
        proc.left = _group_members(proc.pid)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _convert_args(src, out, workers=2):
    return ("data_prep.convert", "folder", str(src), str(out), "--shards", "8", "--workers",
            str(workers), "--short-side", "32", "--quiet")


def _group_members(pgid):
    """(pid, state) of every process in process group ``pgid`` (zombies included)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        out = []
        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) == pgid:
                    out.append((p.pid, p.status()))
            except (OSError, psutil.Error):
                pass
        return out
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            f = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp ...
            if int(f[2]) == pgid:
                out.append((int(d), f[0]))
    return out


def _shard_digest(path):
    """Everything a shard holds: attributes, and every dataset's bytes and attributes."""
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        out["/"] = {k: str(v) for k, v in f.attrs.items()}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                data = obj[()]
                blob = repr(data.tolist()).encode() if data.dtype.kind == "O" else data.tobytes()
                out[name] = (hashlib.sha1(blob).hexdigest(), data.shape,
                             {k: str(v) for k, v in obj.attrs.items()})

        f.visititems(visit)
    return out


def _same_output(out, ref):
    import json

    names = sorted(p.name for p in ref.glob("*.h5"))
    assert sorted(p.name for p in out.glob("*.h5")) == names and len(names) == 8
    for nm in names:
        assert _shard_digest(out / nm) == _shard_digest(ref / nm), nm
    m, mr = (json.loads((d / "manifest.json").read_text()) for d in (out, ref))
    for man in (m, mr):
        for sh in man["splits"]["train"]["shards"]:
            sh.pop("bytes")  # HDF5 may lay the same content out differently
    assert m["splits"] == mr["splits"]
    assert not list(out.glob("*.partial"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "sig, target, workers",
    [
        ("SIGTERM", "parent", 2),  # kill <pid>, scancel of the parent
        ("SIGINT", "group", 2),  # Ctrl-C in a terminal: the whole foreground group
        ("SIGTERM", "group", 2),  # kill -- -<pgid>: workers and forkserver die too
        ("SIGINT", "parent", 1),  # no pool: the conversion runs in the parent
    ],
)
def test_signal_stops_cleanly_and_resumes(many_videos, tmp_path, sig, target, workers):
    """A signal mid-way stops the conversion in seconds with exit 128+signum, one line on
    stderr, no process left (forkserver, resource tracker, workers), no partial shard; the
    same command then resumes: the complete shards are reused, the output is that of an
    uninterrupted run."""
    src, ref = many_videos
    out = tmp_path / "out"
    signum = getattr(signal, sig)
    proc = _start(_convert_args(src, out, workers), tmp_path)
    try:
        # mid-way: at least one shard complete (it must survive), others still to do
        deadline = time.monotonic() + 60
        while not list(out.glob("*.h5")):
            assert proc.poll() is None, "the conversion ended before it could be signalled"
            assert time.monotonic() < deadline, "no shard complete after 60 s"
            time.sleep(0.02)
        t0 = time.monotonic()
        if target == "group":
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
    finally:
        rc = _wait(proc, 30)
    took = time.monotonic() - t0
    err = (tmp_path / "stderr").read_text()
    assert rc == 128 + signum, (rc, err)
    assert took < 10, f"took {took:.1f} s to stop"
    assert err.strip().count("\n") == 0, err  # one line
    assert err.startswith(f"interrupted by {sig}: ") and "run the same command again" in err
    assert not proc.left, f"processes left behind (pid, state): {proc.left}"
    assert not list(out.glob("*.partial"))
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    assert 1 <= len(kept) < 8, f"not mid-way: {sorted(kept)}"
    assert f"{len(kept)} complete shards kept" in err
    r = run(*_convert_args(src, out, workers))
    assert r.returncode == 0, r.stderr
    assert f"in 8 shards ({len(kept)} reused)" in r.stdout
    assert {nm: (out / nm).stat().st_mtime_ns for nm in kept} == kept  # not rewritten
    _same_output(out, ref)


# ------------------------------------------------------------------ malformed split files


def _copytree(src, dst):
    shutil.copytree(src, dst)
    for p in dst.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return dst


def test_hmdb51_malformed_line(tmp_path):
    splits = _copytree(HMDB[1], tmp_path / "splits")
    f = splits / "cartwheel_test_split1.txt"
    f.write_text(f.read_text() + "Some_video.avi 7 \n")
    with pytest.raises(cv.SplitFileError) as e:
        cv.layout_hmdb51(HMDB[0], splits, 1)
    assert str(e.value).startswith(f"{f}:3: ") and "\n" not in str(e.value)


def test_ucf101_malformed_lines(tmp_path):
    lists = _copytree(UCF[1], tmp_path / "lists")
    tr = lists / "trainlist01.txt"
    good = tr.read_bytes()
    tr.write_bytes(good + b"Archery/v_Archery_g09_c01.avi 3\r\n")  # label of another class
    with pytest.raises(cv.SplitFileError, match=rf"^{tr}:4: label '3' does not match"):
        cv.layout_ucf101(UCF[0], lists, 1)
    tr.write_bytes(good + b"Juggling/v_Juggling_g01_c01.avi 1\r\n")
    with pytest.raises(cv.SplitFileError, match=rf"^{tr}:4: class 'Juggling'"):
        cv.layout_ucf101(UCF[0], lists, 1)
    tr.write_bytes(good.replace(b"Archery/v_Archery_g08_c01.avi 2", b"Archery_g08.avi 2"))
    with pytest.raises(cv.SplitFileError, match=rf"^{tr}:2: expected"):
        cv.layout_ucf101(UCF[0], lists, 1)


def test_kinetics_malformed_lines(tmp_path):
    ann = _copytree(KIN[1], tmp_path / "ann")
    f = ann / "train.csv"
    f.write_text(f.read_text() + "arm wrestling,abc,zero,10,train\n")
    with pytest.raises(cv.SplitFileError, match=rf"^{f}:6: time_start/time_end"):
        cv.layout_kinetics(KIN[0], ann)
    f.write_text("label,youtube_id,start,end,split\n")
    with pytest.raises(cv.SplitFileError, match=rf"^{f}:1: header"):
        cv.layout_kinetics(KIN[0], ann)


def test_cli_malformed_is_one_line_exit_2(tmp_path):
    splits = _copytree(HMDB[1], tmp_path / "splits")
    (splits / "wave_test_split1.txt").write_text("only_a_name.avi\n")
    r = run("data_prep.convert", "hmdb51", str(HMDB[0]), str(splits), str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "wave_test_split1.txt:1:" in r.stderr


def test_cli_help():
    for args in (("data_prep.convert", "--help"), ("data_prep.convert", "kinetics", "--help"),
                 ("data_prep.inspect", "--help")):
        r = run(*args)
        assert r.returncode == 0 and "usage" in r.stdout


# ------------------------------------------------------------------ inspect


def _png_shape(path):
    blob = Path(path).read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(blob):
        (n,) = struct.unpack(">I", blob[pos : pos + 4])
        tag, data, crc = blob[pos + 4 : pos + 8], blob[pos + 8 : pos + 8 + n], blob[pos + 8 + n :]
        assert struct.unpack(">I", crc[:4])[0] == zlib.crc32(tag + data) & 0xFFFFFFFF
        chunks[tag] = chunks.get(tag, b"") + data
        pos += 12 + n
    w, h = struct.unpack(">II", chunks[b"IHDR"][:8])
    raw = zlib.decompress(chunks[b"IDAT"])
    assert len(raw) == h * (1 + 3 * w)
    return h, w


def test_inspect(tmp_path):
    classes, items, missing = cv.layout_hmdb51(*HMDB, split_id=1)
    cv.convert("hmdb51", tmp_path, classes=classes, items=items, missing=missing, shards="2",
               workers=1, quiet=True, short_side=32)
    r = run("data_prep.inspect", str(tmp_path), "--frames", "4")
    assert r.returncode == 0, r.stderr
    assert "[train] 3 videos in 2 shards" in r.stdout and "skipped at conversion: 1" in r.stdout
    assert "classes (3): brush_hair 1, cartwheel 1, wave 1" in r.stdout
    h, w = _png_shape(tmp_path / "contact-train.png")
    assert h == 2 + 3 * (32 + 2) and w == 2 + 4 * (43 + 2)  # 320x240 at short side 32: 43x32
    r = run("data_prep.inspect", str(tmp_path / "nope"))
    assert r.returncode == 2 and "manifest" in r.stderr


def test_write_png_roundtrip(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    ins.write_png(tmp_path / "x.png", img)
    assert _png_shape(tmp_path / "x.png") == (5, 7)
