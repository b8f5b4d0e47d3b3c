"""Rules over the `gradients` stream: vanishing/exploding gradients, parameters that get no
gradient or never change, update-to-weight ratios far too small or too large.

Per layer, a series of {"norm", "count", "zero_frac", "weight_norm", "update_ratio", ...};
"_total" holds the total norm. Thresholds are module constants (docs/DIAGNOSIS.md)."""
from __future__ import annotations

from collector.diagnosis.common import by_name, finding, listed, median, num, sig

VANISH_RATIO = 1e-3        # first/last layer median grad norm below this: vanishing (high)
VANISH_RATIO_MEDIUM = 1e-2  # ... below this: medium
EXPLODE_RATIO = 1e3        # first/last above this: exploding (high); above 1e2: medium
EXPLODE_RATIO_MEDIUM = 1e2
EXPLODE_NORM = 1e4         # any layer's (or the total) grad norm above this: exploding (high)
VANISH_TOTAL = 1e-8        # total grad norm below this (but > 0): vanishing everywhere (high)
UPDATE_SMALL = 1e-6        # median update/weight below this (but > 0): too small (medium)
UPDATE_LARGE = 0.5         # largest update/weight of any capture above this: too large (high)
UPDATE_LARGE_MEDIUM = 0.1  # ... above this: medium
# A gradient norm is in the loss's units: a target or input in large units (x1e3) gives norms
# far above EXPLODE_NORM while Adam's steps stay ~lr. What hurts is the step it causes, so a
# huge norm is high only when some captured update/weight ratio exceeds UPDATE_LARGE_MEDIUM
# (or no ratio is known); with every known ratio below it, it is medium (units, not a blow-up).
NO_GRAD_MIN_CAPTURES = 2   # capture steps with module activations (and loss values) but not one
                           # gradient record: the loss does not reach the model (a detached output)


def _layers(records: list[dict]) -> dict[str, list[dict]]:
    return {k: v for k, v in by_name(records).items() if k != "_total"}


def _norm_median(series: list[dict]):
    return median(n for n in (num(r["data"].get("norm")) for r in series) if n is not None and n > 0)


def _steps(series: list[dict]) -> list:
    return [r.get("step") for r in series]


def gradient_flow(records: list[dict]) -> list[dict]:
    """Vanishing / exploding gradients, by layer, with the first/last layer ratio."""
    layers = _layers(records)
    norms = {k: _norm_median(v) for k, v in layers.items()}
    live = [(k, n) for k, n in norms.items() if n is not None]
    out = []
    total = [num(r["data"].get("norm")) for r in by_name(records).get("_total", [])]
    total = [t for t in total if t is not None]
    if total and 0 < max(total) < VANISH_TOTAL:
        out.append(finding("vanishing_gradients", "high",
                           {"total_norm_max": sig(max(total)), "threshold": VANISH_TOTAL,
                            "captures": len(total)},
                           "the whole gradient is ~0: check loss scaling, saturating outputs, detached tensors"))
    big = [(k, n) for k, n in live if n > EXPLODE_NORM] + [("_total", t) for t in total if t > EXPLODE_NORM][:1]
    if big:
        ev = {"layers": {k: sig(n) for k, n in big}, "threshold": EXPLODE_NORM}
        ur = [u for u in (num(r["data"].get("update_ratio")) for s in layers.values() for r in s)
              if u is not None]
        if ur and max(ur) <= UPDATE_LARGE_MEDIUM:
            ev["update_ratio_max"] = sig(max(ur))
            out.append(finding("exploding_gradients", "medium", ev,
                               f"gradient norms are large (up to {max(n for _, n in big):.3g}) but every step "
                               f"stays small (update/weight <= {max(ur):.2g}): the loss is in large units; "
                               "normalise the target or input"))
        else:
            out.append(finding("exploding_gradients", "high", ev,
                               "gradient norms are huge: lower the learning rate, clip gradients, normalise inputs"))
    if len(live) < 2:
        return out
    (first, n0), (last, n1) = live[0], live[-1]
    ratio = n0 / n1
    ev = {"first_layer": first, "last_layer": last, "first_norm": sig(n0), "last_norm": sig(n1),
          "ratio_first_to_last": sig(ratio),
          "by_layer": {k: sig(n) for k, n in live},
          "steps": _steps(layers[first])}
    if ratio < VANISH_RATIO_MEDIUM:
        sev = "high" if ratio < VANISH_RATIO else "medium"
        out.append(finding("vanishing_gradients", sev, ev,
                           f"gradients shrink {1 / ratio:.3g}x from {last} back to {first}: "
                           "check initialisation scale and skip connections"))
    elif ratio > EXPLODE_RATIO_MEDIUM:
        sev = "high" if ratio > EXPLODE_RATIO else "medium"
        out.append(finding("exploding_gradients", sev, ev,
                           f"gradients grow {ratio:.3g}x from {last} back to {first}: "
                           "check initialisation scale, normalisation, learning rate"))
    return out


