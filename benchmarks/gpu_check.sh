#!/usr/bin/env bash
# The prepared GPU check of issue 14: one run of at most 10 minutes on a machine with an NVIDIA
# GPU (made for the H200 machine of the device tool: Python 3.12, PyTorch for CUDA 13,
# cupy-cuda13x, mpi4py, h5py, pytest, numpy; no MPI library, no pytest-mpi, no network).
#
#   bash benchmarks/gpu_check.sh OUTDIR          # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh OUTDIR --dry    # anywhere: every stage on the device-array
#                                                # double (SSMPI_DEVICE=double), tiny sizes
#
# Wheels. The machine has no network: the MPI library (the mpich wheel, with mpiexec), mpi4py
# built for the MPI ABI and pytest-mpi come along as wheels for Python 3.12, made beforehand
# where there is network by `bash benchmarks/gpu_wheels.sh` (into .whl/, which git ignores),
# that is by exactly:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux1_x86_64 -d .whl mpich==5.0.2 mpi4py==4.1.2 pytest-mpi==0.6
# and carried with the run (device tool: carry [".whl"]). They are installed with
# `pip install --no-index --no-deps --ignore-installed --prefix` into a private prefix (the
# mpich wheel's libmpi and mpiexec live in the prefix's lib/ and bin/, which `--target` would
# drop); the project itself is used from the checkout (PYTHONPATH, no install). SSMPI_WHEELS
# names another wheel folder.
#
# Stages, each under a timeout cut to what is left of the budget ($SSMPI_CHECK_SECONDS,
# default 560 s), so that the whole run ends inside a 600 s command; a stage that fails or
# runs out of time is recorded and the next one runs:
#   0  install the wheels; environment (nvidia-smi, versions); the demo's data (background)
#   1  GPU tests, one process (pytest -m gpu: tests/test_gpu.py, the ops and engine on CuPy)
#   2  is the MPI CUDA-aware? (tests/scripts/cuda_aware_probe.py in a subprocess; yes: the
#      cuda_aware tests run too, SSMPI_CUDA_AWARE=1)
#   3  GPU tests under mpiexec -n 2, 4 and 8 on the GPU(s) (tests/test_gpu_mpi.py), while the
#      CPU half of stage 6 trains in the background (correctness only, not timed)
#   4  conv fwd+dx+dw of VGG8's layers, batch 8: ssmpi's CuPy code vs PyTorch cuDNN, same card
#   5  Skip-Sideways VGG8 112x112, 8 ranks sharing the GPU: frames/s at batch 1 (traced) and 8
#   6  the demo (jobs/configs/demo_direction.toml, 8 ranks, 200 iterations) on the GPU vs the
#      same on the CPU: per-iteration losses of the first 50 iterations within 1e-4 relative
#   7  if time is left: stage 5's batch 1 with spinning waits (wait_mode block), and on the CPU
#
# Output in OUTDIR (5 files; the device tool returns at most 8): summary.txt (verdicts and
# figures), results.json (everything measured), log.txt (every command's output), trace.json
# and trace.png (stage 5, batch 1: a timeline whose spans are synchronised on the GPU).
set -u
cd "$(dirname "$0")/.."
REPO="$PWD"
OUT="${1:?usage: benchmarks/gpu_check.sh OUTDIR [--dry]}"
DRY=0
[ "${2:-}" = "--dry" ] && DRY=1
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d /tmp/ssmpi_gpu_check.XXXXXX)"
LOG="$OUT/log.txt"
: >"$LOG"
START=$(date +%s)
DEADLINE=$((START + ${SSMPI_CHECK_SECONDS:-560}))
PY="${PYTHON:-python3}"

export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1 CUPY_CACHE_DIR="$WORK/cupy_cache"
if [ "$DRY" = 1 ]; then
  DEV=double
  export SSMPI_DEVICE=double
else
  DEV=gpu
  export SSMPI_DEVICE=gpu
fi

