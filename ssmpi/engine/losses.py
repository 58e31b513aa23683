"""The loss of the top unit U_L, and the one check for NaN and Inf.

Two kinds (``ALGORITHM.md``, "Targets"):

- ``xent``: softmax cross-entropy against the label of the clip that the top unit's
  direct-path frame belongs to (labels travel with the frame index, so stream mode works);
- ``mse``: mean squared error against the future frame ``x^[t + offset]``, where t is the
  newest frame that entered U_1 (``target="newest"``) or the top unit's direct-path frame
  (``"direct"``); a step whose target lies beyond the clip has no loss.

:class:`TopLoss` is the ``loss`` callable of :func:`ssmpi.engine.step.unit_step`; it keeps
what the metrics need (the loss of every valid step, the summed softmax).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np

from .. import backend
from ..nn import ops

NONFINITE = ("raise", "skip")
TARGETS = ("newest", "direct")
KINDS = ("xent", "mse")


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN or Inf."""


class DivergenceError(NonFiniteError):
    """Training diverged: an exploding loss, or parameters / optimizer state not finite."""


def finite(x, what: str, policy: str = "raise") -> bool:
    """True when ``x`` (a number or an array) is finite. Otherwise raise
    :class:`NonFiniteError` saying ``what`` (policy ``"raise"``) or return False
    (``"skip"``: the caller drops the step and counts it)."""
    ok = math.isfinite(x) if isinstance(x, float) else bool(
        backend.get_array_module(x).isfinite(x).all())
    if not ok and policy == "raise":
        raise NonFiniteError(what)
    return ok


def loss_fwd(kind: str, h, target):
    """(loss value as a float, residuals): xent with labels (N,) or mse with frames."""
    loss, res = (ops.softmax_xent_fwd if kind == "xent" else ops.mse_fwd)(h, target)
    return float(loss), res


def loss_bwd(kind: str, res, scale: float = 1.0):
    """d (scale * loss) / d h."""
    return (ops.softmax_xent_bwd if kind == "xent" else ops.mse_bwd)(res, scale)


class TopLoss:
    """U_L's loss at step t: ``loss(h, t, frame, train) -> (c, took)``.

    Parameters
    ----------
    kind : ``"xent"`` or ``"mse"``
    L : number of units (labels older than the pipeline's reach are forgotten)
    nonfinite : ``"raise"`` or ``"skip"`` a NaN/Inf loss
    target, frame_offset : frame prediction (see the module docstring)
    """

    def __init__(self, kind: str, L: int, *, nonfinite: str = "raise", target: str = "newest",
                 frame_offset: int = 8, dtype=np.float32, xp=None):
        if kind not in KINDS:
            raise ValueError(f"loss {kind!r} is not one of {', '.join(KINDS)}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite {nonfinite!r} is not one of {', '.join(NONFINITE)}")
        if target not in TARGETS:
            raise ValueError(f"target {target!r} is not one of {', '.join(TARGETS)}")
        self.kind, self.L = kind, L
        self.nonfinite, self.target, self.frame_offset = nonfinite, target, int(frame_offset)
        self.dtype = np.dtype(dtype)
        self.xp = backend.xp() if xp is None else xp
        self.labels_by_frame: Dict[int, object] = {}
        self.targets = None
        self.skipped = 0  # non-finite losses skipped (nonfinite="skip"), since creation
        self.per_sample = False  # also keep every sample's loss (evaluation)
        self.begin_clip()

    def begin_clip(self):
        """Forget labels, targets and statistics (a clip reset)."""
        self.labels_by_frame.clear()
        self.targets = None
        self.new_interval()

    def new_interval(self):
        """Fresh statistics, same labels (stream mode)."""
        self.losses: List[float] = []
        self.probs_sum = None
        self.sample_sum = None  # (N,) per-sample loss summed over the valid steps

    def set_labels(self, t: int, labels):
        """Labels (N,) of frame t; the top unit sees frame t at step t + L - 1."""
        self.labels_by_frame[t] = labels
        for f in [f for f in self.labels_by_frame if f < t - 4 * self.L - 8]:
            del self.labels_by_frame[f]

    def __call__(self, h, t: int, frame: int, train: bool):
        if self.kind == "xent":
            target = self.labels_by_frame.get(frame)
        else:
            idx = (t if self.target == "newest" else frame) + self.frame_offset
            target = None if self.targets is None or idx > self.targets.shape[1] else \
                self.targets[:, idx - 1]
        if target is None:
            return None, False  # no target for this step: no loss
        val, res = loss_fwd(self.kind, h, target)
        if not finite(val, f"unit U{self.L}: non-finite loss {val} at step {t}",
                      self.nonfinite):
            self.skipped += 1
            return None, False
        self.losses.append(val)
        if self.kind == "xent":
            p = res.probs
            self.probs_sum = p.copy() if self.probs_sum is None else self.probs_sum + p
        if self.per_sample:  # the loss of every sample, so that padding can be left out
            ps = res.nll if self.kind == "xent" else (res.diff * res.diff).reshape(
                res.diff.shape[0], -1).mean(axis=1)
            ps = ps.astype(np.float64)
            self.sample_sum = ps if self.sample_sum is None else self.sample_sum + ps
        if not train:
            return None, True
        return self.xp.asarray(loss_bwd(self.kind, res), dtype=self.dtype), True

    def sample_losses(self) -> Optional[np.ndarray]:
        """(N,) every sample's loss averaged over the valid steps (host), or None."""
        if self.sample_sum is None:
            return None
        return backend.asnumpy(self.sample_sum) / len(self.losses)

    def mean_probs(self) -> Optional[np.ndarray]:
        """(N, K) mean softmax over the valid steps (host), or None."""
        if self.probs_sum is None or not self.losses:
            return None
        return backend.asnumpy(self.probs_sum) / len(self.losses)
