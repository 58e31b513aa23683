"""Lab 6: memory vs clip length, Skip-Sideways and exact backprop through time.

    python -m labs.memory --T 8 16 32 64

trains one clip of T frames per setting, in this process, and prints the peak memory
(``tracemalloc``: every NumPy allocation: parameters, optimizer state, message buffers,
activations and residuals) of

- ``skip``: the Skip-Sideways engine (all units on one rank: the serial executor; on more
  ranks each rank holds its share of the same buffers);
- ``bptt``: exact backprop through time of the same temporal model
  (:class:`ssmpi.engine.bptt.BPTT`), which keeps every step's residuals until its backward
  pass.

The input clip is allocated before measuring (it belongs to the data loader). The model:
``tiny`` with 4 units, width 16, 24x24 frames, batch 2 (``--width``, ``--res``,
``--batch`` change it).
"""

from __future__ import annotations

import argparse
import sys
import tracemalloc

import numpy as np

MIB = 2.0 ** 20


def measure(T: int, scheme: str, width: int = 16, res: int = 24, batch: int = 2) -> float:
    """Peak MiB allocated while training one clip of T frames (after a warm-up clip)."""
    from ssmpi import backend
    from ssmpi.engine.bptt import BPTT
    from ssmpi.engine.executor import Engine
    from ssmpi.engine.topology import Placement, Topology
    from ssmpi.engine.transport import as_comm
    from ssmpi.nn import models

    backend.select("cpu")
    spec = models.tiny(num_classes=4, units=4, width=width, resolution=res)
    topo = Topology(spec, mode="skip", k=2)
    frames = np.random.default_rng(0).standard_normal(
        (batch, T, res, res, 3)).astype(np.float32)
    labels = np.arange(batch) % 4
    opt = dict(name="sgd", lr=1e-3, momentum=0.9)
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    if scheme == "skip":
        comm = as_comm(None)
        if comm.size != 1:
            raise SystemExit("labs.memory: run it as one process (python -m labs.memory)")
        runner = Engine(topo, Placement(topo.L, 1), comm, batch=batch, optimizer=opt)
    elif scheme == "bptt":
        runner = BPTT(topo, optimizer=opt)
    else:
        raise ValueError(scheme)
    runner.run_clip(T, frames, labels)  # the first clip allocates workspaces and state
    runner.run_clip(T, frames, labels)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak / MIB


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labs.memory", description=__doc__.split(
        "\n\n")[0])
    ap.add_argument("--T", type=int, nargs="+", default=[8, 16, 32, 64],
                    help="clip lengths (default 8 16 32 64)")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--res", type=int, default=24)
    ap.add_argument("--batch", type=int, default=2)
    a = ap.parse_args(argv)
    if min(a.T) < 4:
        ap.error("--T: clips of at least 4 frames (the top unit of 4 units starts at step 4)")
    print(f"{'T':>5} {'skip MiB':>10} {'bptt MiB':>10}")
    for T in a.T:
        s = measure(T, "skip", a.width, a.res, a.batch)
        b = measure(T, "bptt", a.width, a.res, a.batch)
        print(f"{T:>5} {s:>10.2f} {b:>10.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
