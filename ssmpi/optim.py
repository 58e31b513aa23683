"""Optimizers and learning-rate schedules. State lives with its unit (one per unit).

All optimizers update a unit's flat parameter vector ``theta`` (P,) in place from a flat
gradient ``g`` (P,), so they are one fused pass over contiguous memory on NumPy or CuPy.

- :class:`SGD`: momentum (heavy ball or Nesterov), L2 weight decay added to the gradient;
- :class:`Adam`: with decoupled weight decay (AdamW) when ``weight_decay > 0``, and the
  AMSGrad variant (``amsgrad=True``: the step is divided by the largest second-moment
  estimate seen so far, so it shrinks when the gradients do; docs/FINDINGS.md, section 9);
- :func:`clip_by_norm`: gradient-norm clipping over the whole unit;
- :class:`Schedule`: ``constant``, ``step``, ``cosine``, each with an optional linear warm-up;
- :func:`unit_lr_scale`: per-unit learning-rate multipliers (``"stale"``: by the age of the
  cotangent a unit's pseudo-gradient uses; or one factor per unit, 0 freezing a unit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Union

import numpy as np

from . import backend

SCHEDULES = ("constant", "step", "cosine")
OPTIMIZERS = ("sgd", "adam")
UNIT_LR_RULES = ("same", "stale")


def unit_lr_scale(rule: Union[str, Sequence[float]], l: int, L: int) -> float:
    """Learning-rate multiplier of unit U_l (1-based) of a pipeline of L units.

    ``"same"``: 1. ``"stale"``: 1 / (1 + 2(L - l)). In Sideways / Skip-Sideways the
    cotangent that reaches U_l is 2(L - l) steps old (the head's is fresh), so the
    pseudo-gradients of the lower units are the least exact ones; this rule slows each unit
    in proportion. Measured (docs/FINDINGS.md, section 10): with it a direction-of-motion
    solution found by Skip-Sideways is kept at a constant base learning rate, where with
    equal rates the first conv unit's updates pull it apart.

    A sequence gives one factor per unit, ``rule[l - 1]`` for U_l; 0 freezes the unit at its
    initial weights (docs/FINDINGS.md, section 9d: with U1-U2 frozen, Skip-Sideways learns
    the direction of motion without the input unit and keeps it)."""
    if not 1 <= l <= L:
        raise ValueError(f"unit {l} outside 1..{L}")
    if isinstance(rule, str):
        if rule == "same":
            return 1.0
        if rule == "stale":
            return 1.0 / (1 + 2 * (L - l))
        raise ValueError(f"unit lr rule {rule!r} is not one of {', '.join(UNIT_LR_RULES)}")
    if len(rule) != L:
        raise ValueError(f"{len(rule)} unit lr factors for {L} units")
    f = float(rule[l - 1])
    if not (math.isfinite(f) and f >= 0):
        raise ValueError(f"unit lr factor of U{l} must be a finite number >= 0, got {f}")
    return f


@dataclass
class Schedule:
    """Learning rate as a function of the update count ``i`` (0-based)."""

    lr: float = 1e-3
    kind: str = "constant"
    warmup: int = 0  # linear warm-up from lr/warmup to lr over this many updates
    total: int = 0  # cosine: updates until the end of the decay (required for cosine)
    min_lr: float = 0.0  # cosine: floor
    milestones: List[int] = field(default_factory=list)  # step: updates where lr *= gamma
    gamma: float = 0.1  # step: factor at each milestone

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule {self.kind!r} is not one of {', '.join(SCHEDULES)}")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be a finite number >= 0, got {self.lr}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.kind == "cosine" and self.total <= 0:
            raise ValueError("cosine schedule needs total > 0 (number of updates)")

    def __call__(self, i: int) -> float:
        if self.warmup and i < self.warmup:
            return self.lr * (i + 1) / self.warmup
        if self.kind == "constant":
            return self.lr
        if self.kind == "step":
            return self.lr * self.gamma ** sum(1 for m in self.milestones if i >= m)
        j = min(max(i - self.warmup, 0), max(self.total - self.warmup, 1))
        frac = j / max(self.total - self.warmup, 1)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * frac))


def clip_by_norm(g, max_norm: float) -> float:
    """Scale ``g`` in place so that its 2-norm is at most ``max_norm``; returns the norm."""
    xp = backend.get_array_module(g)
    norm = float(xp.sqrt(xp.sum(g * g)))
    if max_norm and max_norm > 0 and norm > max_norm:
        g *= max_norm / (norm + 1e-12)
    return norm


class Optimizer:
    """Base: holds the schedule and the update count; state arrays are per unit."""

    def __init__(self, schedule: Schedule, weight_decay: float = 0.0, clip: float = 0.0):
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if clip < 0:
            raise ValueError(f"clip must be >= 0 (0 = off), got {clip}")
        self.schedule, self.weight_decay, self.clip = schedule, float(weight_decay), float(clip)
        self.t = 0  # number of updates applied
        self.last_norm = 0.0

    def step(self, theta, g):
        """Apply one update to ``theta`` (P,) from gradient ``g`` (P,); ``g`` may be modified."""
        self.last_norm = clip_by_norm(g, self.clip)
        lr = self.schedule(self.t)
        self._update(theta, g, lr)
        self.t += 1
        return lr

    def _update(self, theta, g, lr):
        raise NotImplementedError

    def state_dict(self) -> Dict[str, object]:
        return {"t": self.t}

    def load_state_dict(self, d):
        self.t = int(d["t"])


class SGD(Optimizer):
    def __init__(self, theta, schedule, momentum=0.9, nesterov=False, weight_decay=0.0, clip=0.0):
        super().__init__(schedule, weight_decay, clip)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        xp = backend.get_array_module(theta)
        self.v = xp.zeros_like(theta)

    def _update(self, theta, g, lr):
        if self.weight_decay:
            g += self.weight_decay * theta
        if self.momentum:
            self.v *= self.momentum
            self.v += g
            if self.nesterov:
                g += self.momentum * self.v
                theta -= lr * g
            else:
                theta -= lr * self.v
        else:
            theta -= lr * g

    def state_dict(self):
        return {"t": self.t, "v": self.v}

    def load_state_dict(self, d):
        self.t = int(d["t"])
        self.v[...] = backend.get_array_module(self.v).asarray(d["v"])


class Adam(Optimizer):
    """Adam(W). With ``amsgrad`` (Reddi et al. 2018) the denominator uses the running
    maximum of the second-moment estimate: a parameter's step is then proportional to its
    gradient relative to the largest gradients it has had, and shrinks once they shrink."""

    def __init__(self, theta, schedule, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                 clip=0.0, amsgrad: bool = False):
        super().__init__(schedule, weight_decay, clip)
        self.b1, self.b2, self.eps = float(beta1), float(beta2), float(eps)
        self.amsgrad = bool(amsgrad)
        xp = backend.get_array_module(theta)
        self.m = xp.zeros_like(theta)
        self.v = xp.zeros_like(theta)
        self.vmax = xp.zeros_like(theta) if self.amsgrad else None

    def _update(self, theta, g, lr):
        xp = backend.get_array_module(theta)
        self.m *= self.b1
        self.m += (1 - self.b1) * g
        self.v *= self.b2
        self.v += (1 - self.b2) * (g * g)
        k = self.t + 1
        a = lr * math.sqrt(1 - self.b2 ** k) / (1 - self.b1 ** k)
        if self.weight_decay:  # decoupled (AdamW)
            theta *= 1 - lr * self.weight_decay
        v = self.v
        if self.amsgrad:
            xp.maximum(self.vmax, self.v, out=self.vmax)
            v = self.vmax
        theta -= a * self.m / (xp.sqrt(v) + self.eps)

    def state_dict(self):
        d = {"t": self.t, "m": self.m, "v": self.v}
        if self.amsgrad:
            d["vmax"] = self.vmax
        return d

    def load_state_dict(self, d):
        xp = backend.get_array_module(self.m)
        self.t = int(d["t"])
        self.m[...] = xp.asarray(d["m"])
        self.v[...] = xp.asarray(d["v"])
        if self.amsgrad:
            if "vmax" not in d:
                raise ValueError("optimizer state has no 'vmax' (saved without amsgrad)")
            self.vmax[...] = xp.asarray(d["vmax"])


def make_optimizer(theta, name: str = "adam", lr: float = 1e-3, *, momentum: float = 0.9,
                   nesterov: bool = False, betas=(0.9, 0.999), eps: float = 1e-8,
                   weight_decay: float = 0.0, clip: float = 0.0, schedule: str = "constant",
                   warmup: int = 0, total: int = 0, min_lr: float = 0.0, milestones=(),
                   gamma: float = 0.1, amsgrad: bool = False) -> Optimizer:
    """An optimizer for one unit's flat parameters."""
    sched = Schedule(lr=lr, kind=schedule, warmup=warmup, total=total, min_lr=min_lr,
                     milestones=list(milestones), gamma=gamma)
    if name == "sgd":
        if amsgrad:
            raise ValueError("amsgrad is an Adam option (optimizer 'sgd' given)")
        return SGD(theta, sched, momentum=momentum, nesterov=nesterov,
                   weight_decay=weight_decay, clip=clip)
    if name == "adam":
        return Adam(theta, sched, beta1=betas[0], beta2=betas[1], eps=eps,
                    weight_decay=weight_decay, clip=clip, amsgrad=amsgrad)
    raise ValueError(f"optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")


def _np(x):
    return np.asarray(backend.asnumpy(x))
