"""Rules over tensor values and scalars: NaN/Inf anywhere, dead / saturated activations, a
collapsed output, a layer that passes almost nothing on, extreme model-input range,
prediction/target scale mismatch, loss plateau, loss spikes.

Judged on the latest capture of each activation (what the model does now; a weak layer on
the last half of its captures), on every record for NaN/Inf. Thresholds are module
constants (docs/DIAGNOSIS.md)."""
from __future__ import annotations

import bisect
import math

from collector.diagnosis.common import by_name, components, finding, listed, max_abs, median, num, rms, sig

DEAD_ABS = 1e-6          # an activation whose |values| all stay below this is dead
SAT_BOUND = 1.0          # tanh/sin-like range [-1, 1] (sigmoid [0, 1] is inside it)
SAT_TOUCH = 0.99         # ... whose values reach the bound
SAT_RMS = 0.9            # ... with an RMS this close to the bound: mass piled at +-1
COLLAPSE_ABS = 1e-6      # output std below this (absolute) ...
COLLAPSE_REL = 1e-3      # ... or below this fraction of |mean|: collapsed
WEAK_GAIN = 0.05         # a module's output RMS below this fraction of its input RMS: weak layer
WEAK_PERSIST = 3         # ... in every capture of the run's last half, at least this many: high
OUTPUT_NAMES = ("generator_output", "x_combined")
INPUT_NAMES = ("model_input",)
INPUT_RMS_HIGH = 1e2     # model-input RMS above this (or below INPUT_RMS_LOW): not normalised
INPUT_RMS_LOW = 1e-3
INPUT_PEAK_RATIO = 1e3   # max|x| / RMS above this: a few values dominate (medium)
SCALE_FAR = 2.0          # optimal scale outside [1/2, 2] ...
SCALE_GAIN = 0.5         # ... and MAE after it below half the raw MAE: scale mismatch (high)
SCALE_VERY_FAR = 4.0     # optimal scale outside [1/4, 4] ...
SCALE_GAIN_WEAK = 0.8    # ... and MAE after it below 80% of the raw MAE: high as well;
                         # far with MAE below 80% only: medium
SCALE_EXPLAINED = 0.2    # ... and the rescaled prediction removes at least this fraction of the
                         # target's mean square: below it, rescaling does little better than
                         # predicting 0 (an output unrelated to the target and far too large
                         # gets a tiny "optimal scale" that only shrinks it toward 0: not a gain
                         # error; measured 0.014-0.017 in such runs, 0.9+ for a true gain error)
DIVERGE_RISE = 1e2       # the finite loss rose above this many times its minimum before the
                         # first non-finite value: the run diverged (a noisy loss spikes 2-10x)
TARGET_NAMES = ("target", "targets", "y", "label", "labels", "gt", "ground_truth")
                         # loader fields taken as the target: a tensor field of this name that is
                         # one value throughout every captured train batch is a constant target
                         # (other constant fields, e.g. zero offsets, can be legitimate)
PLATEAU_MIN_POINTS = 8   # fewer loss values than this: no verdict
PLATEAU_PAIRS_MIN = 10   # values in each third of the window for the pairs' test to count
PLATEAU_REL = 0.05       # last half of the run: first-third -> last-third median decrease below 5%
PLATEAU_CONSISTENT = 0.75  # ... or a late value is below an early one in fewer than 75% of pairs,
                           # or fewer than 2 standard deviations above the 50% of a loss that
                           # only wanders (a Mann-Whitney test of the two thirds), whichever is
                           # lower: a long noisy window falling 10-20% beats early values in only
                           # ~60-70% of pairs, yet falls for sure. With fewer than
                           # PLATEAU_PAIRS_MIN values a third, pairs prove little: only late
                           # values that beat early ones in at most half the pairs count as flat
RECENT_REL = 0.01        # last third of the run: the same below 1% (low)
SPIKE_RATIO = 1e2        # a finite loss above this many times its baseline (the running minimum
                         # of its trailing median) that comes back below it: a loss spike. A noisy
                         # loss spikes 2-10x; measured at most 3.9x in healthy runs (MLP, FNO, demo)
                         # and 47x in the demo's loss-units fault (batches in other units), against
                         # 1e4-1e10x for Adam at lr 1.0