log() { echo "[$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }
left() { echo $((DEADLINE - $(date +%s))); }

# stage NAME BUDGET CMD...: run CMD under min(BUDGET, time left); its output goes to the log;
# the outcome goes to $WORK/stages.tsv (name, exit code, seconds)
stage() {
  local name="$1" budget="$2"; shift 2
  local l; l=$(left)
  if [ "$l" -lt 15 ]; then
    log "== $name: SKIPPED (out of time)"
    printf '%s\tskipped\t0\n' "$name" >>"$WORK/stages.tsv"
    return 0
  fi
  [ "$budget" -gt "$l" ] && budget=$l
  log "== $name (timeout ${budget}s): $*"
  local t0; t0=$(date +%s)
  if [ "$(type -t "$1")" = function ]; then  # the stage functions below are exported
    timeout --signal=TERM --kill-after=10 "$budget" bash -c '"$@"' _ "$@" >>"$LOG" 2>&1
  else
    timeout --signal=TERM --kill-after=10 "$budget" "$@" >>"$LOG" 2>&1
  fi
  local rc=$?
  local dt=$(($(date +%s) - t0))
  log "== $name: exit $rc after ${dt}s"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$dt" >>"$WORK/stages.tsv"
  summarize
  return 0
}

summarize() {  # results.json and summary.txt from what the stages left in $WORK
  "$PY" - "$WORK" "$OUT" "$DEV" <<'PY' >>"$LOG" 2>&1
import json, re, sys
from pathlib import Path
work, out, dev = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
res = {"device": dev, "stages": [], "tests": {}}
st = work / "stages.tsv"
if st.exists():
    for line in st.read_text().splitlines():
        name, rc, s = line.split("\t")
        res["stages"].append({"stage": name, "exit": rc, "seconds": int(s)})
for p in sorted(work.glob("pytest_*.txt")):
    tail = [x for x in p.read_text().splitlines() if re.search(r"\d+ (passed|failed|error)", x)]
    res["tests"][p.stem[len("pytest_"):]] = tail[-1].strip("= ") if tail else "no summary"
for p in sorted(work.glob("*.json")):
    try:
        res[p.stem] = json.loads(p.read_text())
    except Exception as e:
        res[p.stem] = f"unreadable: {e}"
env = work / "env.txt"
lines = [f"ssmpi GPU check ({'DRY RUN on the device double: no GPU figures' if dev != 'gpu' else 'GPU'})"]
if env.exists():
    lines += ["", env.read_text().strip()]
lines += ["", "stages:"] + [f"  {s['stage']:<28} exit {s['exit']:<8} {s['seconds']:>4} s"
                            for s in res["stages"]]
lines += ["", "tests:"] + [f"  {k:<20} {v}" for k, v in res["tests"].items()]
ca = work / "cuda_aware.txt"
if ca.exists():
    lines += ["", "CUDA-aware MPI: " + ca.read_text().strip()]
for key in ("conv", "fps_b1", "fps_b8", "losses", "fps_b1_block", "fps_b1_cpu"):
    v = res.get(key)
    if isinstance(v, dict) and "text" in v:
        lines += ["", v["text"]]
(out / "results.json").write_text(json.dumps(res, indent=1))
(out / "summary.txt").write_text("\n".join(lines) + "\n")
PY
}

# -- 0. install and environment ----------------------------------------------------------------
WHEELS="${SSMPI_WHEELS:-$REPO/.whl}"
PREFIX="$WORK/prefix"
install_wheels() {
  local ok=1
  for w in "$WHEELS"/*.whl; do
    [ -e "$w" ] || { echo "no wheels in $WHEELS"; return 1; }
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --ignore-installed --prefix "$PREFIX" "$w"; then
      echo "could not install $(basename "$w")"
      ok=0
    fi
  done
  [ "$ok" = 1 ]
}
export PY WORK DRY DEV WHEELS PREFIX
export -f install_wheels
if [ -d "$WHEELS" ]; then
  stage "install wheels" 60 install_wheels
  SITE=$(ls -d "$PREFIX"/lib/python3*/site-packages 2>/dev/null | head -1)
  export PATH="$PREFIX/bin:$PATH" LD_LIBRARY_PATH="$PREFIX/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export PYTHONPATH="$REPO${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
else
  log "no wheel folder $WHEELS: using the MPI and packages already installed"
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

{
  echo "host: $(hostname), $(nproc) CPUs, $(date -u '+%Y-%m-%d %H:%M UTC'), git $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    | sed 's/^/gpu: /' || echo "gpu: nvidia-smi not found"
  "$PY" - <<'PY'
import importlib, sys
print("python", sys.version.split()[0])
for m in ("numpy", "cupy", "torch", "mpi4py", "h5py", "pytest"):
    try:
        print(f"{m} {importlib.import_module(m).__version__}")
    except Exception as e:
        print(f"{m}: {type(e).__name__}: {e}")
try:
    from mpi4py import MPI
    print("MPI:", MPI.Get_library_version().splitlines()[0])
except Exception as e:
    print("MPI: not usable:", e)
from ssmpi import backend
try:
    backend.select(); backend.bind_local_device(); print("ssmpi device:", backend.device_name())
except Exception as e:
    print("ssmpi device: error:", e)
PY
  echo "mpiexec: $(command -v mpiexec || echo missing)"
} >"$WORK/env.txt" 2>&1
cat "$WORK/env.txt" >>"$LOG"
summarize

# the demo's data, in the background (the demo's generator; 1024 training videos instead of
# 2048 and 64 test videos: the check compares losses, not accuracy)
DATA="$WORK/data"
if [ "$DRY" = 1 ]; then
  DATA_ARGS="--size 16 --classes 2 --speeds 2 --square 8 --noise 0.02 --frames 16 --videos 64 --test-videos 16"
  ITERS=20; DEMO_RANKS=4
else
  DATA_ARGS="--size 16 --classes 2 --speeds 2 --square 8 --noise 0.02 --frames 16 --videos 1024 --test-videos 64"
  ITERS=200; DEMO_RANKS=8
fi
( "$PY" -m data_prep.synthetic motion "$DATA" $DATA_ARGS --quiet >"$WORK/data.log" 2>&1 ) &
DATA_PID=$!

# -- 1. GPU tests, one process -------------------------------------------------------------
gpu_tests_serial() {
  if [ "$DRY" = 1 ]; then  # no GPU: the same command (GPU tests skip), and the double's tests
    "$PY" -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/test_gpu.py \
      tests/test_double.py -k "not old_gpu_defects and not trainer" 2>&1 | tee "$WORK/pytest_serial.txt"
  else
    "$PY" -m pytest -q -p no:cacheprovider --timeout=120 -m gpu tests/test_gpu.py \
      tests/test_engine.py tests/test_ops_conv.py tests/test_ops_fuse.py tests/test_ops_misc.py \
      tests/test_ops_pool.py tests/test_backend.py 2>&1 | tee "$WORK/pytest_serial.txt"
  fi
  return "${PIPESTATUS[0]}"
}
export -f gpu_tests_serial
stage "GPU tests (1 process)" 150 gpu_tests_serial

# -- 2. CUDA-aware MPI? ----------------------------------------------------------------------
probe() {
  if [ "$DRY" = 1 ]; then
    echo "not probed (dry run: no GPU)" >"$WORK/cuda_aware.txt"
    return 0
  fi
  if timeout 60 mpiexec -n 2 "$PY" tests/scripts/cuda_aware_probe.py >"$WORK/probe.txt" 2>&1 \
      && grep -q "cuda_aware: yes" "$WORK/probe.txt"; then
    echo "yes (the cuda_aware tests run)" >"$WORK/cuda_aware.txt"
  else
    echo "no (probe: $(tail -c 300 "$WORK/probe.txt" | tr '\n' ' '); the cuda_aware tests are skipped)" >"$WORK/cuda_aware.txt"
  fi
  cat "$WORK/probe.txt"
}
export -f probe
stage "CUDA-aware probe" 75 probe
grep -q "^yes" "$WORK/cuda_aware.txt" 2>/dev/null && export SSMPI_CUDA_AWARE=1

# -- 6a. the demo on the CPU, in the background during the MPI tests ---------------------------
wait "$DATA_PID"
demo() {  # demo DEVICE NAME
  mpiexec -n "$DEMO_RANKS" "$PY" -m ssmpi.train --config jobs/configs/demo_direction.toml \
    --set engine.mode=skip --set run.iterations="$ITERS" --set run.device="$1" \
    --set run.name="$2" --set run.out_dir="$WORK/runs" --set data.root="$DATA" \
    --set run.progress=false --set run.eval_batches=1 --set run.checkpoint_every=0
}
export DEMO_RANKS ITERS DATA
export -f demo
T_CPU=$(date +%s)
CPU_LIMIT=$(($(left) - 40))
[ "$CPU_LIMIT" -gt 400 ] && CPU_LIMIT=400
CPU_PID=""
if [ "$CPU_LIMIT" -ge 30 ]; then
  ( SSMPI_DEVICE=cpu timeout --kill-after=10 "$CPU_LIMIT" bash -c 'demo cpu cpu' \
      >"$WORK/demo_cpu.log" 2>&1
    echo "exit $? after $(($(date +%s) - T_CPU))s" >>"$WORK/demo_cpu.log" ) &
  CPU_PID=$!
else
  echo "not run: out of time" >"$WORK/demo_cpu.log"
fi

# -- 3. GPU tests under mpiexec -------------------------------------------------------------
mpi_tests() {  # mpi_tests N
  local files=tests/test_gpu_mpi.py
  [ "$DRY" = 1 ] && files="tests/test_gpu_mpi.py tests/test_double_mpi.py"
  mpiexec -n "$1" "$PY" -m mpi4py -m pytest -q -p no:cacheprovider --with-mpi -m mpi \
    $files 2>&1 | tee "$WORK/pytest_mpi_n$1.txt"
  return "${PIPESTATUS[0]}"
}
export -f mpi_tests
stage "GPU tests, mpiexec -n 2" 90 mpi_tests 2
stage "GPU tests, mpiexec -n 4" 100 mpi_tests 4
stage "GPU tests, mpiexec -n 8" 120 mpi_tests 8

# -- 4. conv vs cuDNN -------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then CONV="--width 0.0625 --res 28 --batch 2 --repeat 2"; else CONV="--repeat 10"; fi
stage "conv vs cuDNN" 90 "$PY" benchmarks/gpu_bench.py conv --device "$DEV" $CONV --out "$WORK/conv.json"

# -- 5. frames/s, 8 ranks ----------------------------------------------------------------------
if [ "$DRY" = 1 ]; then FPS="--width 0.0625 --res 32 --T 4 --iters 1 --ranks 4"; else FPS="--ranks 8"; fi
stage "frames/s batch 1" 100 "$PY" benchmarks/gpu_bench.py fps --device "$DEV" $FPS --batch 1 \
  --trace "$OUT/trace.json" --out "$WORK/fps_b1.json"
stage "frames/s batch 8" 100 "$PY" benchmarks/gpu_bench.py fps --device "$DEV" $FPS --batch 8 \
  --out "$WORK/fps_b8.json"

# -- 6b. the demo on the GPU; the losses against the CPU's ------------------------------------
stage "demo on the $DEV ($ITERS it.)" 150 demo "$DEV" "$DEV"
log "waiting for the demo on the CPU (its own timeout: ${CPU_LIMIT}s from its start)"
[ -n "$CPU_PID" ] && wait "$CPU_PID"
cat "$WORK/demo_cpu.log" >>"$LOG"
stage "demo: losses vs the CPU" 30 "$PY" benchmarks/gpu_bench.py losses \
  "$WORK/runs/$DEV/metrics.jsonl" "$WORK/runs/cpu/metrics.jsonl" --n "$((ITERS < 50 ? ITERS : 50))" \
  --rtol 1e-4 --out "$WORK/losses.json"

# -- 7. if time is left: batch 1 with spinning waits, and the same on the CPU (a ratio) ---------
stage "frames/s batch 1, wait block" 90 "$PY" benchmarks/gpu_bench.py fps --device "$DEV" $FPS \
  --batch 1 --wait-mode block --out "$WORK/fps_b1_block.json"
stage "frames/s batch 1 on the CPU" 90 "$PY" benchmarks/gpu_bench.py fps --device cpu $FPS \
  --batch 1 --iters 1 --out "$WORK/fps_b1_cpu.json"

summarize
log "done: $OUT/summary.txt"
cat "$OUT/summary.txt"
rm -rf "$WORK"