def dead_parameters(records: list[dict], dead_tensors: tuple = ()) -> list[dict]:
    """Layers that never receive a gradient, and layers whose weights never change.
    dead_tensors: activations found all ~0 (dead_activation); an all-zero gradient is then
    most likely theirs (a ReLU that is 0 everywhere passes no gradient back), and the hint
    says so first."""
    no_grad, frozen = {}, {}
    for name, series in _layers(records).items():
        norms = [num(r["data"].get("norm")) for r in series]
        zf = [num(r["data"].get("zero_frac")) for r in series]
        if all((n is None or n == 0) and (z is None or z >= 1.0) for n, z in zip(norms, zf)) \
                and any(n == 0 or z == 1.0 for n, z in zip(norms, zf)):
            no_grad[name] = {"captures": len(series), "steps": _steps(series)}
            continue
        ur = [num(r["data"].get("update_ratio")) for r in series]
        ur_known = [u for u in ur if u is not None]
        if ur_known and all(u == 0 for u in ur_known):
            moving = [n for n in norms if n]
            frozen[name] = {"captures": len(ur_known), "steps": _steps(series),
                            "grad_norm_median": sig(median(moving)) if moving else 0.0}
    out = []
    if no_grad:
        ev = {"layers": no_grad, "count": len(no_grad)}
        if dead_tensors:
            ev["dead_activations"] = list(dead_tensors)
            hint = (f"{listed(no_grad, 30)} get an all-zero gradient: {listed(dead_tensors, 30)} "
                    "is ~0 everywhere (dead ReLUs pass no gradient): check bias/init, input scale, lr")
        else:
            hint = (f"{listed(no_grad)} get an all-zero gradient: dead units after them (ReLU ~0), "
                    "a detached graph, an unused module or requires_grad=False")
        out.append(finding("no_gradient", "high", ev, hint))
    if frozen:
        out.append(finding("frozen_parameters", "high",
                           {"layers": frozen, "count": len(frozen), "update_ratio": 0.0},
                           f"{listed(frozen)} get gradients but never change: are they in the "
                           "optimizer? (lr 0, frozen, or a parameter list that misses them)"))
    return out


def no_gradient_at_all(grads: list[dict], acts: list[dict], metrics: list[dict]) -> list[dict]:
    """The model ran forward in capture steps (its modules' activations came) and a loss was
    logged, yet not one gradient record arrived, not even the total norm (which the client
    sends whenever backward reaches a watched parameter, also with gradients=[]): backward
    never reaches the model, e.g. a loss computed on a detached output."""
    if grads:
        return []
    steps = sorted({r.get("step") for r in acts if isinstance(r.get("step"), int)
                    and isinstance(r.get("name"), str) and r["name"].endswith((":output", ":input"))})
    losses = [r for r in metrics if r.get("name") == "loss" and isinstance(r.get("data"), dict)
              and num(r["data"].get("value")) is not None]
    if len(steps) < NO_GRAD_MIN_CAPTURES or len(losses) < NO_GRAD_MIN_CAPTURES:
        return []
    return [finding("no_gradient", "high",
                    {"layers": {}, "count": 0, "gradient_records": 0, "capture_steps": steps,
                     "loss_points": len(losses)},
                    f"no gradient reached the model in {len(steps)} capture steps: the loss is "
                    "detached from its output (.detach(), .item(), numpy, no_grad) or backward() never runs")]


def update_ratios(records: list[dict]) -> list[dict]:
    """Update-to-weight ratio ||dw||/||w||: too small by its median over captures (a layer
    that barely moves), too large by its largest capture (one step that rewrites a large part
    of a layer is a problem whenever it happens, typically at the start)."""
    small, large, measured = {}, {}, 0
    for name, series in _layers(records).items():
        ur = [u for u in (num(r["data"].get("update_ratio")) for r in series) if u is not None and u > 0]
        m = median(ur)
        if m is None:
            continue
        measured += 1
        wn = median(w for w in (num(r["data"].get("weight_norm")) for r in series) if w is not None)
        ev = {"update_ratio_median": sig(m), "update_ratio_max": sig(max(ur)), "weight_norm": sig(wn),
              "captures": len(series), "measured": len(ur), "steps": _steps(series)}
        if m < UPDATE_SMALL:
            small[name] = ev
        elif max(ur) > UPDATE_LARGE_MEDIUM:
            ev["step_of_max"] = series[[num(r["data"].get("update_ratio")) for r in series].index(max(ur))].get("step")
            large[name] = ev
    out = []
    if small and len(small) == measured:
        # every layer with a measured update moves < 1e-6 of itself per step: even 1e4 steps
        # change no weight by more than 1%, so nothing can learn (a learning rate orders of
        # magnitude too small); only some layers that slow is a gradient-flow matter (medium)
        typical = median(v["update_ratio_median"] for v in small.values())
        out.append(finding("update_ratio_small", "high",
                           {"layers": small, "threshold": UPDATE_SMALL, "all_layers": True},
                           f"every watched layer ({listed(small, 40)}) barely moves per step (median "
                           f"update/weight {typical:.2g}): "
                           "the learning rate is far too small (or every gradient is)"))
    elif small:
        out.append(finding("update_ratio_small", "medium",
                           {"layers": small, "threshold": UPDATE_SMALL},
                           f"weights barely move per step ({listed(small)}): learning rate too small "
                           "or gradients too small"))
    if large:
        worst = max(v["update_ratio_max"] for v in large.values())
        sev = "high" if worst > UPDATE_LARGE else "medium"
        out.append(finding("update_ratio_large", sev,
                           {"layers": large, "worst": sig(worst), "threshold": UPDATE_LARGE_MEDIUM},
                           f"a step rewrites a large part of {listed(large)}: weights initialised "
                           "too small for the learning rate, or the learning rate is too large"))
    return out