SPIKE_HIGH = 1e3         # ... above this many times: high (else medium), if its peak is also above
                         # where the loss started (the median of its first SPIKE_BASE_WINDOW
                         # values): a loss fitted to ~1e-6 that jumps to 1e-3 is 1000x its floor
                         # but still far below its start (noise near zero, not a blow-up): medium
SPIKE_BASE_WINDOW = 5    # the baseline's trailing median: one unusually low batch does not lower it
SPIKE_MAX_EPISODES = 10  # evidence lists this many spikes at most (the largest)


def nonfinite(records_by_kind: dict[str, list[dict]]) -> list[dict]:
    """Any NaN/Inf count in tensor or gradient stats, or a non-finite scalar metric."""
    hits, total = [], 0
    for kind in ("loader_stats", "activations", "gradients"):
        for r in records_by_kind.get(kind, []):
            d = r.get("data") if isinstance(r.get("data"), dict) else {}
            nan, inf = num(d.get("nan")) or 0, num(d.get("inf")) or 0
            if nan or inf:
                total += 1
                hits.append({"kind": kind, "name": r.get("name"), "step": r.get("step"),
                             "nan": int(nan), "inf": int(inf)})
    for r in records_by_kind.get("metrics", []):
        d = r.get("data") if isinstance(r.get("data"), dict) else {}
        if "value" in d and num(d["value"]) is None and not isinstance(d["value"], str):
            total += 1
            hits.append({"kind": "metrics", "name": r.get("name"), "step": r.get("step"),
                         "value": d["value"] if d["value"] is None else str(d["value"])})
    if not total:
        return []
    hits.sort(key=lambda h: (h["step"] if isinstance(h["step"], int) else -1))
    ev = {"records": total, "first": hits[:10]}
    where = f"NaN/Inf first seen in {hits[0]['kind']} {hits[0]['name']!r} at step {hits[0]['step']}"
    before = _loss_before(records_by_kind.get("metrics", []), hits[0]["step"])
    if before is None or before["rise"] is None:  # (too few values, or a loss <= 0: no ratio)
        return [finding("nonfinite", "high", ev,
                        f"{where}: check the loss (log/sqrt/divide), learning rate, input")]
    ev["loss_before"] = before
    if before["rise"] > DIVERGE_RISE:
        hint = (f"{where}, after the loss rose {before['rise']:.3g}x: training diverged; lower the "
                "learning rate (or clip gradients)")
    else:
        hint = (f"{where}, the loss steady before it: a bad batch (NaN/Inf in input or target) "
                "or the loss itself (log/sqrt/divide)")
    return [finding("nonfinite", "high", ev, hint)]


def _loss_before(metrics: list[dict], step) -> dict | None:
    """The finite loss values logged before `step` (the first non-finite one): their minimum,
    the last one and how far the last ones rose above that minimum (max of the last 3 over the
    minimum); None with fewer than 3 values to judge by."""
    if not isinstance(step, int):
        return None
    vals = [(r.get("step"), num(r["data"].get("value"))) for r in metrics
            if r.get("name") == "loss" and isinstance(r.get("data"), dict)
            and isinstance(r.get("step"), int) and r["step"] < step]
    vals = [v for _, v in sorted((st, v) for st, v in vals if v is not None)]
    if len(vals) < 3:
        return None
    lo, peak = min(vals), max(vals[-3:])
    return {"points": len(vals), "min": sig(lo), "last": sig(vals[-1]),
            "rise": sig(min(peak / lo, 1e300)) if lo > 0 else None}


