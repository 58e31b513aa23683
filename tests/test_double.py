"""The device-array double (ssmpi.backend_double) and the GPU code paths it exercises on the CPU.

The double's rules are CUDA's (a device array is no host buffer; host <-> device copies are
done at a synchronisation); these tests check the rules themselves, then that ssmpi keeps
them: the engine, the trainer and the helpers give NumPy's numbers bitwise on the double,
and the double catches the GPU defects of issue 14 in the code from before the fix.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from engine_helpers import make_engine
from mpi4py import MPI
from train_helpers import ENV, base_args, make_motion, run_train

from ssmpi import backend, program
from ssmpi import backend_double as dd
from ssmpi.engine.reducer import GradientReducer
from ssmpi.engine.transport import Comm, Link
from ssmpi.nn import layers, ops
from ssmpi.trace import Tracer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "double_check.py"


@pytest.fixture
def double():
    yield backend.select("double")
    backend.select("cpu")


def _pinned(shape, value):
    mem = dd.cuda.alloc_pinned_memory(int(np.prod(shape)) * 4)
    a = np.frombuffer(mem, np.float32, int(np.prod(shape))).reshape(shape)
    a[...] = value
    return a


# -- the rules --------------------------------------------------------------------------------
def test_mpi_refuses_device_arrays(double):
    """What a CuPy array does to an MPI that is not CUDA-aware (crash, garbage) is a clear
    TypeError here: every MPI call that touches a device buffer fails."""
    d = dd.zeros(4, np.float32)
    comm = MPI.COMM_SELF
    for call in (lambda: comm.Isend(d, dest=0, tag=7), lambda: comm.Irecv(d, source=0, tag=7),
                 lambda: comm.Iallreduce(MPI.IN_PLACE, d, op=MPI.SUM),
                 lambda: comm.Isend([d, MPI.FLOAT], dest=0, tag=7)):
        with pytest.raises(TypeError):
            call()


def test_no_implicit_host_conversion(double):
    d = dd.ones((2, 3), np.float32)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(d)
    with pytest.raises(TypeError, match="host array in a device operation"):
        d + np.ones(3, np.float32)
    with pytest.raises(TypeError, match="host array in a device operation"):
        dd.matmul(d, np.ones((3, 2), np.float32))
    assert isinstance(np.exp(d), dd.ndarray)  # numpy functions dispatch to the device
    assert isinstance(d.sum(), dd.ndarray) and float(d.sum()) == 6.0  # a 0-d device array
    assert np.array_equal(d.get(), np.ones((2, 3), np.float32))


def test_host_to_device_copy_is_done_at_synchronize(double):
    h = _pinned((2, 3), 7.0)
    d = dd.zeros((2, 3), np.float32)
    d.set(h)
    assert not d._a.any()  # queued: the device array still holds its old value
    dd.cuda.get_current_stream().synchronize()
    assert (d._a == 7).all()
    # the host buffer reused before the copy ran (the next receive into a staging buffer)
    d.set(h)
    h[...] = 1.0
    with pytest.raises(dd.HazardError, match="reused without synchronize"):
        dd.cuda.get_current_stream().synchronize()
    assert (d._a == 1).all()  # and the device got the wrong data
    # asarray() from page-locked memory: usable at once, but the source must wait too
    src = _pinned((2, 3), 2.0)
    e = dd.asarray(src)
    assert float(e.sum()) == 12.0  # a synchronisation: the copy is done
    e = dd.asarray(src)
    src[...] = 0
    with pytest.raises(dd.HazardError, match="given to asarray"):
        backend.synchronize()
    # pageable memory is staged before the copy call returns
    p = np.full((2, 3), 5.0, np.float32)
    d.set(p)
    p[...] = 0
    backend.synchronize()
    assert (d._a == 5).all()


def test_device_to_host_copy(double):
    d = dd.full((3,), 2.0, np.float32)
    h = np.zeros(3, np.float32)
    backend.copy_to_host(d, h, blocking=False)
    assert not h.any()  # queued
    d += 1  # later kernels do not change what the queued copy reads (stream order)
    backend.synchronize()
    assert (h == 2).all()
    backend.copy_to_host(d, h)  # blocking: complete on return
    assert (h == 3).all()
    out = dd.zeros(3, np.float32)
    backend.copy_to_device(_pinned((3,), 4.0), out)
    assert not out._a.any()
    backend.synchronize(out)
    assert (out._a == 4).all()


def test_select_double(monkeypatch):
    assert backend.select("double") is dd
    assert backend.is_gpu() and backend.on_device()
    assert backend.device_name().startswith("double")
    buf = backend.pinned_empty((2, 2), np.float32)
    assert dd._is_pinned(buf)
    monkeypatch.setenv("SSMPI_DEVICE", "double")
    assert backend.select("auto") is dd  # the config's default follows the environment
    assert backend.select("cpu") is np
    assert not backend.on_device()
    monkeypatch.setenv("SSMPI_DEVICE", "tpu")
    with pytest.raises(backend.BackendError, match="not one of auto, cpu, gpu, double"):
        backend.select()
    backend.select("cpu")


def test_nccl_needs_a_gpu(double):
    with pytest.raises(backend.BackendError, match="needs CuPy on an NVIDIA GPU"):
        backend.check_nccl()
    with pytest.raises(ValueError, match="allreduce mode 'mpi'"):
        GradientReducer(None, mode="mpi")
    assert GradientReducer(None, cuda_aware=True).mode == "cuda_aware"
    assert GradientReducer(None).mode == "host"


def test_cuda_aware_link_hands_device_buffers_to_mpi(double):
    """cuda_aware=True: device arrays go to MPI unstaged (which this MPI refuses); the
    default stages them through page-locked host buffers (a self-send here)."""
    comm = Comm(MPI.COMM_SELF)
    raw = Link(comm, 0, (2, 3), np.float32, dd, cuda_aware=True)
    with pytest.raises(TypeError):
        raw.send(dd.ones((2, 3), np.float32), tag=5)
    link = Link(comm, 0, (2, 3), np.float32, dd)
    out = dd.zeros((2, 3), np.float32)
    r = link.post_recv(out, tag=5)
    s = link.send(dd.full((2, 3), 3.0, np.float32), tag=5, slot=1)
    comm.wait([r, s], "self-send")
    link.finish(out)
    assert (out.get() == 3).all()


# -- the engine, the ops and the helpers on the double -----------------------------------------
@pytest.mark.parametrize("mode,fuse,stream", [("skip", "concat", False), ("skip", "add", True),
                                              ("sideways", "concat", False)])
def test_serial_engine_on_double_is_numpy_bitwise(mode, fuse, stream):
    out = {}
    for dev in ("cpu", "double"):
        xp = backend.select(dev)
        eng = make_engine(MPI.COMM_SELF, L=4, mode=mode, fuse=fuse, update_every=3, xp=xp,
                          optimizer=dict(name="adam", lr=1e-2))
        T, losses, t = 10, [], 0
        if stream:
            eng.start_stream()
        for it in range(2):
            rng = np.random.default_rng(it)
            fr = rng.standard_normal((2, T, 8, 8, 3)).astype(np.float32)
            lab = rng.integers(0, 3, 2)
            if stream:
                for s in range(T):
                    t += 1
                    st = eng.stream_step(t, fr[:, s], lab)
                losses += list(st.losses)
            else:
                losses += list(eng.run_clip(T, fr, lab).losses)
        out[dev] = eng.parameters(), [float(v) for v in losses]
    backend.select("cpu")
    assert out["cpu"][1] == out["double"][1]
    for l, p in out["cpu"][0].items():
        assert np.array_equal(p, out["double"][0][l]), l


def test_timers_synchronize_on_a_device(double):
    """Trace spans and the engine's compute time wait for the kernels (GPU: asynchronous)."""
    tr = Tracer(0)
    dd.reset_counters()
    with tr.span("x"):
        pass
    assert dd.counters["sync"] == 2
    backend.select("cpu")
    dd.reset_counters()
    with Tracer(0).span("x"):
        pass
    assert dd.counters["sync"] == 0
    xp = backend.select("double")
    eng = make_engine(MPI.COMM_SELF, L=3, mode="sideways", xp=xp)
    assert eng.executor.sync_timing
    dd.reset_counters()
    eng.step(1, xp.zeros((2, 8, 8, 3), np.float32), None, send=False)
    assert dd.counters["sync"] >= 3  # one per unit at least


