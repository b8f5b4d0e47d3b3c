"""The packed capture record, and the payloads of tensor and gradient statistics.

A capture step's statistics travel as one record of kind "packed" (name "capture"): the
step's values as raw little-endian float64 (base64 in JSON) and one entry per record, or per
group of records, saying which values it takes and how they become its payload. The
collector expands it into the records it stands for (`expand`, called by `wire.decode`): seq,
seq + 1, ... in entry order, each with the packed record's run, rank, world, time, step and
epoch. So the training process does no per-record decoding, and the stored records are the
same as if each had been sent on its own.

    data = {"values": <base64 of float64 values>,
            "entries": [[kind, [name, ...], [[lo, hi], ...], spec], ...]}

An entry's values are the concatenation of its [lo, hi) spans. Its spec, by its first item:
- ["tensor", shape, dtype, complex, extra]: tensor statistics (`tensor_stats_dict`) plus the
  extra fields (an object or null); values [nan, inf, nfinite, min, max, mean, std], or for a
  complex tensor nan, inf, nfinite then (min, max, mean, std) of real, imag, abs and angle;
  none for an empty tensor. One name.
- ["grads", counts, ranges, nparams, total(, scaled)]: one record per layer: the layers' rows
  (10 values each: nan, inf, nfinite, min, max, mean, std, nzero, norm, max_abs), then the
  weight norm of each of the nparams watched parameters, then each one's update norm; a
  layer's parameters are [a, b) of `ranges`, its element count in `counts`. With total, one
  more record: the norm of all gradients from the rows. With scaled (true), one more value
  last: the loss scale the gradients carried (AMP's GradScaler); min, max, mean, std, norm
  and max_abs are divided by it, and each record says it as "loss_scale". One name per record.
- ["grad_rows", counts, total, updated(, scaled)]: the "grads" records from rows only (the
  client's flat buffer of gradients and weights): the layers' gradient rows, then a row of
  each layer's weights, then (updated) a row of each layer's update (weights before the
  optimizer step minus after); a layer's weight and update norm are those rows' norms (NaN
  when the row counts a NaN, else inf when it counts an inf). Without updated, no update
  ratio. total and scaled as in "grads".
- ["total"(, scaled)]: {"norm": ...} of all gradients from layers' rows (10 values each),
  with scaled the loss scale last, as above. One name.
- ["norm"]: {"norm": value}. One name.
- ["value"]: {"value": value} (a metric such as the loss, read with the capture). One name.

Imports neither torch nor the web stack: the client (client_hooks) and the collector share
it, as they share collector.wire.
"""
from __future__ import annotations

import array
import math
import sys
from typing import Any, Optional

import msgspec

PACKED_KIND = "packed"
ENTRY_KINDS = ("loader_stats", "activations", "gradients", "metrics")
_PARTS = ("min", "max", "mean", "std")