def activations(records: list[dict]) -> list[dict]:
    """Dead, saturated and collapsed activations, from each name's latest capture."""
    dead, sat, collapsed = {}, {}, {}
    for name, series in by_name(records).items():
        last = series[-1]
        d, step = last["data"], last.get("step")
        if name in INPUT_NAMES:
            continue
        for part, s in components(d).items():
            key = f"{name}.{part}" if part else name
            ma, r, sd, m = max_abs(s), rms(s), num(s.get("std")), num(s.get("mean"))
            if ma is None:
                continue
            if ma < DEAD_ABS:
                dead[key] = {"max_abs": sig(ma), "step": step}
                continue
            lo, hi = num(s.get("min")), num(s.get("max"))
            if part != "abs" and lo >= -SAT_BOUND and hi <= SAT_BOUND and ma >= SAT_TOUCH \
                    and r is not None and r >= SAT_RMS:
                sat[key] = {"min": sig(lo), "max": sig(hi), "rms": sig(r), "step": step}
            if name in OUTPUT_NAMES and sd is not None and m is not None \
                    and (sd < COLLAPSE_ABS or sd < COLLAPSE_REL * abs(m)):
                collapsed[key] = {"std": sig(sd), "mean": sig(m), "step": step}
    out = []
    if dead:
        sev = "high" if any(k.split(".")[0] in OUTPUT_NAMES for k in dead) else "medium"
        out.append(finding("dead_activation", sev, {"tensors": dead, "threshold": DEAD_ABS},
                           f"{listed(dead)} are all ~0: dead units (ReLU), zero init, or a "
                           "multiplication by ~0 upstream"))
    if sat:
        out.append(finding("saturated_activation", "high", {"tensors": sat, "rms_threshold": SAT_RMS},
                           f"{listed(sat)} sit at the +-1 bounds of a tanh/sigmoid-like output, where "
                           "its gradient is ~0: normalise the input or scale the pre-activation"))
    if collapsed:
        out.append(finding("collapsed_output", "high", {"tensors": collapsed,
                                                        "abs_threshold": COLLAPSE_ABS,
                                                        "rel_threshold": COLLAPSE_REL},
                           f"the output ({listed(collapsed)}) has ~no spread (the same value "
                           "everywhere): the model ignores its input"))
    return out


def _block_rms(data: dict) -> float | None:
    """RMS of a stats payload: the real tensor's, or a complex one's abs."""
    parts = components(data)
    return rms(parts.get("abs") or parts.get("") or {})


def weak_layers(records: list[dict]) -> list[dict]:
    """Modules captured with both input and output (`inputs=True`) whose output RMS stays below
    WEAK_GAIN of their input RMS over the last half of their captures: a layer (or branch) too
    small to contribute, e.g. weights initialised far below unit gain that have not grown."""
    series = by_name(records)
    weak = {}
    for name, outs in series.items():
        if not name.endswith(":output"):
            continue
        path = name[: -len(":output")]
        ins = {r.get("step"): r for r in series.get(f"{path}:input", [])}
        gains = []  # (step, gain, input rms, output rms)
        for r in outs:
            i = ins.get(r.get("step"))
            ri, ro = (_block_rms(i["data"]) if i else None), _block_rms(r["data"])
            if ri is not None and ro is not None and ri > 0:
                gains.append((r.get("step"), ro / ri, ri, ro))
        if not gains:
            continue
        steps = [g[0] for g in gains if isinstance(g[0], int)]
        mid = (min(steps) + max(steps)) / 2 if steps else None
        late = [g for g in gains if mid is None or not isinstance(g[0], int) or g[0] >= mid]
        if all(g[1] < WEAK_GAIN for g in late):
            weak[path] = {"gain_median": sig(median(g[1] for g in late)), "gain_last": sig(late[-1][1]),
                          "input_rms": sig(late[-1][2]), "output_rms": sig(late[-1][3]),
                          "captures": len(late), "steps": [late[0][0], late[-1][0]]}
    if not weak:
        return []
    sev = "high" if any(v["captures"] >= WEAK_PERSIST for v in weak.values()) else "medium"
    return [finding("weak_layer", sev, {"layers": weak, "count": len(weak), "threshold": WEAK_GAIN},
                    f"{listed(weak)} pass on < 5% of their input's RMS through the last half of the "
                    "run: weights far below unit gain (init scale?), not grown by the optimizer")]


