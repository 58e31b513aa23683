"""Units, edges and placement: the static structure every rank derives from the config.

Words as in ``ALGORITHM.md``:

- a **module** is one layer-level block of the model (:mod:`ssmpi.models`);
- a **unit** U_l (l = 1..L) is a contiguous group of modules; inside a unit ordinary
  backprop on the current frame, between units the Sideways delays;
- an **edge** i -> j carries an activation up and its pseudo-gradient down:
  *direct* edges j = i + 1 and *shortcut* edges j = i + 2 .. i + k (Skip-Sideways);
- **placement** maps units to MPI ranks: one unit per rank, contiguous groups of units
  per rank, or all units on one rank (the serial executor), times R data-parallel replicas.

Training modes:

==========  ==================================================================
``bp``      all modules in a single unit: exact per-frame backprop
``sideways`` direct edges only (k = 1)
``skip``    Skip-Sideways: direct + shortcut edges up to distance k (k >= 2)
``fa-skip`` shortcut activations, but no pseudo-gradient down shortcut edges
==========  ==================================================================

Every ``rank == ...`` decision of the engine lives here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ..nn import ops
from ..nn.models import ModelSpec, make_layers

Shape = Tuple[int, ...]
MODES = ("bp", "sideways", "skip", "fa-skip")
FUSIONS = ("concat", "add")


class TopologyError(ValueError):
    """The model, mode or placement does not fit together."""


@dataclass(frozen=True)
class Edge:
    """U_src -> U_dst. ``act_shape`` is the per-sample shape that travels up (after tau)."""

    eid: int
    src: int
    dst: int
    kind: str  # "direct" | "shortcut"
    act_shape: Shape
    src_shape: Shape  # h_src's per-sample shape (before tau)
    grad: bool  # does a pseudo-gradient travel down this edge?

    @property
    def distance(self) -> int:
        return self.dst - self.src

    def tau_fwd(self, h, fuse: str):
        """tau(h) for this shortcut edge: h (N, *src_shape) -> (y (N, *act_shape), res)."""
        if len(self.src_shape) == 1:  # vector to vector: identity
            return h, None
        out_c = self.act_shape[-1] if fuse == "add" else None
        hw = self.act_shape[:2] if len(self.act_shape) == 3 else (1, 1)
        y, res = ops.tau_fwd(h, hw, out_c)
        return y.reshape((y.shape[0],) + tuple(self.act_shape)), res

    def tau_bwd(self, res, g):
        """VJP of :meth:`tau_fwd` at the input it saw: g (N, *act_shape) -> (N, *src_shape)."""
        if res is None:
            return g
        if len(self.act_shape) == 1:
            g = g.reshape(g.shape[0], 1, 1, g.shape[1])
        return ops.tau_bwd(res, g)

    def tag(self, what: str) -> int:
        """MPI tag of one message kind on this edge (unique per edge and kind)."""
        return 16 + 4 * self.eid + {"act": 0, "act_hdr": 1, "grad": 2, "grad_hdr": 3}[what]

    def __str__(self) -> str:
        return f"{self.kind} edge U{self.src}->U{self.dst}"


class Topology:
    """Units and edges of a model under a training mode.

    Parameters
    ----------
    model : ModelSpec
    mode : one of ``MODES``
    k : largest edge distance for ``skip``/``fa-skip`` (k = 1 is Sideways; the paper uses 2)
    fuse : ``"concat"`` or ``"add"`` (equation 1)
    modules_per_unit : group this many consecutive modules into one unit (VGG16 on 8 ranks: 2);
        or pass ``groups`` explicitly as lists of module indices.
    """

    def __init__(self, model: ModelSpec, mode: str = "skip", k: int = 2, fuse: str = "concat",
                 modules_per_unit: int = 1, groups: Optional[Sequence[Sequence[int]]] = None):
        if mode not in MODES:
            raise TopologyError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        if fuse not in FUSIONS:
            raise TopologyError(f"fuse {fuse!r} is not one of {', '.join(FUSIONS)}")
        if mode in ("skip", "fa-skip") and k < 2:
            raise TopologyError(f"mode {mode!r} needs k >= 2 (k = 1 is mode 'sideways'), got {k}")
        if k < 1:
            raise TopologyError(f"k must be >= 1, got {k}")
        self.model, self.mode, self.fuse = model, mode, fuse
        self.k = 1 if mode in ("bp", "sideways") else int(k)
        nmod = len(model.modules)
        if mode == "bp":
            groups = [list(range(nmod))]
        elif groups is None:
            if modules_per_unit < 1:
                raise TopologyError(f"modules_per_unit must be >= 1, got {modules_per_unit}")
            groups = [list(range(i, min(i + modules_per_unit, nmod)))
                      for i in range(0, nmod, modules_per_unit)]
        flat = [m for g in groups for m in g]
        if flat != list(range(nmod)):
            raise TopologyError(f"unit groups {groups} must cover modules 0..{nmod - 1} in order")
        self.groups: List[List[int]] = [list(g) for g in groups]
        self.L = len(self.groups)
        self._derive_shapes()

    # -- structure ---------------------------------------------------------------------
    def _derive_shapes(self):
        """Per-unit input (fused) and output shapes, and the edges, from shapes alone."""
        self.in_shapes: Dict[int, Shape] = {}
        self.out_shapes: Dict[int, Shape] = {}
        self.edges: List[Edge] = []
        eid = 0
        for l in range(1, self.L + 1):
            if l == 1:
                gamma = tuple(self.model.in_shape)
            else:
                direct = self.out_shapes[l - 1]
                e = Edge(eid, l - 1, l, "direct", direct, direct, True)
                self.edges.append(e)
                eid += 1
                gamma = direct
                for i in range(l - 2, max(1, l - self.k) - 1, -1):  # shortcuts i -> l
                    src = self.out_shapes[i]
                    act = self._tau_shape(i, l, src, direct)
                    self.edges.append(Edge(eid, i, l, "shortcut", tuple(act), src,
                                           self.mode != "fa-skip"))
                    eid += 1
                    if self.fuse == "concat":
                        gamma = gamma[:-1] + (gamma[-1] + act[-1],)
            self.in_shapes[l] = gamma
            shape = gamma
            for layer in self.unit_layers(l):
                try:
                    shape = layer.build(shape)
                except ValueError as err:
                    raise TopologyError(f"unit U{l}: {err}") from None
            self.out_shapes[l] = shape
        # computed once: the engine asks for them at every step
        by_distance = lambda es: sorted(es, key=lambda e: e.distance)  # noqa: E731
        self._inbound = {l: by_distance([e for e in self.edges if e.dst == l])
                         for l in range(1, self.L + 1)}
        self._outbound = {l: by_distance([e for e in self.edges if e.src == l])
                          for l in range(1, self.L + 1)}

    def _tau_shape(self, i: int, l: int, src: Shape, direct: Shape) -> Shape:
        """Shape of tau(h_i) sent to U_l: max-pool to the receiver's spatial size (a vector
        receiver: global max-pool, then flatten), channels tiled/zero-padded for add."""
        out_c = direct[-1] if self.fuse == "add" else None
        try:
            if len(direct) == 3 and len(src) == 3:
                return tuple(ops.tau_out_shape((1,) + tuple(src), direct[:2], out_c)[1:])
            if len(direct) == 1 and len(src) == 3:
                if src[0] != src[1]:
                    raise ValueError(f"global pooling of a non-square {src}")
                return tuple(ops.tau_out_shape((1,) + tuple(src), (1, 1), out_c)[1:])[2:]
            if len(direct) == 1 and len(src) == 1:
                if self.fuse == "add" and src != direct:
                    raise ValueError(f"add needs equal vector sizes, got {src} and {direct}")
                return tuple(src)
            raise ValueError(f"cannot map {src} to {direct}")
        except ValueError as err:
            raise TopologyError(f"shortcut U{i}->U{l}: {err}") from None

    def unit_layers(self, l: int, seed: int = 0):
        """Fresh (unbuilt) layer objects of unit ``l``."""
        out = []
        for m in self.groups[l - 1]:
            out.extend(make_layers(self.model.modules[m], seed=seed * 1009 + m))
        return out

    def inbound(self, l: int) -> List[Edge]:
        """Edges into U_l: the direct edge first, then shortcuts by increasing distance."""
        return self._inbound[l]

    def outbound(self, l: int) -> List[Edge]:
        """Edges out of U_l: the direct edge first, then shortcuts by increasing distance."""
        return self._outbound[l]

    def describe(self) -> str:
        lines = [f"{self.model.name}: {self.L} units, mode {self.mode}, k={self.k}, "
                 f"fuse {self.fuse}"]
        for l in range(1, self.L + 1):
            mods = ", ".join(str(m + 1) for m in self.groups[l - 1])
            lines.append(f"  U{l}: modules {mods}; in {self.in_shapes[l]} -> out "
                         f"{self.out_shapes[l]}")
        return "\n".join(lines)


def balanced_groups(n: int, parts: int) -> List[List[int]]:
    """Split 1..n into ``parts`` contiguous groups whose sizes differ by at most one."""
    base, extra = divmod(n, parts)
    out, start = [], 1
    for p in range(parts):
        size = base + (1 if p < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


class Placement:
    """Which rank of a communicator runs which unit.

    Ranks are laid out replica-major: replica r owns ranks ``r*P .. r*P + P - 1`` where P is
    the number of ranks per pipeline; rank ``r*P + p`` runs the p-th group of units. By
    default the groups are contiguous and of nearly equal size; ``groups`` may give any
    split (e.g. from :func:`balance_by_cost`): results do not depend on it. ``P = 1`` is
    the serial executor.
    """

    def __init__(self, n_units: int, world_size: int, replicas: int = 1,
                 ranks_per_replica: Optional[int] = None,
                 groups: Optional[Sequence[Sequence[int]]] = None):
        if replicas < 1:
            raise TopologyError(f"replicas must be >= 1, got {replicas}")
        if world_size % replicas:
            raise TopologyError(
                f"{world_size} ranks cannot hold {replicas} equal replicas; "
                f"{fits_message(n_units, world_size)}")
        P = world_size // replicas if ranks_per_replica is None else ranks_per_replica
        if P * replicas != world_size:
            raise TopologyError(
                f"{world_size} ranks != {replicas} replicas x {P} ranks per replica; "
                f"{fits_message(n_units, world_size)}")
        if P > n_units:
            raise TopologyError(
                f"{world_size} ranks ({replicas} replica(s) x {P}) but the model has only "
                f"{n_units} units: at most one rank per unit. {fits_message(n_units, world_size)}")
        self.L, self.world_size, self.replicas, self.P = n_units, world_size, replicas, P
        if groups is None:
            self.groups = balanced_groups(n_units, P)
        else:
            self.groups = [sorted(int(l) for l in g) for g in groups]
            flat = sorted(l for g in self.groups for l in g)
            if len(self.groups) != P or flat != list(range(1, n_units + 1)) or \
                    any(not g for g in self.groups):
                raise TopologyError(f"unit groups {groups} must split units 1..{n_units} "
                                    f"among {P} ranks, each unit exactly once")
        self._rank_of = {}
        for p, g in enumerate(self.groups):
            for l in g:
                self._rank_of[l] = p

    def rank_of(self, l: int, replica: int = 0) -> int:
        return replica * self.P + self._rank_of[l]

    def replica_of(self, rank: int) -> int:
        return rank // self.P

    def position_of(self, rank: int) -> int:
        """Index of ``rank``'s unit group inside its pipeline (the same for every replica)."""
        return rank % self.P

    def units_of(self, rank: int) -> List[int]:
        return list(self.groups[self.position_of(rank)])

    def owns_bottom(self, rank: int) -> bool:
        return 1 in self.units_of(rank)

    def owns_top(self, rank: int) -> bool:
        return self.L in self.units_of(rank)

    def describe(self) -> str:
        parts = []
        for p, g in enumerate(self.groups):
            parts.append(f"rank {p}: " + ",".join(f"U{l}" for l in g))
        rep = f" x {self.replicas} replicas" if self.replicas > 1 else ""
        return f"{self.P} ranks per pipeline{rep}: " + "; ".join(parts)


