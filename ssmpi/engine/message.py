"""What travels along an edge once per step: a :class:`Message`.

Every edge U_i -> U_j carries two kinds of message (``ALGORITHM.md``):

- ``ACT``: the activation a_{i->j} that U_i sends *up* (tau(h_i) on a shortcut edge);
- ``GRAD``: the pseudo-gradient g_{i->j} that U_j sends *down* (absent on FA-Skip-Sideways
  shortcut edges).

A message is named by its key ``(edge id, kind)``. Its fields:

==========  ===================================================================
data        the array (N, *edge.act_shape); zeros when the message is invalid
valid       False during pipeline fill and after a clip reset
frame       ACT: the frame index on the direct path of the activation (0: none)
loss_step   GRAD: the step whose loss this pseudo-gradient descends from (0: none)
==========  ===================================================================

On the wire (:mod:`ssmpi.engine.transport`) the data go in one message and the three
integers in a small header ``[valid, frame, loss_step, 0]`` beside it.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Tuple

import numpy as np

ACT, GRAD = "act", "grad"
KINDS = (ACT, GRAD)
HEADER = 4  # int64 words: valid, frame, loss_step, reserved

Key = Tuple[int, str]  # (edge id, ACT or GRAD)


class Message(NamedTuple):
    """One activation or pseudo-gradient on one edge at one step."""

    data: Any  # (N, *act_shape) array, or None for "invalid" before it goes on a wire
    valid: bool
    frame: int = 0  # ACT: direct-path frame index
    loss_step: int = 0  # GRAD: step of the loss it descends from

    def header(self, out: np.ndarray) -> np.ndarray:
        """Write the header words into ``out`` (int64, length >= 3)."""
        out[0], out[1], out[2] = int(self.valid), self.frame, self.loss_step
        return out

    @classmethod
    def from_header(cls, data, hdr) -> "Message":
        return cls(data, bool(hdr[0]), int(hdr[1]), int(hdr[2]))


INVALID = Message(None, False)