def input_range(records: list[dict]) -> list[dict]:
    """Model input not normalised (RMS far from 1) or dominated by a few huge values."""
    out = []
    for name, series in by_name(records).items():
        if name not in INPUT_NAMES:
            continue
        for part, s in components(series[-1]["data"]).items():
            ma, r = max_abs(s), rms(s)
            if ma is None or r is None:
                continue
            ratio = ma / r if r > 0 else math.inf
            ev = {"tensor": f"{name}.{part}" if part else name, "max_abs": sig(ma), "rms": sig(r),
                  "mean": sig(num(s.get("mean"))), "std": sig(num(s.get("std"))),
                  "peak_to_rms": sig(ratio), "step": series[-1].get("step")}
            if r > INPUT_RMS_HIGH or r < INPUT_RMS_LOW:
                out.append(finding("input_range", "high", ev,
                                   f"model input RMS {r:.3g} is far from 1: normalise it (e.g. "
                                   "divide by its RMS) before the network"))
            elif ratio > INPUT_PEAK_RATIO:
                out.append(finding("input_range", "medium", ev,
                                   f"a few input values are {ratio:.3g}x the RMS (e.g. a central "
                                   "peak): consider a log/sqrt or per-sample scaling"))
    return out


def scale_mismatch(records: list[dict]) -> list[dict]:
    """Prediction vs target off by a scale: optimal scale far from 1 and the error after it
    clearly lower than the raw error (latest patch-metrics record of each name)."""
    out = []
    for name, series in by_name(records).items():
        d = series[-1]["data"]
        s, mae, mae_s = num(d.get("optimal_scale")), num(d.get("mae")), num(d.get("mae_after_optimal_scale"))
        if s is None or mae is None or mae_s is None or mae <= 0:
            continue
        far = s <= 0 or s > SCALE_FAR or s < 1 / SCALE_FAR
        very_far = s <= 0 or s > SCALE_VERY_FAR or s < 1 / SCALE_VERY_FAR
        if not far or mae_s >= SCALE_GAIN_WEAK * mae:
            continue
        explained = _explained(s, num(d.get("mse")), num(d.get("mse_after_optimal_scale")))
        if explained is not None and explained < SCALE_EXPLAINED:
            continue  # rescaling barely beats predicting 0: the output is unrelated, not mis-scaled
        sev = "high" if mae_s < SCALE_GAIN * mae or very_far else "medium"
        out.append(finding("scale_mismatch", sev,
                           {"name": name, "optimal_scale": sig(s), "mae": sig(mae),
                            "mae_after_optimal_scale": sig(mae_s),
                            "mae_reduction": sig(1 - mae_s / mae), "explained": sig(explained),
                            "scaling": d.get("scaling"), "step": series[-1].get("step")},
                           f"the prediction is off by ~{s:.3g}x: look for a unit or gain error "
                           "(intensity vs amplitude, a stray broadcast, a missing scale constant)"))
    return out


def _explained(s: float, mse: float | None, mse_s: float | None) -> float | None:
    """1 - mse_after / mean(t^2): the fraction of the target's mean square that the rescaled
    prediction s*p removes, from the stored figures alone. With P = mean(p^2) and T = mean(t^2),
    the least-squares s gives mse - mse_s = P (1 - s)^2 and mse_s = T - s^2 P."""
    if mse is None or mse_s is None or s == 1 or mse < mse_s:
        return None
    P = (mse - mse_s) / (1 - s) ** 2
    T = mse_s + s * s * P
    if not math.isfinite(T) or T <= 0:
        return None
    return max(0.0, 1 - mse_s / T)


def constant_target(records: list[dict]) -> list[dict]:
    """A target-named loader field that holds one value in every captured train batch."""
    out = []
    for name, series in by_name(records).items():
        last = name.rsplit(".", 1)[-1].lower()
        if last not in TARGET_NAMES or (last == "y" and "." in name):
            continue  # (a nested "y" is more often a coordinate, e.g. pos.y, than the target)
        batches = [r for r in series if r["data"].get("split", "train") == "train"
                   and (num(r["data"].get("count")) or 0) > 1]
        ends = [(num(r["data"].get("min")), num(r["data"].get("max"))) for r in batches]
        if not ends or any(lo is None or hi is None or lo != hi for lo, hi in ends):
            continue
        values = sorted({lo for lo, _ in ends})
        # one batch could be constant by chance (a small batch of binary labels); every batch
        # of several captures is not chance
        sev = "high" if len(batches) >= 2 else "medium"
        same = f"is {values[0]:.4g} everywhere" if len(values) == 1 else "is one value within each batch"
        out.append(finding("constant_target", sev,
                           {"name": name, "values": [sig(v) for v in values[:10]], "captures": len(batches),
                            "steps": [r.get("step") for r in batches]},
                           f"loader field {name!r} {same} in all {len(batches)} captured batches: the model "
                           "can only learn a constant (a falling loss means nothing)"))
    return out


