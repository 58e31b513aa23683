"""Architectures written as text: a model is a list of units, each a list of layers.

In a TOML file (``jobs/archs/*.toml``, used with ``model.arch_file``) or inline in a config
(``model.arch``)::

    name = "probe"                       # optional (file only)
    about = "what it is"                 # optional (file only)
    units = [
      ["conv 16", "relu", "maxpool 2"],  # U1: 32x32x3 -> 16x16x16
      ["conv 32", "relu"],               # U2
      ["conv 32", "relu"],               # U3: frames t-1 (via U2) and t-2 (via U1) meet
      ["conv 32", "relu", "gap", "linear classes"],   # U4: the head
    ]

A "unit" here is one of the model's *modules* (:class:`ssmpi.nn.models.ModelSpec`);
``engine.modules_per_unit = m`` groups m consecutive ones into one engine unit. Layers
(defaults in brackets)::

    conv C [k=3] [stride=1]   C output channels, k x k kernel (odd: same padding), + bias
    relu                      ReLU
    maxpool [K=2]             K x K max-pool, stride K           (alias: pool)
    avgpool [K=2]             K x K average pool, stride K
    gap                       global average pool (H, W, C) -> (C,)   (alias: globalpool)
    linear D                  fully connected; D = "classes": the dataset's class count
    dropout P                 inverted dropout, 0 <= P < 1
    s2d [B=2]                 space-to-depth with block B
    identity                  y = x

The head is inferred: a model whose last unit outputs a vector classifies (softmax
cross-entropy, the vector length is the class count); one that outputs an image of the
input's shape predicts frames (``fullres``). :func:`parse_units` checks the text (kinds,
arguments, ranges); :func:`build_spec` also checks the shapes at a given input size. Every
error is one line naming the unit and layer, e.g.
``model.arch unit 4, layer 2 ("linear classes"): needs a vector input, got (16, 16, 32); put
"gap" before it``.

    python -m ssmpi.nn.architecture jobs/archs/probe.toml --resolution 32 --classes 4
    python -m ssmpi.nn.architecture tiny --units 6 --width 16   # a preset, as TOML text
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .models import ModelSpec, make_layers

__all__ = ["ArchitectureError", "parse_layer", "parse_units", "build_spec", "load_arch_file",
           "format_layer", "units_of_spec", "to_toml", "KINDS"]

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python < 3.11
    import tomli as tomllib  # type: ignore


class ArchitectureError(ValueError):
    """An architecture text is malformed or its shapes do not fit (one line)."""


# kind -> its syntax (for error messages)
KINDS = {
    "conv": "conv C [k=3] [stride=1]",
    "relu": "relu",
    "maxpool": "maxpool [K=2]",
    "avgpool": "avgpool [K=2]",
    "gap": "gap",
    "linear": "linear D (D = a count or 'classes')",
    "dropout": "dropout P",
    "s2d": "s2d [B=2]",
    "identity": "identity",
}
ALIASES = {"pool": "maxpool", "globalpool": "gap", "global_avgpool": "gap",
           "space_to_depth": "s2d", "dense": "linear"}
IMAGE_KINDS = ("conv", "pool", "avgpool", "gap", "s2d")  # descriptions that need (H, W, C)


def _where(unit: int, layer: Optional[int], text, origin: str) -> str:
    s = f"{origin} unit {unit}"
    if layer is not None:
        s += f", layer {layer} ({text!r})" if not isinstance(text, str) else \
            f', layer {layer} ("{text}")'
    return s


def _int(v: str, what: str, lo: int = 1) -> int:
    try:
        f = float(v)
    except ValueError:
        raise ArchitectureError(f"{what} must be an integer, got {v!r}") from None
    if not f.is_integer() or f < lo:
        raise ArchitectureError(f"{what} must be an integer >= {lo}, got {v}")
    return int(f)


def parse_layer(text) -> Tuple:
    """One layer text -> a layer description tuple of :mod:`ssmpi.nn.models`.

    ``"linear classes"`` -> ``("linear", "classes")`` (resolved by :func:`build_spec`).
    Raises :class:`ArchitectureError` (without position; :func:`parse_units` adds it)."""
    if not isinstance(text, str):
        raise ArchitectureError(f"a layer must be a string such as \"conv 16\", got {text!r}")
    parts = text.split()
    if not parts:
        raise ArchitectureError("empty layer")
    kind = ALIASES.get(parts[0].lower(), parts[0].lower())
    if kind not in KINDS:
        raise ArchitectureError(f"unknown layer kind {parts[0]!r} (known: "
                                f"{', '.join(KINDS)})")
    pos = [p for p in parts[1:] if "=" not in p]
    kw = {}
    for p in parts[1:]:
        if "=" in p:
            key, _, val = p.partition("=")
            if key in kw:
                raise ArchitectureError(f"{key} given twice")
            kw[key] = val
    allowed_kw = {"conv": ("k", "stride")}.get(kind, ())
    bad = [k for k in kw if k not in allowed_kw]
    if bad:
        raise ArchitectureError(f"{kind}: unknown option {bad[0]}= (allowed: "
                                f"{', '.join(a + '=' for a in allowed_kw) or 'none'}; "
                                f"syntax: {KINDS[kind]})")
    nmax = {"conv": 1, "maxpool": 1, "avgpool": 1, "linear": 1, "dropout": 1, "s2d": 1}
    nmin = {"conv": 1, "linear": 1, "dropout": 1}
    if len(pos) > nmax.get(kind, 0) or len(pos) < nmin.get(kind, 0):
        raise ArchitectureError(f"{kind}: expected {KINDS[kind]}, got {text!r}")
    if kind == "conv":
        c = _int(pos[0], "conv channels")
        k = _int(kw.get("k", "3"), "conv k")
        s = _int(kw.get("stride", "1"), "conv stride")
        if k % 2 == 0:
            raise ArchitectureError(f"conv k must be odd (same padding), got {k}")
        return ("conv", c, k, s)
    if kind in ("maxpool", "avgpool"):
        k = _int(pos[0], f"{kind} size") if pos else 2
        return ("pool" if kind == "maxpool" else "avgpool", k)
    if kind == "s2d":
        return ("s2d", _int(pos[0], "s2d block") if pos else 2)
    if kind == "linear":
        if pos[0].lower() == "classes":
            return ("linear", "classes")
        return ("linear", _int(pos[0], "linear size"))
    if kind == "dropout":
        try:
            p = float(pos[0])
        except ValueError:
            raise ArchitectureError(f"dropout P must be a number, got {pos[0]!r}") from None
        if not 0 <= p < 1:
            raise ArchitectureError(f"dropout P must be in [0, 1), got {p}")
        return ("dropout", p)
    return (kind,)


def parse_units(units, origin: str = "model.arch") -> List[List[Tuple]]:
    """A list of units (each a list of layer strings) -> module descriptions.

    Checks the text only (kinds, arguments, ranges); shapes are checked by
    :func:`build_spec`. Errors name ``origin``, the unit and the layer (1-based)."""
    if not isinstance(units, (list, tuple)) or not units:
        raise ArchitectureError(f"{origin}: expected a non-empty list of units, each a list "
                                f"of layers such as [\"conv 16\", \"relu\"]")
    out = []
    for u, unit in enumerate(units, start=1):
        if isinstance(unit, str) or not isinstance(unit, (list, tuple)):
            raise ArchitectureError(f"{_where(u, None, None, origin)}: expected a list of "
                                    f"layers, got {unit!r}")
        if not unit:
            raise ArchitectureError(f"{_where(u, None, None, origin)}: a unit needs at least "
                                    f"one layer (use \"identity\" for a pass-through unit)")
        mod = []
        for j, text in enumerate(unit, start=1):
            try:
                mod.append(parse_layer(text))
            except ArchitectureError as e:
                raise ArchitectureError(f"{_where(u, j, text, origin)}: {e}") from None
        out.append(mod)
    return out


def format_layer(d: Tuple) -> str:
    """A layer description tuple -> its text (the inverse of :func:`parse_layer`)."""
    kind = d[0]
    if kind == "conv":
        k = d[2] if len(d) > 2 else 3
        s = d[3] if len(d) > 3 else 1
        return f"conv {d[1]}" + (f" k={k}" if k != 3 else "") + (f" stride={s}" if s != 1
                                                                   else "")
    if kind == "pool":
        return f"maxpool {d[1] if len(d) > 1 else 2}"
    if kind in ("avgpool", "s2d"):
        return f"{kind} {d[1] if len(d) > 1 else 2}"
    if kind in ("linear", "dropout"):
        return f"{kind} {d[1]}"
    if kind in ("relu", "gap", "identity"):
        return kind
    raise ArchitectureError(f"layer {d!r} has no text form")


def units_of_spec(spec: ModelSpec, classes_placeholder: bool = True) -> List[List[str]]:
    """A built model's modules as text (the head's ``linear K`` as ``linear classes``)."""
    out = []
    for i, m in enumerate(spec.modules):
        unit = []
        for j, d in enumerate(m):
            if (classes_placeholder and d[0] == "linear" and i == len(spec.modules) - 1
                    and j == len(m) - 1 and spec.head == "classify"):
                unit.append("linear classes")
            else:
                unit.append(format_layer(d))
        out.append(unit)
    return out


def _shape_of(desc: Tuple, shape: tuple) -> tuple:
    """The per-sample output shape of one layer (or ArchitectureError)."""
    kind = desc[0]
    if kind in IMAGE_KINDS and len(shape) != 3:
        raise ArchitectureError(f"needs an image (H, W, C) input, got {shape}")
    if kind == "linear" and len(shape) != 1:
        raise ArchitectureError(f"needs a vector input, got {shape}; put \"gap\" before it")
    if kind in ("pool", "avgpool") and min(shape[:2]) < desc[1]:
        raise ArchitectureError(f"pool size {desc[1]} larger than its input {shape}")
    (layer,) = make_layers([desc])
    try:
        return tuple(layer.build(shape))
    except ValueError as e:
        raise ArchitectureError(str(e)) from None


def build_spec(units, num_classes: int, in_shape: Sequence[int], name: str = "custom",
               origin: str = "model.arch") -> ModelSpec:
    """A :class:`ModelSpec` from ``units`` (layer texts, or descriptions from
    :func:`parse_units`) for frames of ``in_shape`` (H, W, C), with every shape checked.

    ``linear classes`` becomes ``linear num_classes``. A last output that is a vector makes
    a ``classify`` head (its length must equal ``num_classes`` when that is > 0); an image of
    the input's shape makes a ``frames`` head; anything else is an error."""
    mods = units if _is_parsed(units) else parse_units(units, origin)
    shape = tuple(int(s) for s in in_shape)
    resolved = []
    for u, mod in enumerate(mods, start=1):
        rm = []
        for j, d in enumerate(mod, start=1):
            text = format_layer(d)
            if d[0] == "linear" and d[1] == "classes":
                if num_classes < 1:
                    raise ArchitectureError(f"{_where(u, j, text, origin)}: the class count "
                                            f"is unknown (set model.num_classes)")
                d = ("linear", int(num_classes))
            try:
                shape = _shape_of(d, shape)
            except ArchitectureError as e:
                raise ArchitectureError(f"{_where(u, j, text, origin)}: {e}") from None
            rm.append(d)
        resolved.append(rm)
    last = len(mods)
    if len(shape) == 1:
        head, ncls = "classify", shape[0]
        if num_classes and ncls != num_classes:
            raise ArchitectureError(f"{origin} unit {last}: the model outputs {ncls} values but "
                                    f"there are {num_classes} classes (use \"linear classes\")")
        if ncls < 2:
            raise ArchitectureError(f"{origin} unit {last}: a classifier needs >= 2 outputs, "
                                    f"got {ncls}")
    elif shape == tuple(in_shape):
        head, ncls = "frames", 0
    else:
        raise ArchitectureError(f"{origin} unit {last}: the model must end in a vector of class "
                                f"scores (\"gap\", \"linear classes\") or an image of the input's "
                                f"shape {tuple(in_shape)} (frame prediction), got {shape}")
    return ModelSpec(f"{name}({len(resolved)} units)", tuple(int(s) for s in in_shape),
                     resolved, head, ncls, notes=f"from {origin}",
                     extra={"arch": units_text(resolved, head)})


