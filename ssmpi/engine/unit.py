"""One unit U_l at run time: its layers, parameters, gradient accumulator.

Parameters and gradients live in flat vectors (``theta``, ``grad``) and every layer's
parameter is a view into them: the optimizer, the data-parallel allreduce and checkpoints
each touch one contiguous buffer per unit.

Shapes: gamma (N, *in_shape) -> h (N, *out_shape); theta, grad (P,) with P parameters.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np

from .. import backend
from ..nn import ops
from .topology import Topology


def unit_seed(seed: int, l: int) -> np.random.Generator:
    """The parameter RNG of unit l: depends on the seed and l only, never on placement."""
    return np.random.default_rng([int(seed), 7919, int(l)])


class Unit:
    """U_l with parameters drawn from ``unit_seed(seed, l)``, on the selected device."""

    def __init__(self, topo: Topology, l: int, seed: int = 0, dtype=np.float32, xp=None):
        self.l, self.topo = l, topo
        self.xp = backend.xp() if xp is None else xp
        self.dtype = np.dtype(dtype)
        self.in_shape, self.out_shape = topo.in_shapes[l], topo.out_shapes[l]
        self.layers = topo.unit_layers(l, seed=seed)
        rng = unit_seed(seed, l)
        shape = self.in_shape
        for layer in self.layers:
            shape = layer.build(shape, rng, self.dtype)
        assert shape == self.out_shape, (shape, self.out_shape)
        # flat parameter vector; layer params become views into it
        self.names: List[Tuple[int, str]] = []
        host = []
        for i, layer in enumerate(self.layers):
            for name, p in layer.params.items():
                self.names.append((i, name))
                host.append(np.asarray(p, dtype=self.dtype).ravel())
        self.size = int(sum(h.size for h in host))
        self.theta = self.xp.asarray(np.concatenate(host) if host else
                                     np.zeros(0, self.dtype))
        self.grad = self.xp.zeros_like(self.theta)  # accumulated over valid steps
        self.count = 0  # valid steps accumulated since the last update
        self._grad_views = {}
        off = 0
        for (i, name), h in zip(self.names, host):
            shp = self.layers[i].params[name].shape
            n = int(math.prod(shp))
            self.layers[i].params[name] = self.theta[off:off + n].reshape(shp)
            self._grad_views[(i, name)] = self.grad[off:off + n].reshape(shp)
            off += n

    # -- forward / VJP ----------------------------------------------------------------
    def forward(self, gamma, train: bool = True):
        """H_l(gamma; theta_l): gamma (N, *in_shape) -> (h (N, *out_shape), residuals)."""
        res = []
        x = gamma
        for layer in self.layers:
            x, r = layer.forward(x, train)
            res.append(r)
        return x, res

    def backward(self, res, c, need_dx: bool = True, accumulate: bool = True,
                 record: bool = False):
        """VJP at the current input with cotangent ``c``: returns (d gamma or None, step grad).

        With ``accumulate`` the parameter gradient is added to ``self.grad`` (equation 5)
        and the valid-step count grows by one. ``step grad`` is a flat copy of this step's
        gradient when ``record`` (tests), else None.
        """
        dy = c
        step = self.xp.zeros_like(self.theta) if record else None
        offs = self._offsets() if record else None
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            nd = need_dx or i > 0
            dy, grads = layer.backward(res[i], dy, need_dx=nd)
            for name, g in grads.items():
                if accumulate:
                    self._grad_views[(i, name)] += g
                if record:
                    o, n = offs[(i, name)]
                    step[o:o + n] = g.ravel()
        if accumulate:
            self.count += 1
        return (dy if need_dx else None), step

    # -- the edges' maps, as the unit step sees them (``step.py``) ----------------------
    def fuse_fwd(self, parts):
        """fuse(a_direct, a_shortcut, ...) (eq. 1): concat or add -> (gamma, residuals)."""
        return ops.fuse_fwd(parts, self.topo.fuse)

    def fuse_bwd(self, fres, dgamma):
        """VJP of fuse: d gamma -> one pseudo-gradient per inbound edge (eqs. 3, 4)."""
        return ops.fuse_bwd(fres, dgamma)

    def tau_fwd(self, edge, h):
        """tau(h) for a shortcut edge out of this unit -> (y, residuals)."""
        return edge.tau_fwd(h, self.topo.fuse)

    def tau_bwd(self, edge, tres, g):
        """VJP of tau at the h it saw: g (N, *edge.act_shape) -> (N, *out_shape)."""
        return edge.tau_bwd(tres, g)

    def _offsets(self):
        out, off = {}, 0
        for (i, name) in self.names:
            n = int(math.prod(self.layers[i].params[name].shape))
            out[(i, name)] = (off, n)
            off += n
        return out

    def zero_grad(self):
        self.grad.fill(0)
        self.count = 0

    def mean_grad(self):
        """Turn the accumulated gradient into its mean over the counted steps (in place)."""
        if self.count > 1:
            self.grad /= self.count

    def apply(self, opt) -> float:
        """Reset-mode update: mean gradient over counted steps, one optimizer step, zero.
        Returns the learning rate used (0.0 when no step was counted)."""
        lr = 0.0
        if self.count:
            self.mean_grad()
            lr = opt.step(self.theta, self.grad)
        self.zero_grad()
        return lr

    def param_items(self):
        """(qualified name, array view) pairs, e.g. ``("1.conv.w", ...)``."""
        for (i, name) in self.names:
            yield f"{i}.{self.layers[i].name}.{name}", self.layers[i].params[name]

    def flops(self) -> int:
        return int(sum(layer.flops() for layer in self.layers))

    def describe(self) -> str:
        return " > ".join(layer.describe() for layer in self.layers)


def host_parameters(units: dict) -> dict:
    """{unit: host copy of its flat parameters} for a dict of units."""
    return {l: backend.asnumpy(u.theta).copy() for l, u in units.items()}


def measure_unit_costs(topo: Topology, batch: int, *, seed: int = 0, dtype=np.float32,
                       reps: int = 2, xp=None) -> dict:
    """{unit: seconds for one forward + VJP at batch ``batch``} on this process (best of
    ``reps`` after a warm-up), on random inputs. For cost-balanced placement: timing noise
    changes only where units run, never the results (placement independence)."""
    import time

    xp = backend.xp() if xp is None else xp
    rng = np.random.default_rng(seed)
    costs = {}
    for l in range(1, topo.L + 1):
        u = Unit(topo, l, seed=seed, dtype=dtype, xp=xp)
        gamma = xp.asarray(rng.standard_normal((batch,) + tuple(u.in_shape)).astype(dtype))
        c = xp.asarray(rng.standard_normal((batch,) + tuple(u.out_shape)).astype(dtype))
        best = float("inf")
        for r in range(reps + 1):
            backend.synchronize(gamma)
            t0 = time.perf_counter()
            _, res = u.forward(gamma)
            u.backward(res, c, need_dx=l > 1)
            backend.synchronize(gamma)
            if r:
                best = min(best, time.perf_counter() - t0)
        costs[l] = best
        del u
    return costs


def apply_updates(units, opts, steps=None, nonfinite: str = "raise", what: str = ""):
    """The update policy, shared by the engine, BPTT and the baselines: one optimizer step
    for every unit whose flag in ``steps`` ({unit: bool}; default: it counted a valid
    step) is set and whose gradient is finite, then zero every gradient.

    Returns (learning rate used, number of non-finite updates skipped); with
    ``nonfinite="raise"`` a non-finite gradient raises
    :class:`~ssmpi.engine.losses.NonFiniteError`."""
    from .losses import finite

    lr, skipped = 0.0, 0
    for u in units:
        if steps[u.l] if steps is not None else u.count:
            opt = opts[u.l]
            if finite(u.grad, f"{what}unit U{u.l}: non-finite gradient at update {opt.t + 1}",
                      nonfinite):
                lr = opt.step(u.theta, u.grad)
            else:
                skipped += 1
        u.zero_grad()
    return lr, skipped
