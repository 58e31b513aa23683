"""Models as lists of *modules* (the paper's layer-level blocks), to be grouped into units.

A model is a :class:`ModelSpec`: a name, the per-sample input shape, a list of modules and a
head kind (``"classify"``: the last module outputs logits and the loss is softmax
cross-entropy; ``"frames"``: the last module outputs an image and the loss is mean-squared
error against a future frame). A module is a list of layer *descriptions*, tuples that
:func:`make_layers` turns into fresh :mod:`ssmpi.layers` objects, so every rank builds its
own layers from the same config:

    ("conv", cout, k, stride)   conv k x k (same padding) + bias
    ("relu",)                   ReLU
    ("pool", k)                 k x k max-pool, stride k
    ("avgpool", k)              k x k average pool, stride k
    ("gap",)                    global average pool (N, H, W, C) -> (N, C)
    ("linear", dout)            fully connected
    ("dropout", p)              inverted dropout
    ("s2d", b)                  space-to-depth with block b
    ("identity",)               y = x (the input unit, :func:`with_input_unit`)

Models can also be written as text (units of layer strings, TOML): :mod:`ssmpi.nn.architecture`
and :func:`custom`.

VGG8 (the paper's HMDB51/UCF101 backbone, 8 modules -> 8 units) at 112x112:
    U1 conv64 pool | U2 conv128 pool | U3 conv256 | U4 conv256 pool | U5 conv512 |
    U6 conv512 pool | U7 conv512 | U8 gap + linear(K)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

from . import layers as L
from . import ops

__all__ = ["ModelSpec", "make_layers", "vgg8", "vgg16", "tiny", "fullres", "custom",
           "get_model", "with_input_unit", "MODELS", "AvgPool2d"]

LayerDesc = Tuple
Module = List[LayerDesc]


@dataclass
class ModelSpec:
    name: str
    in_shape: Tuple[int, int, int]  # per-sample input frame shape (H, W, C)
    modules: List[Module]
    head: str = "classify"  # "classify" | "frames"
    num_classes: int = 0
    notes: str = ""
    extra: dict = field(default_factory=dict)


class AvgPool2d(L.Layer):
    """k x k average pooling, stride k (no parameters). (Kept here, beside the layer
    descriptions, so that architectures can use it; its ops are ``ops.avgpool2d_*``.)"""

    name = "avgpool"

    def __init__(self, k: int = 2):
        super().__init__()
        self.k = int(k)

    def _out_shape(self, in_shape):
        if len(in_shape) != 3:
            raise ValueError(f"avgpool: expects a (H, W, C) input, got per-sample shape "
                             f"{in_shape}")
        h, w, c = in_shape
        if h < self.k or w < self.k:
            raise ValueError(f"avgpool: kernel {self.k} larger than input {in_shape}")
        return ((h - self.k) // self.k + 1, (w - self.k) // self.k + 1, c)

    def forward(self, x, train=True):
        return ops.avgpool2d_fwd(x, self.k, self.k)

    def backward(self, res, dy, need_dx=True):
        return ops.avgpool2d_bwd(res, dy), {}

    def describe(self):
        return f"avgpool{self.k}"


def make_layers(module: Module, seed: int = 0) -> List[L.Layer]:
    """Fresh layer objects for one module description."""
    out = []
    for d in module:
        kind = d[0]
        if kind == "conv":
            cout, k = d[1], d[2] if len(d) > 2 else 3
            stride = d[3] if len(d) > 3 else 1
            out.append(L.Conv2d(cout, k, stride))
        elif kind == "relu":
            out.append(L.ReLU())
        elif kind == "pool":
            out.append(L.MaxPool2d(d[1] if len(d) > 1 else 2))
        elif kind == "avgpool":
            out.append(AvgPool2d(d[1] if len(d) > 1 else 2))
        elif kind == "gap":
            out.append(L.GlobalAvgPool())
        elif kind == "linear":
            out.append(L.Linear(d[1]))
        elif kind == "dropout":
            out.append(L.Dropout(d[1], seed=seed))
        elif kind == "identity":
            out.append(L.Identity())
        elif kind == "s2d":
            out.append(L.SpaceToDepth(d[1] if len(d) > 1 else 2))
        else:
            raise ValueError(f"unknown layer kind {kind!r} in module {module}")
    return out


def _w(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


def vgg8(num_classes: int = 51, width: float = 1.0, resolution: int = 112,
         s2d: bool = False) -> ModelSpec:
    """VGG8: 7 conv modules + a classifier module (8 units in the paper's setting)."""
    w = lambda c: _w(c, width)  # noqa: E731
    stem = [("s2d", 2)] if s2d else []
    mods = [
        stem + [("conv", w(64), 3), ("relu",), ("pool", 2)],
        [("conv", w(128), 3), ("relu",), ("pool", 2)],
        [("conv", w(256), 3), ("relu",)],
        [("conv", w(256), 3), ("relu",), ("pool", 2)],
        [("conv", w(512), 3), ("relu",)],
        [("conv", w(512), 3), ("relu",), ("pool", 2)],
        [("conv", w(512), 3), ("relu",)],
        [("gap",), ("linear", num_classes)],
    ]
    return ModelSpec(f"vgg8(width={width})", (resolution, resolution, 3), mods, "classify",
                     num_classes)


def vgg16(num_classes: int = 600, width: float = 1.0, resolution: int = 224) -> ModelSpec:
    """VGG16: 13 conv + 3 classifier layers as 16 modules (2 modules per unit on 8 ranks)."""
    w = lambda c: _w(c, width)  # noqa: E731
    cfg = [64, 64, "P", 128, 128, "P", 256, 256, 256, "P", 512, 512, 512, "P", 512, 512, 512, "P"]
    mods: List[Module] = []
    for c in cfg:
        if c == "P":
            mods[-1].append(("pool", 2))
        else:
            mods.append([("conv", w(c), 3), ("relu",)])
    mods.append([("gap",), ("linear", w(4096)), ("relu",)])
    mods.append([("linear", w(4096)), ("relu",)])
    mods.append([("linear", num_classes)])
    return ModelSpec(f"vgg16(width={width})", (resolution, resolution, 3), mods, "classify",
                     num_classes)


def tiny(num_classes: int = 4, units: int = 4, width: int = 8, resolution: int = 16,
         pool_every: int = 2, channels: int = 3) -> ModelSpec:
    """A small VGG-like model for tests and demos: ``units - 1`` conv modules + a head."""
    mods: List[Module] = []
    for i in range(units - 1):
        m: Module = [("conv", width * (1 + i // 2), 3), ("relu",)]
        if pool_every and (i + 1) % pool_every == 0:
            m.append(("pool", 2))
        mods.append(m)
    mods.append([("gap",), ("linear", num_classes)])
    return ModelSpec(f"tiny(units={units}, width={width})", (resolution, resolution, channels),
                     mods, "classify", num_classes)


def fullres(units: int = 16, width: int = 64, resolution: int = 112,
            num_classes: int = 0) -> ModelSpec:
    """Full-Res (Table 7): ``units - 1`` conv3x3+ReLU modules at full resolution (no pooling,
    no striding) and a head module conv3x3 to 3 channels: the predicted frame t+offset."""
    mods: List[Module] = [[("conv", int(width), 3), ("relu",)] for _ in range(units - 1)]
    mods.append([("conv", 3, 3)])
    return ModelSpec(f"fullres(units={units}, width={width})", (resolution, resolution, 3), mods,
                     "frames", 0)


def with_input_unit(spec: ModelSpec) -> ModelSpec:
    """``spec`` with a parameter-free identity module first: as unit U_1 it makes the raw
    frame a message, so Skip-Sideways' shortcut edge U_1 -> U_3 carries the input frame
    x[t-2] (max-pooled by tau to U_3's size) next to h_2[t-1]: temporal mixing starts on
    raw pixels, one unit earlier (the "input frames as an extra shortcut source" of
    FINDINGS.md). Costs one more unit (rank or group member) and one step of latency."""
    return ModelSpec(spec.name + " + input unit", spec.in_shape, [[("identity",)]] +
                     [list(m) for m in spec.modules], spec.head, spec.num_classes, spec.notes,
                     dict(spec.extra))


def custom(arch, num_classes: int = 0, resolution: int = 32, channels: int = 3,
           name: str = "custom") -> ModelSpec:
    """A model from text: ``arch`` is a list of units, each a list of layer strings
    (:mod:`ssmpi.nn.architecture`), checked at ``resolution`` x ``resolution`` x
    ``channels``. Raises :class:`ssmpi.nn.architecture.ArchitectureError`."""
    from .architecture import build_spec

    return build_spec(arch, num_classes, (resolution, resolution, channels), name=name)


MODELS = {"vgg8": vgg8, "vgg16": vgg16, "tiny": tiny, "fullres": fullres, "custom": custom}


def get_model(name: str, **kwargs) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"model {name!r} is not one of {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)