def balance_by_cost(costs: Dict[int, float], parts: int) -> List[List[int]]:
    """Split units into ``parts`` groups (not necessarily contiguous) minimising the largest
    group cost: longest-processing-time first, then pairwise moves and swaps that lower
    the maximum. ``costs``: {unit: seconds (or any additive cost)}."""
    units = sorted(costs, key=lambda l: (-costs[l], l))
    groups: List[List[int]] = [[] for _ in range(parts)]
    load = [0.0] * parts
    for l in units:
        p = min(range(parts), key=lambda i: (load[i], i))
        groups[p].append(l)
        load[p] += costs[l]
    improved = True
    while improved:
        improved = False
        hi = max(range(parts), key=lambda i: load[i])
        for lo in range(parts):
            if lo == hi:
                continue
            for a in list(groups[hi]):  # move a: hi -> lo
                if len(groups[hi]) > 1 and max(load[hi] - costs[a], load[lo] + costs[a]) < \
                        load[hi] - 1e-12:
                    groups[hi].remove(a)
                    groups[lo].append(a)
                    load[hi] -= costs[a]
                    load[lo] += costs[a]
                    improved = True
                    break
                for b in list(groups[lo]):  # swap a <-> b
                    d = costs[a] - costs[b]
                    if d > 0 and max(load[hi] - d, load[lo] + d) < load[hi] - 1e-12:
                        groups[hi].remove(a)
                        groups[lo].remove(b)
                        groups[hi].append(b)
                        groups[lo].append(a)
                        load[hi] -= d
                        load[lo] += d
                        improved = True
                        break
                if improved:
                    break
            if improved:
                break
    # rank order follows the pipeline: the group holding U1 first
    return sorted((sorted(g) for g in groups), key=lambda g: g[0])


def fits_message(n_units: int, world_size: int) -> str:
    """Say which rank counts fit a model of ``n_units`` units."""
    fits = [p for p in range(1, n_units + 1)]
    ex = ", ".join(f"-n {p}" for p in fits if p in (1, 2, 3, 4, 8, n_units) or p == n_units)
    return (f"a model of {n_units} units runs on 1..{n_units} ranks per replica ({ex}, ...), "
            f"or on a multiple of that with replicas (e.g. -n {2 * n_units} = 2 replicas x "
            f"{n_units}); got {world_size}")
