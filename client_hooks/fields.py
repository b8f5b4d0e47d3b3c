"""Walk a batch (dict, tuple, list, namedtuple, dataclass, nested) into named fields.

Names are dotted paths: {"meta": {"coords_relative": t}} -> "meta.coords_relative";
(x, y) -> "0", "1"; a bare tensor -> the root name ("batch"). Leaves kept: tensors, NumPy
arrays (as tensors) and plain scalars (bool, int, float, NumPy scalars); everything else
(strings, None, objects) is skipped.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Union

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
    """A tensor, a NumPy array as a tensor, or a plain scalar; None for anything else."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, bool) or isinstance(obj, (int, float)):
        return obj
    mod = type(obj).__module__
    if mod == "numpy":
        import numpy as np  # only reached when the batch already holds NumPy values

        if isinstance(obj, np.ndarray) and obj.dtype.kind in "biufc":
            return torch.from_numpy(obj)
        if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
            return obj.item()  # training thread; a NumPy scalar: host memory already, no device wait
    return None


def walk(batch: Any, root: str = "batch") -> list[tuple[str, Leaf]]:
    """[(field path, tensor or scalar)] in the batch's own order, at most MAX_FIELDS."""
    out: list[tuple[str, Leaf]] = []

    def visit(obj: Any, name: str, depth: int) -> None:
        if len(out) >= MAX_FIELDS or depth > MAX_DEPTH:
            return
        value = leaf(obj)
        if value is not None:
            out.append((name or root, value))
            return
        for key, child in _children(obj):
            visit(child, _join(name, key), depth + 1)

    visit(batch, "", 0)
    return out
