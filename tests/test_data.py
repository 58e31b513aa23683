"""ssmpi.data: the shard reader (validation, sampling, augmentation, replicas, prefetch)."""

import itertools
import json
import shutil

import h5py
import numpy as np
import pytest

from data_prep import synthetic
from ssmpi import data
from ssmpi.data import (
    Batch,
    ClipLoader,
    DataError,
    montage_stream,
    open_dataset,
    video_key,
)

PARAMS = {"size": [16, 20], "frames": 12, "noise": 0.05, "subsample": 1, "seed": 3,
          "classes": 4, "speeds": [1], "square": 5}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A small dataset: 22 train videos (uneven over 4 shards), 7 test videos, 16x20."""
    out = tmp_path_factory.mktemp("ds")
    synthetic.generate("motion", out, splits={"train": 22, "test": 7}, params=PARAMS, shards=4,
                       compression="lzf", quiet=True)
    return out


@pytest.fixture
def copy(root, tmp_path):
    """A private copy of the dataset that a test may damage."""
    dst = tmp_path / "ds"
    shutil.copytree(root, dst)
    return dst


def raw_video(ds, v):
    s, k = ds._locate(v)
    with h5py.File(ds.shards[s], "r") as f:
        return f[video_key(k)][()]


def norm(x, mean=0.5, std=0.25):
    return ((x / 255.0 - mean) / std).astype(np.float32)


def one_line(e):
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------ dataset


def test_open_dataset_attributes(root):
    ds = open_dataset(root, "train")
    assert ds.num_videos == 22 and ds.num_classes == 4 and ds.task == "action"
    assert ds.class_names == ["right", "left", "down", "up"]
    assert ds.frame_shape == (16, 20, 3) and ds.uniform_shape
    assert [p.name for p in ds.shards] == [f"train-0000{i}-of-00004.h5" for i in range(4)]
    assert (ds.num_frames == 12).all()
    assert np.bincount(ds.labels, minlength=4).min() >= 1  # every class present


def test_every_video_once_across_replicas_eval(root):
    ds = open_dataset(root, "train")
    seen, lens = [], set()
    for r in range(3):
        ld = ClipLoader(ds, batch_size=4, clip_len=4, train=False, replica=r, n_replicas=3,
                        drop_last=False)
        lens.add(len(ld))
        for b in ld.epoch(0):
            assert b.frames.shape == (4, 4, 16, 20, 3)
            seen += [int(v) for v in b.video if v >= 0]
        ld.close()
    assert len(lens) == 1  # every replica yields the same number of batches
    assert sorted(seen) == list(range(22))


def test_replica_takes_shards_r_mod_R(root):
    ds = open_dataset(root, "train")
    ld = ClipLoader(ds, batch_size=2, clip_len=4, replica=1, n_replicas=2, need_frames=False)
    shard_of = {}
    for s, sh in enumerate(ds._shards):
        for k in range(sh.num_videos):
            shard_of[sh.first_video + k] = s
    vids = {int(v) for b in ld.epoch(0) for v in b.video}
    assert {shard_of[v] for v in vids} <= {1, 3}
    with pytest.raises(DataError, match="fewer than 5 replicas"):
        ClipLoader(ds, batch_size=2, clip_len=4, replica=0, n_replicas=5)


def test_train_epoch_same_length_all_replicas_covers_videos(root):
    ds = open_dataset(root, "train")
    # shards hold 6, 6, 5, 5 videos: replicas of 3 hold 11 (shards 0, 3), 6 and 5
    lds = [ClipLoader(ds, batch_size=2, clip_len=4, replica=r, n_replicas=3, need_frames=False)
           for r in range(3)]
    assert [len(ld) for ld in lds] == [5, 5, 5]  # 11 // 2 on every replica (lockstep)
    vids = [[int(v) for b in ld.epoch(0) for v in b.video] for ld in lds]
    assert len(set(vids[0])) == 10  # the largest replica drops its remainder of 1
    assert len(set(vids[1])) == 6 and len(vids[1]) == 10  # smaller ones top up with repeats
    assert len(set(vids[2])) == 5 and len(vids[2]) == 10
    assert not set(vids[0]) & set(vids[1]) and not set(vids[1]) & set(vids[2])


# ------------------------------------------------------------------ sampling


def test_eval_frames_are_normalised_raw_frames(root):
    ds = open_dataset(root, "test")
    ld = ClipLoader(ds, batch_size=3, clip_len=6, stride=2, train=False, drop_last=False)
    for b in ld.epoch(0):
        for i, v in enumerate(b.video):
            if v < 0:
                continue
            raw = raw_video(ds, int(v))
            start = (12 - 11) // 2  # span (6-1)*2+1 = 11, centred
            np.testing.assert_array_equal(b.frames[i], norm(raw[start : start + 11 : 2]))
            assert b.labels[i] == ds.labels[v]
    assert b.frames.dtype == np.float32 and b.labels.dtype == np.int64


def test_per_channel_normalisation_and_dtype(root):
    ds = open_dataset(root, "test")
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.4)
    ld = ClipLoader(ds, batch_size=1, clip_len=12, train=False, mean=mean, std=std,
                    dtype=np.float64)
    b = next(iter(ld.epoch(0)))
    raw = raw_video(ds, int(b.video[0]))
    want = (raw / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(b.frames[0], want, rtol=1e-12)
    assert b.frames.dtype == np.float64
    ld.close()


def test_random_crop_flip_consistent_with_raw(root):
    ds = open_dataset(root, "train")
    ld = ClipLoader(ds, batch_size=4, clip_len=5, crop=8, seed=7)
    flips = 0
    for b in itertools.islice(ld.epoch(2), 3):
        assert b.frames.shape == (4, 5, 8, 8, 3)
        for i, v in enumerate(b.video):
            raw = norm(raw_video(ds, int(v)))
            hits = []
            for start in range(12 - 5 + 1):
                for y in range(16 - 8 + 1):
                    for x in range(20 - 8 + 1):
                        win = raw[start : start + 5, y : y + 8, x : x + 8]
                        if np.array_equal(win, b.frames[i]):
                            hits.append(False)
                        elif np.array_equal(win[:, :, ::-1], b.frames[i]):
                            hits.append(True)
            assert hits, "sample is not a (flipped) crop of its video"
            flips += hits[0]
    assert 0 < flips < 12  # both flipped and unflipped samples occur


def test_centre_crop_eval(root):
    ds = open_dataset(root, "test")
    ld = ClipLoader(ds, batch_size=1, clip_len=12, crop=(8, 10), train=False)
    b = next(iter(ld.epoch(0)))
    raw = raw_video(ds, int(b.video[0]))
    np.testing.assert_array_equal(b.frames[0], norm(raw[:, 4:12, 5:15]))
    ld.close()


def test_scale_jitter_shape(root):
    ds = open_dataset(root, "train")
    ld = ClipLoader(ds, batch_size=4, clip_len=3, crop=8, scale_jitter=(1.0, 2.0))
    b = next(iter(ld.epoch(0)))
    assert b.frames.shape == (4, 3, 8, 8, 3) and np.isfinite(b.frames).all()
    ld.close()


def test_deterministic_and_rank_agreement(root):
    ds = open_dataset(root, "train")
    kw = dict(batch_size=4, clip_len=5, crop=8, seed=11)
    a = ClipLoader(ds, **kw)
    b = ClipLoader(ds, **kw)
    top = ClipLoader(ds, **kw, need_frames=False)  # the top unit: labels only
    none = ClipLoader(open_dataset(root, "train", validate=False), **kw, need_frames=False,
                      need_labels=False)
    for e in (0, 1):
        ba, bb, bt, bn = (list(x.epoch(e)) for x in (a, b, top, none))
        assert len(ba) == len(bt) == len(bn) == len(a)
        for x, y, t, n in zip(ba, bb, bt, bn):
            np.testing.assert_array_equal(x.frames, y.frames)
            np.testing.assert_array_equal(x.video, t.video)
            np.testing.assert_array_equal(x.video, n.video)
            np.testing.assert_array_equal(x.labels, t.labels)
            assert t.frames is None and n.frames is None and n.labels is None
    e0 = np.concatenate([x.video for x in a.epoch(0)])
    e1 = np.concatenate([x.video for x in a.epoch(1)])
    assert not np.array_equal(e0, e1)  # a new order each epoch


def test_rank_with_no_data_opens_nothing(root, monkeypatch):
    ds = open_dataset(root, "train", validate=False)

    def boom(path):
        raise AssertionError(f"opened {path}")

    monkeypatch.setattr(data, "_h5open", boom)
    ld = ClipLoader(ds, batch_size=4, clip_len=5, need_frames=False, need_labels=False)
    bs = list(ld.epoch(0))
    assert len(bs) == 5 and all(b.frames is None and b.labels is None for b in bs)
    assert isinstance(bs[0], Batch) and bs[0].index == 0


def test_extra_frames_for_prediction_targets(root):
    ds = open_dataset(root, "test")
    ld = ClipLoader(ds, batch_size=2, clip_len=4, extra_frames=8, train=False)
    b = next(iter(ld.epoch(0)))
    assert b.frames.shape == (2, 12, 16, 20, 3)
    np.testing.assert_array_equal(b.frames[0], norm(raw_video(ds, int(b.video[0]))))
    ld.close()


@pytest.mark.parametrize("policy", ["loop", "pad"])
def test_short_video_policies(root, policy):
    ds = open_dataset(root, "test")
    ld = ClipLoader(ds, batch_size=1, clip_len=8, stride=2, train=False, short_policy=policy)
    b = next(iter(ld.epoch(0)))
    raw = norm(raw_video(ds, int(b.video[0])))
    idx = np.arange(8) * 2
    idx = idx % 12 if policy == "loop" else np.minimum(idx, 11)
    np.testing.assert_array_equal(b.frames[0], raw[idx])
    ld.close()


def test_short_policy_skip(root):
    ds = open_dataset(root, "test")
    with pytest.raises(DataError, match="no usable videos"):
        ClipLoader(ds, batch_size=1, clip_len=13, short_policy="skip")
    ld = ClipLoader(ds, batch_size=1, clip_len=12, short_policy="skip")
    assert ld.skipped_short == 0 and len(ld) == 7


def test_clip_longer_than_video_error_names_file_and_video(root):
    ds = open_dataset(root, "test")
    with pytest.raises(DataError) as e:
        ClipLoader(ds, batch_size=1, clip_len=13, short_policy="error")
    msg = one_line(e)
    assert "test-00000-of-00004.h5: video 0" in msg and "12 frames" in msg


def test_prefetch_wait_time_and_early_stop(root):
    ds = open_dataset(root, "train")
    ld = ClipLoader(ds, batch_size=2, clip_len=4, prefetch=1)
    it = ld.epoch(0)
    next(it)
    it.close()  # stop mid-epoch: the thread must end
    assert ld._thread is None
    for _ in ld.epoch(1):
        pass
    assert isinstance(ld.wait_time, float) and ld.wait_time >= 0
    ld.close()


def test_prefetch_runs_into_next_epoch_and_restarts_cleanly(root):
    ds = open_dataset(root, "train")
    kw = dict(batch_size=4, clip_len=3, crop=8, seed=2, prefetch=2)
    a, fresh = ClipLoader(ds, **kw), ClipLoader(ds, **kw)
    list(a.epoch(0))
    assert a._thread is not None and a._next == 1  # already preparing epoch 1
    for e in (1, 4, 2):  # continue, then jump (restart), then jump back
        for x, y in zip(a.epoch(e), fresh.epoch(e)):
            np.testing.assert_array_equal(x.frames, y.frames)
            np.testing.assert_array_equal(x.video, y.video)
    a.close()
    fresh.close()
    assert a._thread is None


def test_montage_stream(root):
    ds = open_dataset(root, "train")
    ld = ClipLoader(ds, batch_size=3, clip_len=6, seed=5)
    batches = list(ld.epoch(0)) + list(ld.epoch(1))
    steps = list(montage_stream(ld, min_len=2, max_steps=30))
    assert steps[0].cut.all() and steps[0].frames.shape == (3, 16, 20, 3)
    for i in range(3):  # lane i plays sample i of batch 0, 1, ...: cuts between clips
        cuts = [s.step for s in steps if s.cut[i]]
        assert len(cuts) >= 5
        for j, (c0, c1) in enumerate(zip(cuts, cuts[1:])):
            assert 2 <= c1 - c0 <= 6
            for t in range(c0, c1):
                np.testing.assert_array_equal(steps[t].frames[i], batches[j].frames[i, t - c0])
                assert steps[t].labels[i] == batches[j].labels[i]
                assert steps[t].video[i] == batches[j].video[i]
    top = ClipLoader(ds, batch_size=3, clip_len=6, seed=5, need_frames=False)
    for s, t in zip(steps, montage_stream(top, min_len=2, max_steps=30)):
        np.testing.assert_array_equal(s.labels, t.labels)
        np.testing.assert_array_equal(s.cut, t.cut)
        assert t.frames is None


def test_fewer_videos_than_a_batch(root):
    ds = open_dataset(root, "test")
    with pytest.raises(DataError, match="fewer than batch_size=8"):
        ClipLoader(ds, batch_size=8, clip_len=2)
    ld = ClipLoader(ds, batch_size=8, clip_len=2, drop_last=False, train=False)
    (b,) = list(ld.epoch(0))
    assert sorted(b.video[b.video >= 0]) == list(range(7)) and b.video[7] == -1
    ld.close()


def test_crop_none_needs_uniform_size_and_crop_must_fit(root):
    ds = open_dataset(root, "train")
    with pytest.raises(DataError) as e:
        ClipLoader(ds, batch_size=1, clip_len=2, crop=17)
    assert "train-0000" in one_line(e) and "smaller than the crop" in str(e.value)


# ------------------------------------------------------------------ bad input


def test_missing_manifest(tmp_path):
    with pytest.raises(DataError) as e:
        open_dataset(tmp_path, "train")
    assert "manifest.json" in one_line(e)


def test_missing_split(root):
    with pytest.raises(DataError, match="no split 'val'"):
        open_dataset(root, "val")


def test_missing_shard_file(copy):
    (copy / "train-00002-of-00004.h5").unlink()
    with pytest.raises(DataError) as e:
        open_dataset(copy, "train")
    assert "train-00002-of-00004.h5" in one_line(e) and "missing" in str(e.value)


def test_truncated_hdf5(copy):
    p = copy / "train-00001-of-00004.h5"
    blob = p.read_bytes()
    p.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError) as e:
        open_dataset(copy, "train")
    assert "train-00001-of-00004.h5" in one_line(e)


def test_garbled_hdf5_header(copy):
    p = copy / "test-00003-of-00004.h5"
    blob = bytearray(p.read_bytes())
    blob[:64] = b"\x17" * 64
    p.write_bytes(bytes(blob))
    with pytest.raises(DataError) as e:
        open_dataset(copy, "test")
    assert "test-00003-of-00004.h5" in one_line(e)


def test_garbled_frame_chunk_names_file_and_video(copy):
    p = copy / "test-00000-of-00004.h5"
    with h5py.File(p, "r") as f:
        info = f[video_key(1)].id.get_chunk_info(0)  # first frame of video 1
        source = f["index/source"][1].decode()
    blob = bytearray(p.read_bytes())
    for i in range(info.byte_offset, info.byte_offset + info.size):
        blob[i] ^= 0xA5  # flip bits (the per-chunk fletcher32 checksum must catch it)
    p.write_bytes(bytes(blob))
    ds = open_dataset(copy, "test")  # metadata is intact: opens
    ld = ClipLoader(ds, batch_size=2, clip_len=12, train=False, drop_last=False)
    with pytest.raises(DataError) as e:
        list(ld.epoch(0))  # raised in the prefetch thread, re-raised here
    msg = one_line(e)
    assert "test-00000-of-00004.h5: video 1" in msg and source in msg
    ld.close()


def test_manifest_count_mismatch(copy):
    m = json.loads((copy / "manifest.json").read_text())
    m["splits"]["train"]["shards"][3]["num_videos"] += 1
    m["splits"]["train"]["num_videos"] += 1
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError) as e:
        open_dataset(copy, "train")
    assert "train-00003-of-00004.h5" in one_line(e) and "num_videos" in str(e.value)


def test_shard_from_another_dataset(copy, tmp_path):
    other = tmp_path / "other"
    p = dict(PARAMS, seed=99)
    synthetic.generate("motion", other, splits={"train": 22}, params=p, shards=4, quiet=True)
    shutil.copy(other / "train-00002-of-00004.h5", copy / "train-00002-of-00004.h5")
    with pytest.raises(DataError) as e:
        open_dataset(copy, "train")
    assert "train-00002-of-00004.h5" in one_line(e) and "split_id" in str(e.value)


def _rewrite_video(path, k, arr):
    with h5py.File(path, "a") as f:
        del f[video_key(k)]
        f.create_dataset(video_key(k), data=arr)


def test_wrong_dtype_names_file_and_video(copy):
    p = copy / "train-00001-of-00004.h5"
    with h5py.File(p, "r") as f:
        arr = f[video_key(2)][()]
    _rewrite_video(p, 2, arr.astype(np.float32))
    ds = open_dataset(copy, "train")
    with pytest.raises(DataError) as e:
        ClipLoader(ds, batch_size=2, clip_len=4)
    msg = one_line(e)
    assert "train-00001-of-00004.h5: video 2" in msg and "float32" in msg
    # a labels-only rank does not read frames and is not stopped by it
    ClipLoader(ds, batch_size=2, clip_len=4, need_frames=False).close()


def test_wrong_shape_names_file_and_video(copy):
    p = copy / "train-00000-of-00004.h5"
    with h5py.File(p, "r") as f:
        arr = f[video_key(0)][()]
    _rewrite_video(p, 0, arr[:, :, :, 0])  # grey frames: (T, H, W)
    with pytest.raises(DataError) as e:
        ClipLoader(open_dataset(copy, "train"), batch_size=2, clip_len=4)
    assert "train-00000-of-00004.h5: video 0" in one_line(e) and "shape" in str(e.value)


def test_missing_video_dataset(copy):
    p = copy / "train-00000-of-00004.h5"
    with h5py.File(p, "a") as f:
        del f[video_key(4)]
    with pytest.raises(DataError) as e:
        ClipLoader(open_dataset(copy, "train"), batch_size=2, clip_len=4)
    assert "train-00000-of-00004.h5: video 4" in one_line(e)


def test_dataerror_is_valueerror():
    assert issubclass(DataError, ValueError)
