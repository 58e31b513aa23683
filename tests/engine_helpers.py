"""Helpers for engine tests: small models, an independent static backprop, a runner."""

from __future__ import annotations

import numpy as np

from ssmpi.engine.executor import Engine
from ssmpi.engine.topology import Placement, Topology
from ssmpi.nn import models, ops


def small_spec(L: int, width: int = 4, res: int = 8, classes: int = 3) -> models.ModelSpec:
    return models.tiny(num_classes=classes, units=L, width=width, resolution=res)


def make_engine(comm, L=4, mode="skip", fuse="concat", k=2, batch=2, seed=3, dtype=np.float32,
                replicas=1, spec=None, modules_per_unit=1, groups=None, **kw):
    spec = spec or small_spec(L)
    topo = Topology(spec, mode=mode, k=k, fuse=fuse, modules_per_unit=modules_per_unit)
    pl = Placement(topo.L, comm.Get_size(), replicas=replicas, groups=groups)
    kw.setdefault("optimizer", dict(name="sgd", lr=1e-2, momentum=0.9))
    return Engine(topo, pl, comm, batch=batch, seed=seed, dtype=dtype, **kw)


def static_backprop(topo: Topology, units: dict, x, labels):
    """Exact gradient of the *static* network on one frame, written without the engine.

    Unit l takes fuse(h_{l-1}, tau h_{l-2}, ..., tau h_{l-k}) (what Skip-Sideways computes
    when every frame is the same); the loss is softmax cross-entropy on h_L. Returns
    {l: flat gradient of unit l's parameters} (NumPy).
    """
    L = topo.L
    h, res, fres, taures = {}, {}, {}, {}
    for l in range(1, L + 1):
        if l == 1:
            gamma = x
        else:
            inb = topo.inbound(l)
            parts = [h[inb[0].src]]
            for e in inb[1:]:
                out_c = e.act_shape[-1] if topo.fuse == "add" else None
                if len(e.act_shape) == 3:
                    y, r = ops.tau_fwd(h[e.src], e.act_shape[:2], out_c)
                elif h[e.src].ndim == 4:  # image -> vector receiver: global max-pool
                    y, r = ops.tau_fwd(h[e.src], (1, 1), out_c)
                    y = y.reshape(y.shape[0], -1)
                else:
                    y, r = h[e.src], None
                taures[e.eid] = r
                parts.append(y)
            if len(parts) > 1:
                gamma, fres[l] = ops.fuse_fwd(parts, topo.fuse)
            else:
                gamma = parts[0]
        h[l], res[l] = units[l].forward(gamma)
    loss, lres = ops.softmax_xent_fwd(h[L], labels)
    dh = {L: ops.softmax_xent_bwd(lres, 1.0)}
    grads = {}
    for l in range(L, 0, -1):
        u = units[l]
        saved = u.grad.copy(), u.count
        u.grad[...] = 0
        dgamma, _ = u.backward(res[l], dh[l], need_dx=l > 1)
        grads[l] = np.array(u.grad, copy=True)
        u.grad[...], u.count = saved
        if l == 1:
            continue
        inb = topo.inbound(l)
        pieces = ops.fuse_bwd(fres[l], dgamma) if l in fres else [dgamma]
        for e, p in zip(inb, pieces):
            if e.kind == "shortcut" and taures[e.eid] is not None:
                if p.ndim == 2:
                    p = p.reshape(p.shape[0], 1, 1, p.shape[1])
                p = ops.tau_bwd(taures[e.eid], p)
            dh[e.src] = dh[e.src] + p if e.src in dh else p
    return grads, float(loss)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def gpipe_parameters(world, select, devices) -> dict:
    """GPipe (4 units, Sideways, on up to 4 ranks of ``world``) trained for 2 iterations on
    each of ``devices`` in turn; ``select(device)`` makes a device current and returns its
    array module. Returns {device: {unit: parameters}} on the pipeline's rank 0, {} elsewhere
    (the GPipe-on-a-device tests compare the devices' entries)."""
    from mpi4py import MPI

    from ssmpi import backend
    from ssmpi.baselines.gpipe import GPipe

    n = min(world.size, 4)
    sub = world.Split(0 if world.rank < n else MPI.UNDEFINED, world.rank)
    res = {}
    if sub != MPI.COMM_NULL:
        for dev in devices:
            xp = select(dev)
            topo = Topology(small_spec(4), mode="sideways")
            pl = Placement(topo.L, n)
            gp = GPipe(topo, pl, sub, batch=2, seed=3, optimizer=dict(name="adam", lr=1e-2),
                       xp=xp)
            first, last = pl.rank_of(1) == sub.rank, pl.rank_of(topo.L) == sub.rank
            for it in range(2):
                rng = np.random.default_rng(it)
                fr = rng.standard_normal((2, 6, 8, 8, 3)).astype(np.float32)
                gp.run_clip(6, fr if first else None, rng.integers(0, 3, 2) if last else None)
            res[dev] = gp.gather_parameters()
            backend.select("cpu")
        sub.Free()
    return res if world.rank == 0 else {}


def cupy_or_none():
    """CuPy where it sees a GPU, else None (the GPU tests skip on None); NumPy stays current."""
    from ssmpi import backend

    try:
        return backend.select("gpu")
    except backend.BackendError:
        return None
    finally:
        backend.select("cpu")
