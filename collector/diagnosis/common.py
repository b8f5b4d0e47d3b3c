"""Helpers shared by the rules: findings, finite numbers, per-name series, medians."""
from __future__ import annotations

import math
import sys
from typing import Any, Iterable, Optional

from collector.wire import eval_split

SEVERITIES = ("high", "medium", "low")


def finding(rule: str, severity: str, evidence: dict, hint: str) -> dict:
    assert severity in SEVERITIES
    return {"rule": rule, "severity": severity, "evidence": evidence, "hint": hint}


def listed(names: Iterable[str], width: int = 60) -> str:
    """Names for a hint, as many as fit in about `width` characters: "a, b and 3 more"; a
    first name longer than that by its end ("...coder.target"), where paths differ."""
    names = list(names)
    shown = [n if len(n) <= width else "..." + n[-(width - 3):] for n in names[:1]]
    for n in names[1:]:
        if len(", ".join(shown + [n])) > width:
            break
        shown.append(n)
    rest = len(names) - len(shown)
    return ", ".join(shown) + (f" and {rest} more" if rest else "")


def num(x: Any) -> Optional[float]:
    """A finite float, or None (missing, null, NaN, Inf, non-numeric)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def median(xs: Iterable[float]) -> Optional[float]:
    v = sorted(xs)
    if not v:
        return None
    m = len(v) // 2
    return v[m] if len(v) % 2 else 0.5 * v[m - 1] + 0.5 * v[m]  # (no overflow near the float max)


def by_name(records: list[dict]) -> dict[str, list[dict]]:
    """Records grouped by name, each list in (step, seq) order; names in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        if isinstance(r.get("data"), dict) and isinstance(r.get("name"), str):
            groups.setdefault(r["name"], []).append(r)
    for g in groups.values():
        g.sort(key=lambda r: (r.get("step") if isinstance(r.get("step"), int) else -1,
                              r.get("seq") if isinstance(r.get("seq"), int) else 0))
    return groups


def components(data: dict) -> dict[str, dict]:
    """The real-valued stat blocks of a tensor-stats payload: {"": data} for a real tensor,
    {"real": ..., "imag": ..., "abs": ...} for a complex one (angle is left out: bounded by pi)."""
    subs = {k: data[k] for k in ("real", "imag", "abs") if isinstance(data.get(k), dict)}
    return subs or {"": data}


def max_abs(s: dict) -> Optional[float]:
    lo, hi = num(s.get("min")), num(s.get("max"))
    if lo is None or hi is None:
        return None
    return max(abs(lo), abs(hi))


def rms(s: dict) -> Optional[float]:
    """sqrt(mean^2 + std^2), without overflowing in the squares (None past the float range)."""
    m, sd = num(s.get("mean")), num(s.get("std"))
    if m is None or sd is None:
        return None
    r = math.hypot(m, sd)
    return r if math.isfinite(r) else sys.float_info.max  # (both finite: it is at least that)


def training(records: list[dict]) -> list[dict]:
    """The records taken in training: not those of an evaluation (data {"split": "val"}, what
    record(always=True) takes in an evaluation loop), whose values are another model mode's."""
    return [r for r in records if eval_split(r.get("data") or {}) is None]


def before_divergence(grads: list[dict], metrics: list[dict]) -> tuple[list[dict], Optional[int]]:
    """The gradient records the gradient rules judge, and the step a divergence began (None
    when there is none). A step is bad when a gradient capture counts NaN/Inf or the loss is
    null/NaN/Inf (a text value is not: `nonfinite` does not count it either). A divergence is
    bad steps that never recover: from the first bad step after the last good one (a capture
    or a loss value), every record is left out, since the norms and weights there are its
    wreck, not its cause (a layer's last finite norm beside another's 1e37 read as gradients
    vanishing 1e33x). Bad steps that the run recovers from (an AMP loss scale that overflowed
    at first, one bad batch) leave out their own records only. Records without a step are kept."""
    def bad_loss(r: dict) -> bool:
        if r.get("name") != "loss" or "value" not in r["data"]:
            return False
        v = r["data"]["value"]
        return v is None or (isinstance(v, float) and not math.isfinite(v))

    bad = {r.get("step") for r in grads
           if (num(r["data"].get("nan")) or 0) > 0 or (num(r["data"].get("inf")) or 0) > 0}
    bad |= {r.get("step") for r in metrics if bad_loss(r)}
    bad = {st for st in bad if isinstance(st, int)}
    if not bad:
        return grads, None
    seen = {r.get("step") for r in grads} | {r.get("step") for r in metrics if r.get("name") == "loss"}
    good = [st for st in seen if isinstance(st, int) and st not in bad]
    tail = [st for st in bad if not good or st > max(good)]
    cut = min(tail) if tail else None
    return [r for r in grads if not isinstance(r.get("step"), int)
            or (r["step"] not in bad and (cut is None or r["step"] < cut))], cut


def one_rank(records: list[dict]) -> list[dict]:
    """The records of the lowest rank present (rank 0 in DDP): the ranks' series are not mixed
    into one (their steps interleave, and "the latest capture" would be any rank's)."""
    ranks = {r.get("rank") for r in records if isinstance(r.get("rank"), int)}
    if len(ranks) <= 1:
        return records
    low = min(ranks)
    return [r for r in records if r.get("rank", low) == low]


def finite_json(x: Any) -> Any:
    """`x` with every non-finite float (NaN, Inf: what strict JSON cannot hold) as None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_json(v) for v in x]
    return x


def sig(x: Optional[float]) -> Optional[float]:
    """Round to 4 significant digits for evidence (keeps findings.json readable)."""
    if x is None or x == 0 or not math.isfinite(x):
        return x
    return float(f"{x:.4g}")
