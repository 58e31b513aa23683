"""Causal 3D VGG trained by backprop through the whole clip, with optional rematerialisation.

Shape legend: N batch, T frames of the clip, S frames of one segment, H W C an image,
kt the temporal kernel extent, K classes. Clip tensors are NTHWC.

Model
-----
:func:`causal3d` turns a 2D model description (``vgg8``, ``vgg16``, ``tiny``) into its causal
3D twin: every ``("conv", cout, k, stride)`` becomes ``("conv3d", cout, k, stride, kt)``, a
causal 3D convolution (output frame t sees input frames t-kt+1..t, kt-1 zero frames before
the clip), every other layer is applied to each frame independently. The head gives logits
for every frame, (N, T, K); the loss is the mean over frames of the per-frame softmax
cross-entropy (the per-frame prediction of a causal model, like the top unit of Sideways).

Training (:class:`CausalBP`)
----------------------------
Exact backprop through the clip. The clip is processed in *segments* of S frames; the
state carried from one segment to the next is, for every conv3d, its last kt-1 input frames
(N, kt-1, H, W, Cin). A segment's forward prepends that state to the segment's input and
drops the kt-1 warm-up outputs, so the result equals one conv3d over the whole clip.

- ``segment=None`` (plain BP): one segment of T frames; every layer's residuals for the whole
  clip stay alive until the backward, as real BP must: memory grows linearly with T.
- ``segment=S`` (rematerialisation): a first forward keeps only the state at every segment
  boundary (T/S checkpoints of kt-1 frames per conv); the backward walks the segments in
  reverse, recomputes each segment's forward from its checkpoint, backpropagates through it
  and hands the gradient with respect to its input state to the previous segment. Same
  gradients (up to rounding), memory of one segment plus the checkpoints, about
  (2T - S)/T times the forward compute.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional

import numpy as np

from .. import backend
from ..engine.losses import finite, loss_bwd, loss_fwd
from ..nn import layers, ops
from ..nn.models import ModelSpec, get_model, make_layers
from ..optim import make_optimizer


def causal3d(base: str = "vgg8", kt: int = 3, **kwargs) -> ModelSpec:
    """The causal 3D twin of model ``base`` (``models.get_model(base, **kwargs)``).

    Every conv becomes a causal conv3d with temporal extent ``kt``; e.g.
    ``causal3d("tiny", kt=2, units=3, width=4, resolution=8)`` for tests,
    ``causal3d("vgg8", num_classes=51)`` for the benchmarks.
    """
    if kt < 1:
        raise ValueError(f"causal3d: kt must be >= 1, got {kt}")
    spec = get_model(base, **kwargs)
    mods = []
    for m in spec.modules:
        mm = []
        for d in m:
            if d[0] == "conv":
                cout, k = d[1], d[2] if len(d) > 2 else 3
                stride = d[3] if len(d) > 3 else 1
                mm.append(("conv3d", cout, k, stride, kt))
            else:
                mm.append(d)
        mods.append(mm)
    if spec.head != "classify":
        raise ValueError("causal3d: only classification heads are supported")
    return ModelSpec(f"causal3d-{spec.name}(kt={kt})", spec.in_shape, mods, "classify",
                     spec.num_classes, notes="causal 3D twin of " + spec.name,
                     extra={"kt": kt, "base": base})


class CausalConv3d:
    """Causal 3D convolution + bias: x (N, T, H, W, Cin) -> y (N, T, Ho, Wo, Cout).

    Weights (kt, k, k, Cin, Cout), He-normal with fan-in kt*k*k*Cin.
    """

    name = "conv3d"

    def __init__(self, cout: int, k: int, stride: int, kt: int):
        self.cout, self.k, self.stride, self.kt = int(cout), int(k), int(stride), int(kt)
        self.pad = self.k // 2
        self.params: Dict[str, object] = {}

    def build(self, in_shape, rng=None, dtype=np.float32):
        """Per-frame shapes: (H, W, Cin) -> (Ho, Wo, Cout)."""
        h, w, cin = in_shape
        self.in_shape = tuple(in_shape)
        ho = (h + 2 * self.pad - self.k) // self.stride + 1
        wo = (w + 2 * self.pad - self.k) // self.stride + 1
        self.out_shape = (ho, wo, self.cout)
        if rng is not None:
            fan_in = self.kt * self.k * self.k * cin
            self.params = {
                "w": ops.he_normal((self.kt, self.k, self.k, cin, self.cout), fan_in, rng,
                                   dtype),
                "b": np.zeros((self.cout,), dtype=dtype)}
        return self.out_shape

    def flops(self) -> int:
        ho, wo, co = self.out_shape
        return 2 * ho * wo * co * self.kt * self.k * self.k * self.in_shape[2]


class FrameWise:
    """A 2D layer applied to every frame: (N, T, *in) -> (N, T, *out) via (N*T, *in)."""

    def __init__(self, layer: layers.Layer):
        self.layer = layer
        self.name = layer.name
        self.params = layer.params

    def build(self, in_shape, rng=None, dtype=np.float32):
        out = self.layer.build(in_shape, rng, dtype)
        self.params = self.layer.params
        self.in_shape, self.out_shape = self.layer.in_shape, out
        return out

    def forward(self, x):
        n, t = x.shape[:2]
        y, r = self.layer.forward(x.reshape((n * t,) + tuple(x.shape[2:])), True)
        return y.reshape((n, t) + tuple(y.shape[1:])), r

    def backward(self, r, dy, need_dx=True):
        n, t = dy.shape[:2]
        dx, g = self.layer.backward(r, dy.reshape((n * t,) + tuple(dy.shape[2:])),
                                    need_dx=need_dx)
        if dx is not None:
            dx = dx.reshape((n, t) + tuple(dx.shape[1:]))
        return dx, g

    def flops(self) -> int:
        return self.layer.flops()


def build_layers(spec: ModelSpec, seed: int = 0, dtype=np.float32):
    """Fresh, initialised layers of a causal3d model (parameters from ``seed``)."""
    rng = np.random.default_rng([int(seed), 3301])
    out = []
    shape = tuple(spec.in_shape)
    for mi, m in enumerate(spec.modules):
        for d in m:
            if d[0] == "conv3d":
                layer = CausalConv3d(d[1], d[2], d[3], d[4])
            else:
                (l2,) = make_layers([d], seed=seed * 1009 + mi)
                layer = FrameWise(l2)
            shape = layer.build(shape, rng, dtype)
            out.append(layer)
    return out


class CausalBP:
    """Backprop through a clip of a causal 3D model, optionally rematerialised per segment.

    Parameters
    ----------
    spec : a :func:`causal3d` model
    batch : N
    segment : None (store the whole clip's activations) or S frames per remat segment
    optimizer : keyword arguments of :func:`ssmpi.optim.make_optimizer` (one optimizer over
        all parameters)
    """

    def __init__(self, spec: ModelSpec, *, batch: int, seed: int = 0, dtype=np.float32,
                 optimizer: Optional[dict] = None, segment: Optional[int] = None, xp=None):
        self.spec, self.batch = spec, int(batch)
        self.xp = backend.xp() if xp is None else xp
        self.dtype = np.dtype(dtype)
        if segment is not None and segment < 1:
            raise ValueError(f"segment must be >= 1 frames, got {segment}")
        self.segment = segment
        self.layers = build_layers(spec, seed, self.dtype)
        # flat parameters; layer params become views (as in ssmpi.unit.Unit)
        self.names = [(i, n) for i, ly in enumerate(self.layers) for n in ly.params]
        host = [np.asarray(self.layers[i].params[n], self.dtype).ravel() for i, n in self.names]
        self.theta = self.xp.asarray(np.concatenate(host))
        self.grad = self.xp.zeros_like(self.theta)
        self._gviews = {}
        off = 0
        for (i, n), h in zip(self.names, host):
            shp = self.layers[i].params[n].shape
            self.layers[i].params[n] = self.theta[off:off + h.size].reshape(shp)
            if isinstance(self.layers[i], FrameWise):
                self.layers[i].layer.params[n] = self.layers[i].params[n]
            self._gviews[(i, n)] = self.grad[off:off + h.size].reshape(shp)
            off += h.size
        self.opt = make_optimizer(self.theta, **dict(optimizer or {}))
        self.forward_s = self.backward_s = 0.0

    # -- one segment -------------------------------------------------------------------
    def _seg_forward(self, x, state, keep: bool = True):
        """x (N, S, H, W, C) frames of one segment; state: per conv3d layer its previous
        kt-1 input frames (N, kt-1, H, W, Cin), or None at the start of the clip (zeros).
        Returns (logits (N, S, K), residuals or None, new state)."""
        xp = self.xp
        res, new_state = [], []
        h = x
        for i, ly in enumerate(self.layers):
            if isinstance(ly, CausalConv3d):
                kt = ly.kt
                prev = None if state is None else state[len(new_state)]
                ext = h if prev is None else xp.concatenate([prev, h], axis=1)
                # the kt-1 newest input frames: what the next segment's outputs still see
                if kt > 1:
                    tail = ext[:, -(kt - 1):]
                    if tail.shape[1] < kt - 1:  # clip shorter than kt-1 so far: pad zeros
                        pad = xp.zeros((tail.shape[0], kt - 1 - tail.shape[1]) + tail.shape[2:],
                                       tail.dtype)
                        tail = xp.concatenate([pad, tail], axis=1)
                    new_state.append(xp.ascontiguousarray(tail))
                else:
                    new_state.append(None)
                y, r = ops.conv3d_causal_fwd(ext, ly.params["w"], ly.params["b"],
                                             stride=ly.stride, pad=ly.pad)
                skip = 0 if prev is None else kt - 1
                h = y[:, skip:]
                res.append((r, skip, ext.shape[1]) if keep else None)
            else:
                h, r = ly.forward(h)
                res.append(r if keep else None)
        return h, (res if keep else None), new_state

    def _seg_backward(self, res, dlogits, dstate_out):
        """Backprop one segment: dlogits (N, S, K); dstate_out: gradient w.r.t. the state
        this segment handed on (None for the last segment). Accumulates the parameter
        gradient; returns the gradient w.r.t. the state this segment received."""
        xp = self.xp
        dh = dlogits
        nconv = sum(isinstance(ly, CausalConv3d) for ly in self.layers)
        ci = nconv
        dstate_in: List = [None] * nconv
        for i in range(len(self.layers) - 1, -1, -1):
            ly = self.layers[i]
            first = i == 0
            if isinstance(ly, CausalConv3d):
                ci -= 1
                r, skip, t_ext = res[i]
                kt = ly.kt
                if skip:
                    dy = xp.zeros((dh.shape[0], skip + dh.shape[1]) + dh.shape[2:], dh.dtype)
                    dy[:, skip:] = dh
                else:
                    dy = dh
                dx, dw, db = ops.conv3d_causal_bwd(r, dy, need_dx=not first)
                self._gviews[(i, "w")] += dw
                self._gviews[(i, "b")] += db
                if dx is None:
                    dh = None
                    continue
                if dstate_out is not None and kt > 1 and dstate_out[ci] is not None:
                    n_t = min(kt - 1, t_ext)  # the tail handed on was ext[:, -(kt-1):]
                    dx[:, t_ext - n_t:] += dstate_out[ci][:, kt - 1 - n_t:]
                if skip:
                    dstate_in[ci] = dx[:, :skip]
                    dh = dx[:, skip:]
                else:
                    dh = dx
            else:
                dh, g = ly.backward(res[i], dh, need_dx=not first)
                for n, gv in g.items():
                    self._gviews[(i, n)] += gv
        return dstate_in

    # -- one clip ------------------------------------------------------------------------
    def clip_grads(self, T: int, frames, labels) -> List[float]:
        """Accumulate into ``self.grad`` the exact gradient of the mean over the T frames of
        the per-frame loss; frames (N, T', H, W, C) with T' >= T, labels (N,). Returns the
        per-segment mean losses (one value per segment, in clip order)."""
        xp = self.xp
        frames = xp.asarray(frames, dtype=self.dtype)
        labels = xp.asarray(labels)
        S = T if self.segment is None else min(self.segment, T)
        segs = [(s, min(s + S, T)) for s in range(0, T, S)]
        t0 = time.perf_counter()
        states = [None]
        st = None
        for s, e in segs[:-1]:  # remat: keep only the boundary states
            _, _, st = self._seg_forward(frames[:, s:e], st, keep=False)
            states.append(st)
        self.forward_s += time.perf_counter() - t0
        losses = [0.0] * len(segs)
        dstate = None
        for j in range(len(segs) - 1, -1, -1):
            s, e = segs[j]
            t0 = time.perf_counter()
            logits, res, _ = self._seg_forward(frames[:, s:e], states[j], keep=True)
            n, S_j, K = logits.shape
            lab = xp.repeat(labels[:, None], S_j, axis=1).reshape(n * S_j)
            losses[j], lres = loss_fwd("xent", xp.ascontiguousarray(logits).reshape(
                n * S_j, K), lab)
            finite(losses[j], f"CausalBP: non-finite loss {losses[j]}")
            # d(mean over T frames)/d logits of this segment = (S_j / T) d(segment mean)
            dl = loss_bwd("xent", lres, S_j / T).reshape(n, S_j, K)
            t1 = time.perf_counter()
            dstate = self._seg_backward(res, xp.asarray(dl, dtype=self.dtype), dstate)
            del res
            self.forward_s += t1 - t0
            self.backward_s += time.perf_counter() - t1
        return losses

    def run_clip(self, T: int, frames, labels, *, update: bool = True) -> List[float]:
        """One iteration: gradient of the clip, then one optimizer step."""
        losses = self.clip_grads(T, frames, labels)
        if update:
            self.opt.step(self.theta, self.grad)
            self.grad.fill(0)
        return losses

    def logits(self, frames):
        """Forward only: frames (N, T, H, W, C) -> logits (N, T, K) (whole clip)."""
        x = self.xp.asarray(frames, dtype=self.dtype)
        return self._seg_forward(x, None, keep=False)[0]

    def flops_per_frame(self) -> int:
        """Forward multiply-adds x 2 per sample and frame."""
        return int(sum(ly.flops() for ly in self.layers))