def units_text(mods, head: str = "classify") -> List[List[str]]:
    spec = ModelSpec("", (1, 1, 1), mods, head, 0)
    return units_of_spec(spec)


def _is_parsed(units) -> bool:
    return bool(units) and all(isinstance(m, list) and m and all(isinstance(d, tuple)
                                                                 for d in m) for m in units)


def load_arch_file(path) -> dict:
    """Read an architecture file: ``{"name", "about", "units"}`` (units parsed and checked as
    text). Errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ArchitectureError(f"architecture file {path} does not exist")
    try:
        d = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ArchitectureError(f"architecture file {path}: not valid TOML ({e})") from None
    extra = sorted(set(d) - {"name", "about", "units"})
    if extra:
        raise ArchitectureError(f"architecture file {path}: unknown key {extra[0]!r} (known: "
                                f"name, about, units)")
    if "units" not in d:
        raise ArchitectureError(f"architecture file {path}: no 'units' list")
    parse_units(d["units"], origin=str(path))
    name = d.get("name", p.stem)
    if not isinstance(name, str) or not name.strip():
        raise ArchitectureError(f"architecture file {path}: name must be a non-empty string")
    return {"name": name, "about": str(d.get("about", "")), "units": d["units"]}


def to_toml(units: List[List[str]], name: str = "", about: str = "") -> str:
    """The text of an architecture file."""
    import json

    lines = []
    if name:
        lines.append(f"name = {json.dumps(name)}")
    if about:
        lines.append(f"about = {json.dumps(about)}")
    lines.append("units = [")
    for u in units:
        lines.append("  [" + ", ".join(json.dumps(t) for t in u) + "],")
    lines.append("]")
    return "\n".join(lines) + "\n"


def describe(spec: ModelSpec) -> str:
    """One line per unit: its layers and output shape."""
    shape = tuple(spec.in_shape)
    lines = [f"{spec.name}: head {spec.head}, input {shape}"]
    for u, mod in enumerate(spec.modules, start=1):
        for d in mod:
            shape = _shape_of(d, shape)
        lines.append(f"  unit {u}: {', '.join(format_layer(d) for d in mod):<48} -> {shape}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    from . import models

    ap = argparse.ArgumentParser(prog="python -m ssmpi.nn.architecture",
                                 description="Check an architecture file and print its shapes, "
                                 "or print a preset as an architecture file.")
    presets = [m for m in models.MODELS if m != "custom"]
    ap.add_argument("source", help="an architecture file (.toml) or a preset name (" +
                    ", ".join(presets) + ")")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--units", type=int, default=None, help="preset: units (tiny, fullres)")
    ap.add_argument("--width", type=float, default=None, help="preset: width")
    a = ap.parse_args(argv)
    try:
        if a.source in presets:
            kw = {}
            if a.units is not None:
                kw["units"] = a.units
            if a.width is not None:
                kw["width"] = a.width if a.source in ("vgg8", "vgg16") else int(a.width)
            if a.source != "fullres":
                kw["num_classes"] = a.classes
            spec = models.get_model(a.source, resolution=a.resolution, **kw)
            sys.stdout.write(to_toml(units_of_spec(spec), name=a.source,
                                     about=f"preset {spec.name} at {a.resolution}x"
                                     f"{a.resolution}"))
            return 0
        d = load_arch_file(a.source)
        spec = build_spec(d["units"], a.classes, (a.resolution, a.resolution, a.channels),
                          name=d["name"], origin=a.source)
        sys.stdout.write(describe(spec) + "\n")
        return 0
    except ArchitectureError as e:
        sys.stderr.write(f"ssmpi.nn.architecture: error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
