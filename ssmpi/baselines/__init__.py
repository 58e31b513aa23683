"""Exact-backprop baselines that Sideways / Skip-Sideways are compared with (Tables 4-5).

- :class:`FrameBP` (``backprop.py``): per-frame 2D backprop of a chain of units on one rank;
  with a ``bp`` topology it is the engine's ``bp`` mode, with a ``sideways`` topology it is
  the serial reference of :class:`GPipe` (same units, same parameters).
- :class:`CausalBP` (``causal3d.py``): a causal 3D VGG (:func:`causal3d`) trained by backprop
  through the whole clip, storing the clip's activations (memory grows with T), optionally
  with rematerialisation per segment of frames (same gradients, memory of one segment).
- :class:`GPipe` (``gpipe.py``): the same units on the same ranks as the engine, micro-batch
  = frame: the forward of all frames through the stages, then the backward in reverse,
  exact gradients, one update per clip.

All three average the per-frame loss gradients over the clip's frames before one optimizer
step, as the engine does in reset mode (gradient divided by the count of valid steps).
"""

from .backprop import FrameBP
from .causal3d import CausalBP, causal3d
from .gpipe import GPipe

__all__ = ["FrameBP", "CausalBP", "causal3d", "GPipe"]