def test_conv_is_one_chunk_on_a_device(double, monkeypatch):
    """CPU: chunks of images that fit the cache; a GPU: one GEMM over the whole batch."""
    from ssmpi.nn.ops import conv

    monkeypatch.setattr(conv, "WINOGRAD", False)
    x = np.ones((16, 64, 64, 16), np.float32)  # 2.4 MB of columns per image
    w = np.ones((3, 3, 16, 8), np.float32)
    _, res = ops.conv2d_fwd(x, w, None, pad=1)
    assert res.plan.chunk < 16
    _, res = ops.conv2d_fwd(dd.asarray(x), dd.asarray(w), None, pad=1)
    assert res.plan.chunk == 16
    # ... and the Winograd path (3x3, stride 1, >= 16 input channels): M holds the tiles of
    # a chunk of images on the CPU, of all 16 on a device
    monkeypatch.setattr(conv, "WINOGRAD", True)
    tiles, w = 16 * 32 * 32, np.ones((3, 3, 16, 64), np.float32)  # M: 4 MB per image
    for arr, whole in ((np.asarray, False), (dd.asarray, True)):
        ws = {}
        y, _ = ops.conv2d_fwd(arr(x), arr(w), None, pad=1, ws=ws)
        assert (ws["wino_m"][1].shape[1] == tiles) == whole
        np.testing.assert_allclose(backend.asnumpy(y)[:, 1:-1, 1:-1], 144.0, rtol=1e-6)