class Entry(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    kind: str
    names: list[str]
    spans: list[tuple[int, int]]
    spec: list[Any]


class Packed(msgspec.Struct, forbid_unknown_fields=True):
    values: bytes
    entries: list[Entry]


# -- payloads (also used by the client's torch path) ---------------------------------------
def _part(vals: list, ok: bool) -> dict:
    return {k: (float(v) if ok else None) for k, v in zip(_PARTS, vals)}


def tensor_stats_dict(vals: list, shape: list, dtype: str, is_complex: bool) -> dict:
    """Tensor statistics from [nan, inf, nfinite, (min, max, mean, std) x 1 or 4]: min, max,
    mean and std are None when no element is finite (an empty tensor too)."""
    count = math.prod(shape)
    if not vals:  # empty tensor
        vals = [0.0, 0.0, 0.0] + [0.0] * (16 if is_complex else 4)
    nan, inf, nfin = int(vals[0]), int(vals[1]), int(vals[2])
    d = {"count": count, "nan": nan, "inf": inf}
    ok = nfin > 0
    if is_complex:
        for i, key in enumerate(("real", "imag", "abs", "angle")):
            d[key] = _part(vals[3 + 4 * i: 7 + 4 * i], ok)
    else:
        d.update(_part(vals[3:7], ok))
    d["shape"] = list(shape)
    d["dtype"] = dtype
    return d


def grad_stats_dict(vals: list, count: int, update_ratio: Optional[float]) -> dict:
    """A layer's gradients payload from its row (10 values) and its weight norm (11th).
    Statistics are over finite gradient elements."""
    nan, inf, nfin = int(vals[0]), int(vals[1]), int(vals[2])
    ok = nfin > 0
    f = (lambda v: float(v) if ok else None)
    return {"count": count, "mean": f(vals[5]), "std": f(vals[6]), "norm": f(vals[8]),
            "max_abs": f(vals[9]), "nan": nan, "inf": inf,
            "zero_frac": (vals[7] / count) if count else None,
            "weight_norm": float(vals[10]), "update_ratio": update_ratio}


def total_norm(rows: list) -> float:
    """The norm of all gradients from per-layer rows (nan, inf, ..., norm at 8; norm over
    finite elements): sqrt of the sum of squares, NaN if any element is NaN, else inf if any
    is infinite (what clip_grad_norm_ would see)."""
    if any(v[0] > 0 for v in rows):
        return math.nan
    if any(v[1] > 0 for v in rows):
        return math.inf
    return math.sqrt(sum(v[8] * v[8] for v in rows))


_SCALED = (3, 4, 5, 6, 8, 9)  # the values of a gradient row that scale with the loss scale


def unscaled_rows(rows: list, scale: Optional[float]) -> list:
    """Gradient rows with the values that scale with the gradients divided by `scale` (AMP's
    loss scale; rows as they are when it is None, or not a positive finite number)."""
    if scale is None or not (0 < scale < math.inf):
        return rows
    out = []
    for r in rows:
        r = list(r)
        for i in _SCALED:
            r[i] = r[i] / scale
        out.append(r)
    return out


def grads_payloads(v: list, counts: list, ranges: list, npar: int, total: bool,
                   scale: Optional[float] = None) -> list[dict]:
    """The "grads" spec's records (see the module docstring); scale: the loss scale the
    gradients carried, or None."""
    nl = len(counts)
    rows = unscaled_rows([v[j:j + 10] for j in range(0, 10 * nl, 10)], scale)
    wn_all, dn_all = v[10 * nl:10 * nl + npar], v[10 * nl + npar:10 * nl + 2 * npar]
    out = []
    for row, count, (a, b) in zip(rows, counts, ranges):
        wn = math.sqrt(sum(x * x for x in wn_all[a:b]))
        dn = math.sqrt(sum(x * x for x in dn_all[a:b]))
        out.append(grad_stats_dict(row + [wn], count, _ratio(dn, wn)))
    return _closed(out, rows, total, scale)


def _ratio(dn: float, wn: float) -> Optional[float]:
    """The update ratio of an update norm and a weight norm (None where it is NaN)."""
    ratio = dn / wn if wn else (None if dn == 0 else math.inf)
    return ratio if ratio == ratio else None


def _closed(out: list, rows: list, total: bool, scale: Optional[float]) -> list[dict]:
    """The layers' records `out`, then the total norm's (total), each with the loss scale."""
    if total:
        out.append({"norm": total_norm(rows)})
    if scale is not None:
        for d in out:
            d["loss_scale"] = scale
    return out


def _row_norm(row: list) -> float:
    """A row's norm as torch.linalg.vector_norm gives it: NaN with a NaN element, else inf
    with an infinite one, else the norm of the (finite) elements."""
    return math.nan if row[0] > 0 else math.inf if row[1] > 0 else row[8]


def grad_rows_payloads(v: list, counts: list, total: bool, updated: bool,
                       scale: Optional[float] = None) -> list[dict]:
    """The "grad_rows" spec's records (see the module docstring)."""
    nl = len(counts)
    rows = unscaled_rows([v[j:j + 10] for j in range(0, 10 * nl, 10)], scale)
    out = []
    for i, (row, count) in enumerate(zip(rows, counts)):
        wn = _row_norm(v[10 * (nl + i):10 * (nl + i) + 10])
        ratio = _ratio(_row_norm(v[10 * (2 * nl + i):10 * (2 * nl + i) + 10]), wn) if updated else None
        out.append(grad_stats_dict(row + [wn], count, ratio))
    return _closed(out, rows, total, scale)


# -- expansion (collector) ------------------------------------------------------------------
class PackedError(ValueError):
    """A packed record that cannot be expanded; the message says why (one line)."""


def _float_list(raw: bytes) -> list:
    if len(raw) % 8:
        raise PackedError(f"values hold {len(raw)} bytes, not a whole number of float64")
    a = array.array("d")
    a.frombytes(raw)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tolist()


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise PackedError(what)


def _payloads(e: Entry, v: list) -> list[dict]:
    """The payloads of one entry from its values; PackedError when they do not fit its spec."""
    spec = e.spec
    _check(len(spec) >= 1 and isinstance(spec[0], str), "spec must start with its name")
    how = spec[0]
    if how == "tensor":
        _check(len(spec) == 5 and isinstance(spec[1], list) and all(type(n) is int and n >= 0 for n in spec[1])
               and isinstance(spec[2], str) and isinstance(spec[3], bool)
               and (spec[4] is None or isinstance(spec[4], dict)),
               "tensor spec must be [\"tensor\", shape, dtype, complex, extra]")
        _check(len(v) in (0, 19 if spec[3] else 7), f"tensor values: {len(v)}")
        d = tensor_stats_dict(v, spec[1], spec[2], spec[3])
        return [{**d, **spec[4]} if spec[4] else d]
    if how == "grads":
        _check(len(spec) in (5, 6) and isinstance(spec[1], list) and isinstance(spec[2], list)
               and len(spec[1]) == len(spec[2]) and type(spec[3]) is int and isinstance(spec[4], bool)
               and (len(spec) == 5 or isinstance(spec[5], bool)),
               "grads spec must be [\"grads\", counts, ranges, nparams, total(, scaled)]")
        counts, ranges, npar = spec[1], spec[2], spec[3]
        scaled = len(spec) == 6 and spec[5]
        _check(all(type(c) is int and c >= 0 for c in counts), "grads counts must be integers >= 0")
        _check(all(isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r)
                   and 0 <= r[0] <= r[1] <= npar for r in ranges), "grads ranges must lie within nparams")
        _check(len(v) == 10 * len(counts) + 2 * npar + scaled, f"grads values: {len(v)}")
        return grads_payloads(v, counts, ranges, npar, spec[4], v[-1] if scaled else None)
    if how == "grad_rows":
        _check(len(spec) in (4, 5) and isinstance(spec[1], list) and isinstance(spec[2], bool)
               and isinstance(spec[3], bool) and (len(spec) == 4 or isinstance(spec[4], bool)),
               "grad_rows spec must be [\"grad_rows\", counts, total, updated(, scaled)]")
        counts, updated = spec[1], spec[3]
        scaled = len(spec) == 5 and spec[4]
        _check(all(type(c) is int and c >= 0 for c in counts), "grad_rows counts must be integers >= 0")
        _check(len(v) == 10 * len(counts) * (3 if updated else 2) + scaled, f"grad_rows values: {len(v)}")
        return grad_rows_payloads(v, counts, spec[2], updated, v[-1] if scaled else None)
    if how == "total":
        _check(len(spec) in (1, 2) and (len(spec) == 1 or isinstance(spec[1], bool)),
               "total spec must be [\"total\"(, scaled)]")
        scaled = len(spec) == 2 and spec[1]
        _check((len(v) - scaled) % 10 == 0, "total spec takes whole rows")
        rows = [v[j:j + 10] for j in range(0, len(v) - scaled, 10)]
        d = {"norm": total_norm(unscaled_rows(rows, v[-1] if scaled else None))}
        return [{**d, "loss_scale": v[-1]} if scaled else d]
    if how == "norm":
        _check(len(spec) == 1 and len(v) == 1, "norm spec takes one value")
        return [{"norm": v[0]}]
    if how == "value":
        _check(len(spec) == 1 and len(v) == 1, "value spec takes one value")
        return [{"value": v[0]}]
    raise PackedError(f"unknown spec {how[:32]!r}")