def loss_plateau(records: list[dict]) -> list[dict]:
    """No decrease of the loss over the last half of the run (high), or over its last third
    (low). The first and last third of the window are compared by their medians (a spike at
    either end does not decide the verdict) and by how consistently the late values lie below
    the early ones (a noisy loss whose medians drift is not progress). A fast drop in the
    first steps (a gain being absorbed) does not hide a loss that has been flat ever since."""
    steps, vals = _loss_series(records)
    n = len(vals)
    if n < PLATEAU_MIN_POINTS:
        return []
    w = max(PLATEAU_MIN_POINTS, n // 2)
    head, tail, rel = _thirds(vals[-w:])
    below = _fraction_below(vals[-w:])
    j = len(_ends(vals[-w:])[0])  # values a third
    wander = 0.5 + 2 * math.sqrt((2 * j + 1) / (12 * j * j))  # 2 sd above a wandering loss's 50%
    consistent = below >= min(PLATEAU_CONSISTENT, wander) if j >= PLATEAU_PAIRS_MIN else below > 0.5
    k = max(2, n // 4)
    run_rel = _decrease(sum(v / k for v in vals[:k]), sum(v / k for v in vals[-k:]))  # (no overflow)
    ev = {"steps": [steps[-w], steps[-1]], "points": n, "window": w, "first_median": sig(head),
          "last_median": sig(tail), "relative_decrease": sig(rel), "threshold": PLATEAU_REL,
          "late_below_early": sig(below),
          "consistency_threshold": sig(min(PLATEAU_CONSISTENT, wander)) if j >= PLATEAU_PAIRS_MIN else 0.5,
          "run_relative_decrease": sig(run_rel)}
    if rel < PLATEAU_REL or not consistent:
        if rel < PLATEAU_REL:
            why = f"median {_moved(rel)}"
        else:  # the median fell, but late values are not consistently below early ones
            why = f"median {_moved(rel)}, but late values beat early ones in only {below:.0%} of pairs"
        return [finding("loss_plateau", "high", ev,
                        f"the loss has not fallen over the last {w} of {n} steps ({why}; "
                        f"{_moved(run_rel)} over the run): check the learning rate and the loss")]
    recent = max(PLATEAU_MIN_POINTS, n // 3)
    _, _, rel2 = _thirds(vals[-recent:])
    if rel2 < RECENT_REL:
        ev.update({"recent_points": recent, "recent_relative_decrease": sig(rel2),
                   "recent_threshold": RECENT_REL})
        return [finding("loss_plateau", "low", ev,
                        f"the loss stopped falling over the last {recent} steps: "
                        "a learning-rate decay or more capacity may help")]
    return []


def _loss_series(records: list[dict]) -> tuple[list[int], list[float]]:
    """The finite `loss` values by step, averaged over ranks per step: (steps, values)."""
    per_step: dict[int, list[float]] = {}
    for r in by_name(records).get("loss", []):
        v, st = num(r["data"].get("value")), r.get("step")
        if v is not None and isinstance(st, int):
            per_step.setdefault(st, []).append(v)  # ranks: averaged per step
    steps = sorted(per_step)
    return steps, [sum(v / len(per_step[s]) for v in per_step[s]) for s in steps]


def loss_spikes(records: list[dict]) -> list[dict]:
    """A finite loss that jumps orders of magnitude above where it had been and comes back
    down: an unstable step (learning rate too large, no clipping or warmup), not noise.

    Baseline at step i: the lowest trailing median (of SPIKE_BASE_WINDOW values, fewer at the
    start) of the values before i, so a single unusually low batch does not lower it. A spike
    starts at a value above SPIKE_RATIO x that baseline and ends at the first value back below
    it; one still up at the last value (a divergence, usually ending in NaN) is not counted.
    Needs a positive loss (a ratio means nothing for a loss that can be <= 0). High only if
    the worst spike is above SPIKE_HIGH x its baseline and above where the loss started."""
    steps, vals = _loss_series(records)
    if len(vals) < 2 or min(vals) <= 0:
        return []
    episodes, base, cur = [], None, None
    for i, v in enumerate(vals):
        if cur is not None:
            if v > SPIKE_RATIO * cur["base"]:
                if v > cur["peak"]:
                    cur.update(peak=v, peak_i=i)
                cur["end_i"] = i
            else:
                episodes.append(cur)
                cur = None
        elif base is not None and v > SPIKE_RATIO * base:
            cur = {"base": base, "start_i": i, "end_i": i, "peak": v, "peak_i": i}
        base = min(base if base is not None else math.inf,
                   median(vals[max(0, i + 1 - SPIKE_BASE_WINDOW): i + 1]))
    if not episodes:
        return []
    ratios = [e["peak"] / e["base"] for e in episodes]
    worst = max(range(len(episodes)), key=ratios.__getitem__)
    shown = sorted(sorted(range(len(episodes)), key=lambda j: -ratios[j])[:SPIKE_MAX_EPISODES])
    ev = {"spikes": [{"steps": [steps[episodes[j]["start_i"]], steps[episodes[j]["end_i"]]],
                      "peak_step": steps[episodes[j]["peak_i"]], "peak": sig(episodes[j]["peak"]),
                      "baseline": sig(episodes[j]["base"]), "ratio": sig(ratios[j])} for j in shown],
          "count": len(episodes), "ratio_max": sig(ratios[worst]), "threshold": SPIKE_RATIO,
          "high_threshold": SPIKE_HIGH, "baseline_window": SPIKE_BASE_WINDOW}
    e = episodes[worst]
    times = "" if len(episodes) == 1 else f" ({len(episodes)} spikes)"
    start = median(vals[:SPIKE_BASE_WINDOW])
    ev["start_level"] = sig(start)
    sev = "high" if ratios[worst] > SPIKE_HIGH and e["peak"] > start else "medium"
    return [finding("loss_spikes", sev, ev,
                    f"the loss jumped {ratios[worst]:.3g}x above its running minimum at step "
                    f"{steps[e['peak_i']]} and came back down{times}: learning rate too large? "
                    "lower it, clip gradients or add warmup")]


def _moved(decrease: float) -> str:
    """A relative decrease in words: "down 9.7%", "up 4.0%", "unchanged"."""
    if abs(decrease) < 0.0005:
        return "unchanged"
    return f"{'down' if decrease > 0 else 'up'} {abs(decrease):.1%}"


def _ends(window: list[float]) -> tuple[list[float], list[float]]:
    """The first and the last third of `window`, 3 values each at least (so a single spike
    is never a median)."""
    j = max(3, len(window) // 3)
    return window[:j], window[-j:]


def _thirds(window: list[float]) -> tuple[float, float, float]:
    """Median of the first and of the last third of `window`, and the relative decrease."""
    early, late = _ends(window)
    head, tail = median(early), median(late)
    return head, tail, _decrease(head, tail)


def _fraction_below(window: list[float]) -> float:
    """Of all (early, late) pairs from the first and last third of `window`, the fraction in
    which the late value is lower (ties count half): 0.5 for noise around a flat level, 1.0
    for a loss that fell throughout. Sorted early values and bisection: O(j log j)."""
    early, late = _ends(window)
    early = sorted(early)
    wins = 0.0
    for v in late:
        lo, hi = bisect.bisect_left(early, v), bisect.bisect_right(early, v)
        wins += len(early) - hi + 0.5 * (hi - lo)
    return wins / (len(early) * len(late))


def _decrease(head: float, tail: float) -> float:
    """(head - tail) / |head|, computed so that values near the float max do not overflow."""
    return (head / abs(head) - tail / abs(head)) if head else 0.0