def test_dropout_on_a_device(double):
    """NumPy: the mask of ops.dropout_fwd, bitwise as before; a device: a mask computed there
    from one key of the same generator (whose state the checkpoint keeps)."""
    x = np.ones((4, 256), np.float32)
    y, _ = layers.Dropout(0.25, seed=5).forward(x)
    y_ref, _ = ops.dropout_fwd(x, 0.25, rng=np.random.default_rng(5), train=True)
    assert np.array_equal(y, y_ref)
    lay = layers.Dropout(0.25, seed=5)
    state = json.loads(json.dumps(lay.rng.bit_generator.state))
    yd, res = lay.forward(dd.asarray(x))
    key = int(np.random.default_rng(5).integers(0, 2**64, dtype=np.uint64))
    keep = layers.device_uniform(np, x.shape, key) >= np.float32(0.25)
    assert np.array_equal(yd.get(), keep * np.float32(1 / 0.75))
    assert 0.2 < 1 - keep.mean() < 0.3
    dx, _ = lay.backward(res, dd.ones(x.shape, np.float32))
    assert np.array_equal(dx.get(), yd.get())
    y2, _ = lay.forward(dd.asarray(x))
    assert not np.array_equal(y2.get(), yd.get())  # a new mask every call
    lay.rng.bit_generator.state = state  # a resumed run draws the same masks
    assert np.array_equal(lay.forward(dd.asarray(x))[0].get(), yd.get())


# -- the device is bound before MPI starts ------------------------------------------------------
def test_early_device_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.delenv("SSMPI_DEVICE", raising=False)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[run]\ndevice = "cpu"\n')
    assert program.early_device([]) == "auto"
    assert program.early_device(["--config", str(cfg)]) == "cpu"
    assert program.early_device([f"--config={cfg}", "--set", "run.device=double"]) == "double"
    assert program.early_device(["--config", str(tmp_path / "missing.toml")]) == "auto"
    monkeypatch.setenv("SSMPI_DEVICE", "gpu")  # the command line wins, as in the config
    assert program.early_device(["--set", "run.device=cpu"]) == "cpu"
    assert program.early_device(["--set", "run.device=auto"]) == "gpu"


