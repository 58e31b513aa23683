"""Argument checks shared by the ops: one clear ValueError naming the op and the argument."""

from __future__ import annotations


def check_float(op: str, name: str, a, dtype=None) -> None:
    """``a`` must be a floating array (of ``dtype`` when given)."""
    kind = getattr(getattr(a, "dtype", None), "kind", None)
    if kind != "f":
        raise ValueError(f"{op}: {name} must be a floating array, got dtype "
                         f"{getattr(a, 'dtype', type(a).__name__)}")
    if dtype is not None and a.dtype != dtype:
        raise ValueError(f"{op}: {name} has dtype {a.dtype} but x has dtype {dtype}")
