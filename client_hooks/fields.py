"""Walk a batch (dict, tuple, list, namedtuple, dataclass, nested) into named fields.

Names are dotted paths: {"meta": {"coords_relative": t}} -> "meta.coords_relative";
(x, y) -> "0", "1"; a bare tensor -> the root name ("batch"). Leaves kept: tensors, NumPy
arrays (as tensors) and plain scalars (bool, int, float, NumPy scalars); everything else
(strings, None, objects) is skipped.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional, Union

import torch

MAX_DEPTH = 8
MAX_FIELDS = 256

Leaf = Union[torch.Tensor, int, float, bool]


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _children(obj: Any) -> Iterator[tuple[Any, Any]]:
    if isinstance(obj, dict):
        yield from obj.items()
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        yield from zip(obj._fields, obj)
    elif isinstance(obj, (list, tuple)):
        yield from enumerate(obj)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield f.name, getattr(obj, f.name)


def leaf(obj: Any):
    """A tensor, a NumPy array as a tensor, or a plain scalar; None for anything else (a meta
    tensor too: it holds no values)."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device.type != "meta" else None
    t = type(obj)
    if t is bool or t is int or t is float:
        return obj
    if t.__module__ == "numpy":
        import numpy as np  # only reached when the batch already holds NumPy values

        if isinstance(obj, np.ndarray) and obj.dtype.kind in "biufc":
            return _from_numpy(np, obj)
        if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
            return obj.item()  # training thread; a NumPy scalar (np.float64 too): host memory, no device wait
        return None
    if isinstance(obj, (int, float)):  # a subclass (an IntEnum; bool has none): the plain number
        return int(obj) if isinstance(obj, int) else float(obj)
    return None


def _from_numpy(np, a):
    """A NumPy array as a tensor: shared memory where torch can (most arrays); else a copy it
    can share, for an array torch cannot take as it is: negative strides (np.fliplr), another
    byte order, long double (as float64 or complex128)."""
    try:
        return torch.from_numpy(a)
    except (TypeError, ValueError):
        pass
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder not in "=|":
        a = a.astype(a.dtype.newbyteorder("="))
    try:
        return torch.from_numpy(a)
    except (TypeError, ValueError):
        return torch.from_numpy(a.astype(np.complex128 if a.dtype.kind == "c" else np.float64))


def _holds_leaf(obj: Any, depth: int = 0) -> bool:
    """Whether `obj` is or holds (within 16 levels) something `leaf` takes."""
    if leaf(obj) is not None:
        return True
    return depth < 16 and any(_holds_leaf(child, depth + 1) for _, child in _children(obj))


def walk(batch: Any, root: str = "batch", cut: Optional[list] = None) -> list[tuple[str, Leaf]]:
    """[(field path, tensor or scalar)] in the batch's own order, at most MAX_FIELDS, at most
    MAX_DEPTH levels down; `cut` (a list) gets the first path left out past either."""
    out: list[tuple[str, Leaf]] = []

    def visit(obj: Any, name: str, depth: int) -> None:
        if len(out) >= MAX_FIELDS or depth > MAX_DEPTH:
            if cut is not None and not cut and _holds_leaf(obj):
                cut.append(name)  # (a string left out there was never recorded anyway)
            return
        value = leaf(obj)
        if value is not None:
            out.append((name or root, value))
            return
        for key, child in _children(obj):
            visit(child, _join(name, key), depth + 1)

    visit(batch, "", 0)
    return out