def expand(data: dict) -> list[tuple[str, str, dict]]:
    """A packed record's data as the (kind, name, payload) of the records it stands for, in
    order. Raises PackedError (a short reason) for anything malformed: nothing is expanded."""
    try:
        p = msgspec.convert(data, Packed)
    except msgspec.ValidationError as e:
        raise PackedError(f"packed data: {e}") from None
    values = _float_list(p.values)
    out = []
    for i, e in enumerate(p.entries):
        try:
            _check(e.kind in ENTRY_KINDS, f"kind {e.kind[:32]!r} cannot be packed")
            _check(all(0 < len(n) <= 256 for n in e.names), "a name must be 1..256 characters")
            _check(all(0 <= lo <= hi <= len(values) for lo, hi in e.spans), "a span lies outside the values")
            v = values[e.spans[0][0]:e.spans[0][1]] if len(e.spans) == 1 else \
                [x for lo, hi in e.spans for x in values[lo:hi]]
            payloads = _payloads(e, v)
            _check(len(payloads) == len(e.names), f"{len(e.names)} names for {len(payloads)} records")
        except PackedError as err:
            raise PackedError(f"packed entry {i}: {err}") from None
        except (TypeError, ValueError, OverflowError, IndexError) as err:
            raise PackedError(f"packed entry {i}: {type(err).__name__}: {err}") from None
        out.extend((e.kind, n, d) for n, d in zip(e.names, payloads))
    return out