BIND_PROBE = """
import sys
from ssmpi import program, backend_double

def use(self, _use=backend_double.Device.use):
    from mpi4py import MPI
    sys.stdout.write(f"bind device {self.id} mpi_initialized={MPI.Is_initialized()}\\n")
    sys.stdout.flush()
    _use(self)

backend_double.Device.use = use

def body(comm, stopper):
    sys.stdout.write(f"rank {comm.rank} on device {backend_double.cuda.runtime.getDevice()}\\n")
    sys.stdout.flush()
    return 0

sys.exit(program.run("probe", body))
"""


def test_device_bound_before_mpi_init(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(BIND_PROBE)
    env = dict(ENV, SSMPI_DEVICE="double", SSMPI_DOUBLE_DEVICES="2")
    r = subprocess.run(["mpiexec", "-n", "2", sys.executable, str(probe)], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    binds = sorted(x for x in lines if x.startswith("bind"))
    assert binds[:2] == ["bind device 0 mpi_initialized=False",
                         "bind device 1 mpi_initialized=False"], r.stdout
    assert sorted(x for x in lines if x.startswith("rank")) == ["rank 0 on device 0",
                                                               "rank 1 on device 1"]


# -- the trainer on the double; the defects of the code before issue 14 -------------------------
def test_trainer_on_double_equals_cpu(tmp_path):
    """4 ranks = 2 replicas x 2: staged messages, the staged gradient all-reduce, checkpoint
    and evaluation on the double give the CPU run's losses bitwise."""
    data = make_motion(tmp_path / "data")
    losses = {}
    for dev in ("cpu", "double"):
        r = run_train(4, base_args(data, tmp_path, dev, "--set", "run.iterations=4", "--set",
                                   "engine.replicas=2", "--set", f"run.device={dev}", "--set",
                                   "run.checkpoint_every=2"), timeout=240)
        assert r.returncode == 0, r.stderr[-2000:]
        rows = [json.loads(x) for x in (tmp_path / dev / "metrics.jsonl").read_text()
                .splitlines()]
        losses[dev] = [x["loss"] for x in rows if "iteration" in x and "loss" in x]
        evals = [x["eval"] for x in rows if "eval" in x]
        losses[dev].append(evals[-1]["loss"])
    assert len(losses["cpu"]) == 5 and losses["cpu"] == losses["double"]


def _old_checkout(tmp_path):
    """The code before issue 14's fix (commit 44ee8b2), from this repository's history."""
    if not (shutil.which("git") and (ROOT / ".git").exists()):
        pytest.skip("no git checkout here")
    r = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", "44ee8b2^{commit}"],
                       capture_output=True, timeout=30)
    if r.returncode != 0:
        pytest.skip("commit 44ee8b2 is not in this clone (shallow?)")
    old = tmp_path / "old"
    old.mkdir()
    arch = subprocess.run(["git", "-C", str(ROOT), "archive", "44ee8b2", "ssmpi"],
                          capture_output=True, timeout=60, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=arch, check=True, timeout=60)
    return old


@pytest.mark.parametrize("defect,n,args,old_sign", [
    (1, 4, ["engine", "--replicas", "2"], "Iallreduce"),  # allreduce of a device buffer
    (2, 2, ["engine"], "FAILED: U"),  # async set into a staging buffer, no synchronize
    (3, 2, ["gpipe"], "Irecv"),  # raw Isend/Irecv of device arrays in GPipe
], ids=["1-allreduce", "2-staging", "3-gpipe"])
def test_double_catches_the_old_gpu_defects(tmp_path, defect, n, args, old_sign):
    """The same check fails on the code before the fix (wrong numbers, or MPI refusing a
    device array) and passes on this code."""
    old = _old_checkout(tmp_path)
    cmd = ["mpiexec", "-n", str(n), sys.executable, "-m", "mpi4py", str(SCRIPT), *args]
    r_old = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                           env=dict(ENV, PYTHONPATH=str(old)))
    assert r_old.returncode != 0, r_old.stdout
    assert old_sign in r_old.stdout + r_old.stderr
    r_new = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                           env=dict(ENV, PYTHONPATH=os.pathsep.join(
                               [str(ROOT), ENV.get("PYTHONPATH", "")])))
    assert r_new.returncode == 0, r_new.stdout + r_new.stderr[-2000:]
    assert "OK (bitwise equal to NumPy)" in r_new.stdout
