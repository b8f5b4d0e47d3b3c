"""The diagnosis rules on synthetic stat streams (no training): each rule fires on its
pattern with evidence, stays quiet on a healthy stream, and respects its thresholds."""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import pytest

from collector.diagnosis import diagnose, load_run, write_findings
from collector.diagnosis import gradients as G
from collector.diagnosis import values as V

LAYERS = ["lift.0", "blocks.0.spectral", "blocks.1.spectral", "project.2"]


def rec(kind, name, data, step=0, seq=0):
    return {"v": 1, "run": "r", "rank": 0, "world": 1, "seq": seq, "t": 0.0, "kind": kind,
            "name": name, "step": step, "epoch": 0, "data": data}


def stats(mean=0.0, std=1.0, lo=-3.0, hi=3.0, nan=0, inf=0):
    return {"count": 100, "nan": nan, "inf": inf, "min": lo, "max": hi, "mean": mean, "std": std,
            "shape": [100], "dtype": "float32"}


def grad(norm=0.1, ratio=1e-3, zero_frac=0.0, wn=1.0, nan=0):
    return {"count": 100, "mean": 0.0, "std": norm / 10, "norm": norm, "max_abs": norm,
            "nan": nan, "inf": 0, "zero_frac": zero_frac, "weight_norm": wn, "update_ratio": ratio}


def grad_stream(norms=None, ratios=None, steps=(0, 4, 8), **kw):
    norms, ratios = norms or {}, ratios or {}
    out = []
    for st in steps:
        for L in LAYERS:
            out.append(rec("gradients", L, grad(norms.get(L, 0.1), ratios.get(L, 1e-3), **kw), st))
        out.append(rec("gradients", "_total", {"norm": 0.2}, st))
    return out


def loss_stream(values):
    return [rec("metrics", "loss", {"value": v}, step=i) for i, v in enumerate(values)]


def healthy():
    return {
        "gradients": grad_stream(),
        "activations": [rec("activations", "model_input", stats(0.35, 0.94, 0.0, 8.1)),
                        rec("activations", "generator_output", stats(-0.2, 0.3, -1.5, 1.2)),
                        rec("activations", "x_combined", {"count": 10, "nan": 0, "inf": 0,
                            "real": stats(0.3, 0.1, -0.2, 0.8), "imag": stats(0.1, 0.1, -0.3, 0.4),
                            "abs": stats(0.4, 0.1, 0.0, 0.9), "angle": stats(0.1, 0.2, -3, 3)})],
        "metrics": loss_stream([1.0 * 0.97 ** i for i in range(40)]),
        "patch_metrics": [rec("patch_metrics", "patch_metrics",
                              {"mae": 0.2, "mse": 0.05, "count": 10, "scaling": "none",
                               "scale_applied": False, "optimal_scale": 0.9,
                               "mae_after_optimal_scale": 0.19, "mse_after_optimal_scale": 0.05})],
        "loader_stats": [rec("loader_stats", "images", stats(1.0, 2.0, 0.0, 50.0))],
        "events": [],
    }


def rules(findings, severity=None):
    return {f["rule"] for f in findings if severity is None or f["severity"] == severity}


def one(findings, rule):
    got = [f for f in findings if f["rule"] == rule]
    assert len(got) == 1, findings
    return got[0]


def test_a_healthy_stream_gives_no_finding():
    assert diagnose(healthy()) == []


def test_an_empty_run_gives_no_finding_and_no_error():
    assert diagnose({}) == []
    assert diagnose({"gradients": [], "metrics": [rec("metrics", "loss", {"value": 1.0})]}) == []


def test_every_finding_has_rule_severity_evidence_and_a_one_line_hint():
    r = healthy()
    r["gradients"] = grad_stream(norms={"lift.0": 1e-7}, ratios={"project.2": 0.0})
    r["metrics"] = loss_stream([1.0] * 20)
    found = diagnose(r)
    assert len(found) >= 3
    for f in found:
        assert set(f) == {"rule", "severity", "evidence", "hint"}
        assert f["severity"] in ("high", "medium", "low")
        assert isinstance(f["evidence"], dict) and f["evidence"]
        assert "\n" not in f["hint"] and 0 < len(f["hint"]) < 200
        json.dumps(f, allow_nan=False)
    assert [f["severity"] for f in found] == sorted((f["severity"] for f in found),
                                                    key=["high", "medium", "low"].index)


@pytest.mark.parametrize("first_norm,severity", [(0.1 * 0.99e-3, "high"), (0.1 * 1.01e-3, "medium"),
                                                 (0.1 * 0.99e-2, "medium"), (0.1 * 1.01e-2, None)])
def test_vanishing_gradients_fire_on_the_first_to_last_ratio_at_their_thresholds(first_norm, severity):
    found = G.gradient_flow(grad_stream(norms={"lift.0": first_norm}))
    if severity is None:
        assert "vanishing_gradients" not in rules(found)
        return
    f = one(found, "vanishing_gradients")
    assert f["severity"] == severity
    ev = f["evidence"]
    assert ev["first_layer"] == "lift.0" and ev["last_layer"] == "project.2"
    assert math.isclose(ev["ratio_first_to_last"], first_norm / 0.1, rel_tol=1e-3)
    assert ev["steps"] == [0, 4, 8] and set(ev["by_layer"]) == set(LAYERS)


@pytest.mark.parametrize("first_norm,severity", [(0.1 * 1.01e3, "high"), (0.1 * 0.99e3, "medium"),
                                                 (0.1 * 0.99e2, None)])
def test_exploding_gradients_fire_on_the_first_to_last_ratio_at_their_thresholds(first_norm, severity):
    found = G.gradient_flow(grad_stream(norms={"lift.0": first_norm}))
    if severity is None:
        assert "exploding_gradients" not in rules(found)
    else:
        f = one(found, "exploding_gradients")
        assert f["severity"] == severity and f["evidence"]["first_layer"] == "lift.0"


def test_a_huge_absolute_gradient_norm_is_exploding_even_with_a_flat_profile():
    # no update ratio known (no optimizer watched): the norm alone decides, high
    found = G.gradient_flow(grad_stream(norms={L: 2e4 for L in LAYERS}, ratios={L: None for L in LAYERS}))
    f = one(found, "exploding_gradients")
    assert f["severity"] == "high" and set(f["evidence"]["layers"]) == set(LAYERS)
    assert G.gradient_flow(grad_stream(norms={L: 0.9e4 for L in LAYERS})) == []


def test_huge_gradient_norms_with_small_updates_are_medium_large_units_not_a_blow_up():
    """Seen in a real run: MLP, Adam lr 1e-3, target x1e3. The total norm reached 2e4 (the
    loss is in 1e6 units) while every update/weight stayed <= 0.015 and the loss fell; the old
    rule said high "lower the learning rate". Raw inputs (x1e4) gave the same picture."""
    calm = grad_stream(norms={"project.2": 1.0e4, "lift.0": 50.0}, ratios={L: 0.015 for L in LAYERS})
    calm += [rec("gradients", "_total", {"norm": 2.047e4}, 190)]
    f = one(G.gradient_flow(calm), "exploding_gradients")
    assert f["severity"] == "medium" and f["evidence"]["update_ratio_max"] == 0.015
    assert f["evidence"]["layers"] == {"_total": 2.047e4}
    assert "units" in f["hint"] and "target" in f["hint"]
    # one step that did rewrite a layer (Adam at lr 1.0: ratio 6.8): high as before
    wild = calm + [rec("gradients", "lift.0", grad(4.6e4, 6.8), 200)]
    f = one([x for x in G.gradient_flow(wild) if "layers" in x["evidence"]], "exploding_gradients")
    assert f["severity"] == "high" and "learning rate" in f["hint"]


def test_a_vanishing_total_gradient_is_named_even_when_layers_agree():
    stream = [r for r in grad_stream(norms={L: 1e-10 for L in LAYERS}) if r["name"] != "_total"]
    stream += [rec("gradients", "_total", {"norm": 2e-10}, 0)]
    f = one(G.gradient_flow(stream), "vanishing_gradients")
    assert f["evidence"]["total_norm_max"] == 2e-10


def test_a_layer_with_zero_gradient_in_every_capture_is_named_no_gradient():
    stream = [r for r in grad_stream() if r["name"] != "blocks.1.spectral"]
    stream += [rec("gradients", "blocks.1.spectral", grad(0.0, None, zero_frac=1.0), s) for s in (0, 4)]
    f = one(G.dead_parameters(stream), "no_gradient")
    assert list(f["evidence"]["layers"]) == ["blocks.1.spectral"]
    # one capture with a gradient is enough to clear it
    stream.append(rec("gradients", "blocks.1.spectral", grad(1e-3, 1e-3), 8))
    assert G.dead_parameters(stream) == []


def test_weights_with_gradients_that_never_change_are_frozen_parameters():
    found = G.dead_parameters(grad_stream(ratios={"project.2": 0.0, "lift.0": 0.0}))
    f = one(found, "frozen_parameters")
    assert f["severity"] == "high" and set(f["evidence"]["layers"]) == {"project.2", "lift.0"}
    assert f["evidence"]["layers"]["lift.0"]["grad_norm_median"] == 0.1
    # a single nonzero update means the optimizer does reach the layer
    s = grad_stream(ratios={"lift.0": 0.0})
    s.append(rec("gradients", "lift.0", grad(0.1, 1e-4), 12))
    assert G.dead_parameters(s) == []


@pytest.mark.parametrize("ratio,rule,severity", [
    (0.99e-6, "update_ratio_small", "medium"), (1.01e-6, None, None),
    (0.099, None, None), (0.11, "update_ratio_large", "medium"), (0.51, "update_ratio_large", "high")])
def test_update_to_weight_ratio_thresholds(ratio, rule, severity):
    found = G.update_ratios(grad_stream(ratios={"blocks.0.spectral": ratio}))
    if rule is None:
        assert found == []
    else:
        f = one(found, rule)
        assert f["severity"] == severity
        assert list(f["evidence"]["layers"]) == ["blocks.0.spectral"]
        assert math.isclose(f["evidence"]["layers"]["blocks.0.spectral"]["update_ratio_median"], ratio, rel_tol=1e-3)


def test_one_early_capture_with_a_huge_update_ratio_is_enough_for_update_ratio_large():
    s = grad_stream(ratios={"blocks.0.spectral": 0.01}, steps=(4, 8, 12, 16))
    s.append(rec("gradients", "blocks.0.spectral", grad(0.1, 0.84), 0))
    f = one(G.update_ratios(s), "update_ratio_large")
    ev = f["evidence"]["layers"]["blocks.0.spectral"]
    assert f["severity"] == "high" and ev["update_ratio_max"] == 0.84 and ev["step_of_max"] == 0
    assert ev["update_ratio_median"] == 0.01


def test_nan_or_inf_anywhere_is_high_with_the_first_occurrence():
    r = healthy()
    r["gradients"].append(rec("gradients", "project.2", grad(nan=3), step=12))
    r["activations"].append(rec("activations", "x_combined", {**stats(), "inf": 2}, step=8))
    f = one(diagnose(r), "nonfinite")
    assert f["severity"] == "high" and f["evidence"]["records"] == 2
    assert f["evidence"]["first"][0] == {"kind": "activations", "name": "x_combined", "step": 8, "nan": 0, "inf": 2}
    assert "step 8" in f["hint"]
    only_loss = healthy()
    only_loss["metrics"].append(rec("metrics", "loss", {"value": None}, step=41))
    assert one(diagnose(only_loss), "nonfinite")["evidence"]["first"][0]["name"] == "loss"


def test_an_all_zero_activation_is_dead_and_a_tiny_but_live_one_is_not():
    found = V.activations([rec("activations", "blocks:output", stats(0, 0, -0.9e-6, 0.9e-6))])
    f = one(found, "dead_activation")
    assert f["severity"] == "medium" and "blocks:output" in f["evidence"]["tensors"]
    assert V.activations([rec("activations", "blocks:output", stats(0, 1e-6, -1.1e-6, 1e-6))]) == []
    out = V.activations([rec("activations", "generator_output", stats(0, 0, 0, 0))])
    assert one(out, "dead_activation")["severity"] == "high"


def test_values_piled_at_the_tanh_bounds_are_saturated():
    sat = {"count": 10, "nan": 0, "inf": 0, "real": stats(0.1, 0.99, -1.0, 1.0),
           "imag": stats(0.0, 0.3, -0.9, 0.9), "abs": stats(1.2, 0.1, 0.5, 1.41)}
    f = one(V.activations([rec("activations", "x_combined", sat, step=20)]), "saturated_activation")
    assert list(f["evidence"]["tensors"]) == ["x_combined.real"] and f["evidence"]["tensors"]["x_combined.real"]["step"] == 20
    # spread across the range (RMS 0.89) or not touching the bound: not saturated
    assert V.activations([rec("activations", "a", stats(0.0, 0.89, -1.0, 1.0))]) == []
    assert V.activations([rec("activations", "a", stats(0.95, 0.01, 0.9, 0.98))]) == []
    # unbounded values are never called saturated
    assert V.activations([rec("activations", "a", stats(5.0, 0.1, 4.0, 6.0))]) == []


def test_only_the_latest_capture_of_an_activation_is_judged():
    s = [rec("activations", "a", stats(0, 0, 0, 0), step=0), rec("activations", "a", stats(), step=8)]
    assert V.activations(s) == []
    assert rules(V.activations(list(reversed(s)))) == set()  # order in the file does not matter


def test_an_output_with_no_spread_is_collapsed():
    f = one(V.activations([rec("activations", "generator_output", stats(0.5, 4e-4, 0.499, 0.501), 30)]),
            "collapsed_output")
    assert f["evidence"]["tensors"]["generator_output"] == {"std": 4e-4, "mean": 0.5, "step": 30}
    assert V.activations([rec("activations", "generator_output", stats(0.5, 6e-4, 0.49, 0.51))]) == []
    assert rules(V.activations([rec("activations", "generator_output", stats(0.0, 0.9e-6, -2e-6, 2e-6))])) \
        == {"collapsed_output"}
    # a hidden layer with no spread is not "the output"
    assert V.activations([rec("activations", "blocks:output", stats(0.5, 1e-7, 0.4999, 0.5001))]) == []


def io_stream(path, gains, steps=None, in_std=2.0):
    """A module's :input and :output captures with output RMS = gain * input RMS."""
    steps = steps or [4 * i for i in range(len(gains))]
    out = []
    for st, g in zip(steps, gains):
        out.append(rec("activations", f"{path}:input", stats(0.0, in_std), st))
        out.append(rec("activations", f"{path}:output", stats(0.0, g * in_std), st))
    return out


@pytest.mark.parametrize("late_gain,severity", [(0.049, "high"), (0.051, None), (0.0, "high")])
def test_a_layer_passing_on_under_5_percent_of_its_input_through_the_last_half_is_weak(late_gain, severity):
    # early captures do not count: a small layer that grows is fine; the last half decides
    recs = io_stream("blocks.0.spectral", [0.5, 0.5, 0.5, late_gain, late_gain, late_gain])
    recs += io_stream("blocks.0.conv", [0.6] * 6)
    found = V.weak_layers(recs)
    if severity is None:
        assert found == []
        return
    f = one(found, "weak_layer")
    ev = f["evidence"]
    assert f["severity"] == severity and list(ev["layers"]) == ["blocks.0.spectral"]
    layer = ev["layers"]["blocks.0.spectral"]
    assert layer["captures"] == 3 and layer["steps"] == [12, 20] and ev["threshold"] == 0.05
    assert layer["gain_last"] == pytest.approx(late_gain) and layer["input_rms"] == pytest.approx(2.0)


def test_weak_layer_needs_input_and_output_of_the_same_step_and_a_live_input():
    # a weak layer that woke up in the last half is not weak; one late capture alone is medium
    assert V.weak_layers(io_stream("a", [0.01, 0.01, 0.01, 0.3, 0.3, 0.3])) == []
    assert one(V.weak_layers(io_stream("a", [0.01])), "weak_layer")["severity"] == "medium"
    # outputs without inputs (the default capture), or an input of RMS 0: no verdict
    assert V.weak_layers([r for r in io_stream("a", [0.01] * 4) if r["name"].endswith(":output")]) == []
    assert V.weak_layers(io_stream("a", [0.0] * 4, in_std=0.0)) == []
    # a complex output is judged by its abs
    c = {"count": 4, "nan": 0, "inf": 0, "real": stats(0, 1), "imag": stats(0, 1), "abs": stats(0.01, 0.001)}
    got = V.weak_layers([rec("activations", "f:input", stats(0, 1), 8), rec("activations", "f:output", c, 8)])
    assert one(got, "weak_layer")["evidence"]["layers"]["f"]["output_rms"] == pytest.approx(0.01005, rel=1e-3)
    # and the rule is part of diagnose()
    r = healthy()
    r["activations"] += io_stream("blocks.1.spectral", [0.02] * 6)
    assert rules(diagnose(r), "high") == {"weak_layer"}


@pytest.mark.parametrize("mean,std,hi,severity", [
    (50.0, 90.0, 1e4, "high"), (40.0, 90.0, 900.0, None), (1e-4, 5e-4, 1e-2, "high"),
    (0.3, 0.9, 1.2e3, "medium"), (0.3, 0.9, 0.9e3, None)])
def test_model_input_far_from_unit_scale_or_peaky_is_an_input_range_finding(mean, std, hi, severity):
    found = V.input_range([rec("activations", "model_input", stats(mean, std, 0.0, hi), 0)])
    if severity is None:
        assert found == []
    else:
        f = one(found, "input_range")
        assert f["severity"] == severity
        assert f["evidence"]["max_abs"] == hi and f["evidence"]["tensor"] == "model_input"


def pm(scale, mae, mae_s, explained=0.9):
    """A patch-metrics record whose MSE figures are those of a least-squares scale that removes
    `explained` of the target's mean square T (the prediction a scaled copy of the target,
    up to noise): mse_after = (1 - explained) T, s^2 P = explained T, mse = mse_after + P (1-s)^2."""
    mse_s = mae_s ** 2
    T = mse_s / (1 - explained)
    P = explained * T / scale ** 2
    return [rec("patch_metrics", "patch_metrics", {"mae": mae, "mse": mse_s + P * (1 - scale) ** 2, "count": 5,
            "scaling": "none", "scale_applied": False, "optimal_scale": scale,
            "mae_after_optimal_scale": mae_s, "mse_after_optimal_scale": mse_s}, step=40)]


@pytest.mark.parametrize("scale,mae_s,severity", [
    (16.0, 0.05, "high"), (0.06, 0.05, "high"), (2.01, 0.099, "high"), (1.99, 0.01, None),
    (0.51, 0.01, None), (3.9, 0.101, "medium"), (3.9, 0.159, "medium"), (3.9, 0.161, None),
    (4.1, 0.159, "high"), (0.24, 0.15, "high"), (16.0, 0.161, None), (-0.5, 0.05, "high")])
def test_scale_mismatch_needs_a_far_scale_and_a_clearly_lower_scaled_error(scale, mae_s, severity):
    found = V.scale_mismatch(pm(scale, 0.2, mae_s))
    assert (rules(found) == {"scale_mismatch"}) is (severity is not None)
    if severity:
        assert found[0]["severity"] == severity
        ev = found[0]["evidence"]
        assert ev["optimal_scale"] == scale and ev["mae"] == 0.2 and ev["step"] == 40


NOISY_TAIL = [1.0] * 20 + [1.026, 0.719, 1.063, 0.977, 0.829, 0.691, 1.105, 0.905, 1.025, 1.102,
                          1.017, 1.118, 0.851, 1.051, 0.87, 1.113, 1.081, 0.688, 0.704, 0.741]


@pytest.mark.parametrize("values,severity", [
    ([1.0] * 20, "high"),
    ([1.0 - 0.006 * i for i in range(20)], "high"),      # last half: medians fall 4.5%
    ([1.0 - 0.007 * i for i in range(20)], None),        # last half: 5.3%, still decreasing
    ([0.9 ** i for i in range(10)] + [0.35] * 20, "high"),  # a fast drop, then flat ever since
    ([1.0 - 0.02 * i for i in range(20)] + [0.6] * 10, "low"),  # fell until the last third
    ([1.0 - 0.005 * i for i in range(39)] + [5.0], None),  # one spike at the end decides nothing
    ([1.0 - 0.02 * (i % 2) - 0.001 * i for i in range(40)], "high"),  # noise over a 2% drift
    (NOISY_TAIL, "high"),  # last-half medians fall 11%, but late < early in only half the pairs
    ([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], None),         # too few points for a verdict
    ([1.0 + 0.01 * i for i in range(20)], "high"),       # rising is not decreasing
])
def test_loss_plateau_over_the_run_and_lately(values, severity):
    found = V.loss_plateau(loss_stream(values))
    if severity is None:
        assert found == []
    else:
        f = one(found, "loss_plateau")
        assert f["severity"] == severity and f["evidence"]["points"] == len(values)


C_EAGER = [0.5968, 0.3384, 0.1551, 0.0834, 0.0987, 0.0904, 0.0742, 0.073, 0.0929, 0.0721, 0.0909, 0.0796]


def test_a_falling_loss_is_no_plateau_for_pairs_that_prove_nothing():
    """Two losses that fall, flagged high before: a short real run (12 steps, down 78%; its
    last 8: median down 12%, 6 of 9 pairs, which 3 values a third cannot tell from chance),
    and a long noisy one (400 steps, every value 0.6-1.4x a trend that falls 20% over the last
    half: late values beat early ones in ~65% of pairs, far above a wandering loss's 50%).
    A long noisy loss with no trend is still a plateau."""
    import random

    assert V.loss_plateau(loss_stream(C_EAGER)) == []
    rnd = random.Random(1)
    trend = [1.0 - 0.2 * max(0, i - 200) / 200 for i in range(400)]
    falling = [t * rnd.uniform(0.6, 1.4) for t in trend]
    assert V.loss_plateau(loss_stream(falling)) == []
    flat = [rnd.uniform(0.6, 1.4) for _ in range(400)]
    f = one(V.loss_plateau(loss_stream(flat)), "loss_plateau")
    assert f["severity"] == "high" and f["evidence"]["consistency_threshold"] < 0.75


def test_a_noisy_tail_is_a_plateau_by_consistency_not_by_medians():
    f = one(V.loss_plateau(loss_stream(NOISY_TAIL)), "loss_plateau")
    ev = f["evidence"]
    assert ev["relative_decrease"] > 0.05 and ev["late_below_early"] == 0.5
    assert ev["steps"] == [20, 39] and ev["window"] == 20
    # the hint says which way the median moved and why that is not progress
    moved = f"(median down {ev['relative_decrease']:.1%}, but late values beat early ones in only 50% of pairs"
    assert moved in f["hint"]
    assert len(f["hint"]) < 200


@pytest.mark.parametrize("values,says", [
    ([1.0 + 0.01 * i for i in range(20)], "(median up "),
    ([1.0] * 20, "(median unchanged; unchanged over the run)"),
    ([1.0 - 0.006 * i for i in range(20)], "(median down 4."),
])
def test_the_plateau_hint_says_which_way_the_loss_moved(values, says):
    assert says in one(V.loss_plateau(loss_stream(values)), "loss_plateau")["hint"]


def test_losses_of_several_ranks_are_averaged_per_step():
    flat = [{**rec("metrics", "loss", {"value": 1.0}, step=i), "rank": r} for i in range(20) for r in (0, 1)]
    assert one(V.loss_plateau(flat), "loss_plateau")["evidence"]["points"] == 20
    falling = [rec("metrics", "loss", {"value": 1.0 - 0.02 * i}, step=i) for i in range(20)]
    assert V.loss_plateau(falling + [r for r in flat if r["rank"] == 1]) == []  # mean falls ~15%


def write_run(tmp_path, records, torn=True):
    run = tmp_path / "run-1"
    run.mkdir()
    for kind, fname in (("gradients", "gradients.jsonl"), ("metrics", "metrics.jsonl"),
                        ("activations", "activations.jsonl"), ("loader_stats", "loader_stats.jsonl")):
        with open(run / fname, "w") as f:
            for r in records.get(kind, []):
                f.write(json.dumps(r) + "\n")
            if torn and kind == "metrics":
                f.write('{"v":1,"run":"run-1","kind":"metrics","name":"loss","da')
    with open(run / "patch_metrics.json", "w") as f:
        json.dump({r["name"]: r for r in records.get("patch_metrics", [])}, f)
    return run


def test_load_run_reads_every_stream_and_skips_a_torn_last_line(tmp_path):
    r = healthy()
    run = write_run(tmp_path, r)
    got = load_run(str(run))
    assert len(got["gradients"]) == len(r["gradients"])
    assert len(got["metrics"]) == len(r["metrics"])  # the torn line is skipped
    assert got["patch_metrics"][0]["data"]["optimal_scale"] == 0.9
    assert got["events"] == []
    assert load_run(str(tmp_path / "missing")) == {k: [] for k in got}


def test_write_findings_writes_findings_json_atomically(tmp_path):
    r = healthy()
    r["metrics"] = loss_stream([2.0] * 30)
    run = write_run(tmp_path, r)
    found = write_findings(str(run))
    doc = json.loads((run / "findings.json").read_text())
    assert doc["findings"] == found and rules(found) == {"loss_plateau"}
    assert doc["run"] == "run-1" and doc["records"]["metrics"] == 30
    assert sorted(os.listdir(run)) == sorted(["gradients.jsonl", "metrics.jsonl", "activations.jsonl",
                                              "loader_stats.jsonl", "patch_metrics.json", "findings.json"])


def test_report_prints_text_and_json_without_a_collector(tmp_path, capsys):
    from collector.diagnosis.report import report_main

    r = healthy()
    r["gradients"] = grad_stream(ratios={L: 0.0 for L in LAYERS})
    run = write_run(tmp_path, r)
    assert report_main(argparse.Namespace(run_dir=str(run), json=False)) == 0
    text = capsys.readouterr().out
    assert "[HIGH] frozen_parameters:" in text and "evidence:" in text
    assert report_main(argparse.Namespace(run_dir=str(run), json=True)) == 0
    assert rules(json.loads(capsys.readouterr().out)) == {"frozen_parameters"}


def test_a_layer_finding_names_its_layers_in_the_hint():
    from collector.diagnosis.common import listed

    r = healthy()
    r["gradients"] = grad_stream(ratios={"project.2": 0.0})
    assert one(diagnose(r), "frozen_parameters")["hint"].startswith("project.2 get gradients but never change")
    many = [f"blocks.{i}.spectral" for i in range(12)]
    assert listed(many) == "blocks.0.spectral, blocks.1.spectral, blocks.2.spectral and 9 more"
    # one is always named, one longer than the width by its end (where paths differ)
    assert listed(["a-very-long-layer-name" * 4]) == "..." + ("a-very-long-layer-name" * 4)[-57:]
    assert listed(["a-very-long-layer-name" * 2]) == "a-very-long-layer-name" * 2
    assert listed(["x", "y"]) == "x, y"


def test_the_diagnosis_package_imports_no_torch_lightning_or_web_stack():
    code = ("import sys, collector.diagnosis, collector.diagnosis.report; "
            "bad = [m for m in ('torch', 'lightning', 'fastapi', 'uvicorn') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert p.returncode == 0, p.stdout + p.stderr


def test_huge_finite_values_never_stop_findings_json(tmp_path):
    """A loss of 1e308 and a model input near the float max: the rules do not overflow (the
    input's RMS stays finite and is flagged), and findings.json is written as strict JSON with
    null for anything not finite (it raised "Out of range float values" before)."""
    huge = {"count": 4, "nan": 0, "inf": 0, "min": -1e308, "max": 1e308, "mean": 1e308, "std": 1e308}
    r = {"metrics": loss_stream([1e308] * 60),
         "activations": [rec("activations", n, huge, step=i, seq=i) for i in range(5)
                         for n in ("model_input", "generator_output")]}
    run = write_run(tmp_path, r, torn=False)
    found = write_findings(str(run))

    def strict(s):
        raise ValueError(f"non-finite {s} in findings.json")
    doc = json.loads((run / "findings.json").read_text(), parse_constant=strict)
    assert doc["findings"] == found and {"input_range", "loss_plateau"} <= rules(found)
    ev = one(found, "input_range")["evidence"]
    assert ev["rms"] == pytest.approx(1.414e308) and one(found, "input_range")["severity"] == "high"
    assert one(found, "loss_plateau")["evidence"]["first_median"] == 1e308
    # whatever a rule puts in its evidence, nothing non-finite comes out
    assert diagnose({"activations": [rec("activations", "model_input", {**huge, "mean": 1.7e308,
                                                                         "std": 1.7e308})]})


def test_ranks_are_not_mixed_the_lowest_rank_is_judged():
    """DDP: rank 1 sends its captures after rank 0's at each step. The latest capture of an
    activation is rank 0's latest, not whichever rank came last; the loss stays averaged."""
    def ranked(r, rank):
        return {**r, "rank": rank}
    acts = []
    for i in range(3):
        acts.append(ranked(rec("activations", "generator_output", stats(0.3, 0.5), step=i, seq=2 * i), 0))
        acts.append(ranked(rec("activations", "generator_output", stats(0.0, 0.0, 0.0, 0.0), step=i, seq=2 * i + 1), 1))
    assert "dead_activation" not in rules(diagnose({"activations": acts}))
    assert "dead_activation" in rules(diagnose({"activations": [ranked(a, 0) for a in acts if a["rank"] == 1]}))


def test_an_evaluations_activations_are_not_judged_as_trainings():
    """record(always=True) in an evaluation loop (data {"split": "val"}) comes after the last
    training capture: an all-zero evaluation value (say, a probe batch of zeros) is not the
    latest capture of the training output; the same values in training are dead."""
    train = [rec("activations", "generator_output", stats(0.3, 0.5), step=i, seq=i) for i in range(3)]
    zeros = stats(0.0, 0.0, 0.0, 0.0)
    evals = [rec("activations", "generator_output", {**zeros, "split": "val"}, step=2, seq=3 + i) for i in range(2)]
    assert "dead_activation" not in rules(diagnose({"activations": train + evals}))
    trained = [rec("activations", "generator_output", {**zeros, "split": "train"}, step=3, seq=5)]
    assert "dead_activation" in rules(diagnose({"activations": train + evals + trained}))


def test_after_a_divergence_the_gradient_rules_judge_only_the_captures_before_it():
    """A run that diverges at step 4 (NaN from there, one layer's norm at 3.7e37 as it goes):
    nonfinite says so; the gradient rules judge steps 0-3 only (before, the first layer's last
    finite norm beside the last layer's 3.7e37 was "gradients shrink 1e33x", high, beside
    exploding_gradients: a report contradicting itself)."""
    r = healthy()
    r["gradients"] = grad_stream(steps=(0, 2))
    nan = {"count": 100, "mean": None, "std": None, "norm": None, "max_abs": None, "nan": 100, "inf": 0,
           "zero_frac": 0.0, "weight_norm": None, "update_ratio": None}
    for st in (4, 6):
        r["gradients"] += [rec("gradients", "lift.0", nan, st), rec("gradients", "blocks.0.spectral", nan, st),
                           rec("gradients", "blocks.1.spectral", grad(norm=3.7e37, ratio=40.0, wn=2.6e18), st),
                           rec("gradients", "project.2", grad(norm=3.7e37, ratio=40.0, wn=2.6e18), st)]
    r["metrics"] = loss_stream([1.0, 0.9, 2.0, 50.0] + [None] * 4)
    found = diagnose(r)
    assert "nonfinite" in rules(found)
    assert not {"vanishing_gradients", "exploding_gradients", "update_ratio_large"} & set(rules(found)), found
    # the captures before are still judged: a layer frozen from the start is found, said so
    r["gradients"] = [g if g["name"] != "lift.0" or g["step"] >= 4 else
                      {**g, "data": {**g["data"], "update_ratio": 0.0}} for g in r["gradients"]]
    f = one(diagnose(r), "frozen_parameters")
    assert f["evidence"]["before_step"] == 4 and list(f["evidence"]["layers"]) == ["lift.0"]


def test_non_finite_steps_the_run_recovers_from_leave_out_only_their_own_captures():
    """An AMP loss scale that overflows at first (inf gradients at step 0, the step skipped)
    or one bad batch is no divergence: the gradient rules still judge every other capture (a
    cut at the first bad step muted them for the whole run). A loss logged as text is no
    non-finite value either (`nonfinite` does not count it)."""
    r = healthy()
    r["gradients"] = grad_stream(norms={"lift.0": 1e-6}, steps=(0, 4, 8, 12))
    r["gradients"] = [g if g["step"] != 0 else {**g, "data": {**g["data"], "inf": 5, "norm": None}}
                      for g in r["gradients"]]
    f = one(diagnose(r), "vanishing_gradients")
    assert "before_step" not in f["evidence"] and f["evidence"]["steps"] == [4, 8, 12]
    r = healthy()
    r["gradients"] = grad_stream(norms={"lift.0": 1e-6})
    r["metrics"][0] = {**r["metrics"][0], "data": {"value": "n/a"}}
    assert "before_step" not in one(diagnose(r), "vanishing_gradients")["evidence"]


# -- findings checked against real runs (MLP/FNO trainings with one known fault each) --------

def test_a_loss_on_a_detached_output_sends_no_gradient_record_and_is_no_gradient():
    """`loss = mse(model(x).detach(), y).requires_grad_()`: the forward hooks send activations
    at every capture step, the loss comes every step, and no gradient record at all arrives
    (not even `_total`). The old diagnosis said only loss_plateau."""
    r = healthy()
    r["gradients"] = []
    r["activations"] = [rec("activations", name, stats(0.01, 0.6, -2.2, 2.3), step=st)
                        for st in (0, 10, 20) for name in ("model_input", "0:output", "2:output")]
    r["metrics"] = loss_stream([0.094, 0.100, 0.097, 0.084, 0.089, 0.072, 0.081, 0.069, 0.115] * 3)
    f = one(diagnose(r), "no_gradient")
    assert f["severity"] == "high" and f["evidence"]["capture_steps"] == [0, 10, 20]
    assert f["evidence"]["gradient_records"] == 0 and "detach" in f["hint"]
    # the total norm arriving (gradients=[] in a working loop) means backward reaches the model
    r["gradients"] = [rec("gradients", "_total", {"norm": 0.13}, st) for st in (0, 10, 20)]
    assert "no_gradient" not in rules(diagnose(r))
    # one capture step is not enough to judge (a run stopped after its first forward)
    r["gradients"], r["activations"] = [], [a for a in r["activations"] if a["step"] == 0]
    assert "no_gradient" not in rules(diagnose(r))


def test_an_all_zero_gradient_behind_a_dead_relu_names_the_dead_activation_not_a_detached_graph():
    """Linear bias -20 before a ReLU: `1:output` is 0 everywhere, so layer `0` gets an all-zero
    gradient. The old hint blamed a detached graph / requires_grad=False."""
    r = healthy()
    dead = {"count": 1088, "mean": 0.0, "std": 0.0, "norm": 0.0, "max_abs": 0.0, "nan": 0, "inf": 0,
            "zero_frac": 1.0, "weight_norm": 160.07, "update_ratio": 0.0}
    r["gradients"] = [rec("gradients", "0", dead, st) for st in (0, 10, 20)]
    r["gradients"] += [rec("gradients", "2", grad(0.05, 1e-3), st) for st in (0, 10, 20)]
    r["activations"].append(rec("activations", "1:output", stats(0.0, 0.0, 0.0, 0.0), step=20))
    f = one(diagnose(r), "no_gradient")
    assert list(f["evidence"]["layers"]) == ["0"] and f["evidence"]["dead_activations"] == ["1:output"]
    assert "1:output" in f["hint"] and "dead ReLU" in f["hint"] and "detached" not in f["hint"]
    assert len(f["hint"]) < 200


def test_a_nan_after_a_rising_loss_is_divergence_and_after_a_steady_one_a_bad_batch():
    """SGD lr 3.0 on an MLP: 0.094, 0.078, 0.63, 54, 1535, 5.4e20, then NaN (real run); the
    old hint said "check the loss (log/sqrt/divide), learning rate, input" either way."""
    r = {"metrics": loss_stream([0.09385, 0.07764, 0.6261, 53.96, 1535.0, 5.369e20, None, None])}
    f = one(diagnose(r), "nonfinite")
    assert f["evidence"]["loss_before"]["rise"] > 1e2 and f["evidence"]["first"][0]["step"] == 6
    assert "diverged" in f["hint"] and "learning rate" in f["hint"]
    # one NaN batch at step 57 of a steady loss (real run): no divergence claimed
    steady = [0.05 * (1 + 0.2 * math.sin(i)) for i in range(57)] + [None] * 5
    f = one(diagnose({"metrics": loss_stream(steady)}), "nonfinite")
    assert f["evidence"]["loss_before"]["rise"] < 2 and "diverged" not in f["hint"]
    assert "bad batch" in f["hint"]
    # a loss that can be <= 0 (a log-likelihood) has no rise ratio: the general hint, no claim
    f = one(diagnose({"metrics": loss_stream([-1.0, -2.0, -3.0, None])}), "nonfinite")
    assert "loss_before" not in f["evidence"] and "diverged" not in f["hint"] and "steady" not in f["hint"]


def pm_rec(**d):
    return [rec("patch_metrics", "patch_metrics", {"count": 64, "scaling": "none", "scale_applied": False, **d},
                step=190)]


def test_a_tiny_optimal_scale_that_only_shrinks_an_unrelated_output_is_not_scale_mismatch():
    """Raw inputs (x1e4) and Adam at lr 1.0 (real runs): the prediction is large and unrelated
    to the target, the least-squares scale (0.0022, 0.031) shrinks it to ~0 and the MAE falls
    to that of predicting 0. The old rule called it a unit/gain error (high)."""
    for d in ({"mae": 13.93, "mse": 321.97, "optimal_scale": 0.0021697, "mae_after_optimal_scale": 0.252,
               "mse_after_optimal_scale": 0.10014},
              {"mae": 1.1849, "mse": 1.50427, "optimal_scale": 0.0305854, "mae_after_optimal_scale": 0.25173,
               "mse_after_optimal_scale": 0.100263}):
        assert V.scale_mismatch(pm_rec(**d)) == []
    # sigmoid output (<= 1) against a target in x1e3 units (real run): a true gain error stays high
    f = one(V.scale_mismatch(pm_rec(mae=474.83, mse=264868.4, optimal_scale=475.94, mae_after_optimal_scale=166.52,
                                    mse_after_optimal_scale=39399.97)), "scale_mismatch")
    assert f["severity"] == "high" and f["evidence"]["explained"] > 0.8


@pytest.mark.parametrize("explained,fires", [(0.19, False), (0.21, True), (0.9, True)])
def test_scale_mismatch_needs_the_rescaled_prediction_to_explain_a_fifth_of_the_target(explained, fires):
    found = V.scale_mismatch(pm(0.01, 0.2, 0.05, explained))
    assert (rules(found) == {"scale_mismatch"}) is fires
    if fires:
        assert math.isclose(found[0]["evidence"]["explained"], explained, rel_tol=1e-3)


def test_update_ratio_small_is_high_when_every_watched_layer_barely_moves():
    """SGD lr 1e-7 (real run): every layer's update/weight ~1e-10; the only high finding was
    the plateau, and the cause (a learning rate far too small) was medium."""
    f = one(G.update_ratios(grad_stream(ratios={L: 7e-11 for L in LAYERS})), "update_ratio_small")
    assert f["severity"] == "high" and f["evidence"]["all_layers"] is True
    assert "learning rate" in f["hint"] and "lift.0" in f["hint"]
    # some layers slow, the others moving (vanishing gradients): still medium
    f = one(G.update_ratios(grad_stream(ratios={"lift.0": 2e-12, "blocks.0.spectral": 3e-9})),
            "update_ratio_small")
    assert f["severity"] == "medium"


def target_rec(name, lo, hi, step):
    return rec("loader_stats", name, {"count": 64, "nan": 0, "inf": 0, "min": lo, "max": hi,
                                      "mean": (lo + hi) / 2, "std": 5.96e-8 if lo == hi else 0.3,
                                      "shape": [64, 1], "dtype": "float32", "split": "train", "batch": 0}, step)


def test_a_target_with_one_value_in_every_captured_batch_is_constant_target():
    """y = 0.7 for every sample (real run): the loss falls to ~0 and the old diagnosis found
    nothing. Other constant fields (the demo's coords_relative is all 0 at gridsize 1) are not
    judged: only a target-named field."""
    r = healthy()
    r["loader_stats"] += [target_rec("target", 0.7, 0.7, st) for st in (0, 10, 20)]
    r["loader_stats"] += [target_rec("coords_relative", 0.0, 0.0, st) for st in (0, 10, 20)]
    f = one(diagnose(r), "constant_target")
    assert f["severity"] == "high" and f["evidence"]["name"] == "target"
    assert f["evidence"]["values"] == [0.7] and f["evidence"]["captures"] == 3
    assert "'target'" in f["hint"]
    # a single captured batch could be constant by chance: medium
    assert one(V.constant_target([target_rec("labels", 1.0, 1.0, 0)]), "constant_target")["severity"] == "medium"
    # one batch with spread clears it; a validation batch is not judged
    assert V.constant_target(r["loader_stats"] + [target_rec("target", 0.1, 0.9, 30)]) == []
    val = target_rec("y", 0.5, 0.5, 0)
    val["data"]["split"] = "val"
    assert V.constant_target([val]) == []
    # "y" names the target at the top of a batch, a coordinate inside one (a probe at y = 0)
    assert one(V.constant_target([target_rec("y", 0.5, 0.5, st) for st in (0, 10)]), "constant_target")
    assert V.constant_target([target_rec("probe_pos.y", 0.0, 0.0, st) for st in (0, 10)]) == []


def frozen_flat_collapsed():
    """Frozen weights (the cause), and what follows from them: a constant output and a flat
    loss; plus a medium dead activation (listed as a cause after the high ones)."""
    r = healthy()
    r["gradients"] = grad_stream(ratios={L: 0.0 for L in LAYERS})
    r["activations"] = r["activations"][:1] + [
        rec("activations", "generator_output", stats(0.3, 0.0, 0.3, 0.3)),
        rec("activations", "blocks.1:output", stats(0.0, 0.0, 0.0, 0.0))]
    r["metrics"] = loss_stream([1.0] * 20)
    return r


def test_a_consequence_is_marked_with_its_causes_and_sorted_after_them():
    found = diagnose(frozen_flat_collapsed())
    assert [(f["rule"], f["severity"]) for f in found] == [
        ("frozen_parameters", "high"), ("collapsed_output", "high"), ("loss_plateau", "high"),
        ("dead_activation", "medium")]
    for rule in ("collapsed_output", "loss_plateau"):
        f = one(found, rule)
        # severity kept (a filter on high still shows the flat loss), the cause named
        assert f["evidence"]["consequence_of"] == ["frozen_parameters", "dead_activation"]
        assert f["hint"].endswith(": likely a consequence of frozen_parameters, dead_activation")
        assert len(f["hint"]) < 200
    assert "the loss has not fallen over the last 10 of 20 steps" in one(found, "loss_plateau")["hint"]
    # causes are not marked; a consequence explained by a cause is no cause itself
    for rule in ("frozen_parameters", "dead_activation"):
        assert "consequence_of" not in one(found, rule)["evidence"]
    assert "collapsed_output" not in one(found, "loss_plateau")["evidence"]["consequence_of"]


def test_a_consequence_needs_a_high_cause_and_an_unexplained_collapse_explains_the_plateau():
    r = frozen_flat_collapsed()
    r["gradients"] = grad_stream(ratios={L: 1e-7 for L in LAYERS[:2]})  # update_ratio_small, medium
    found = diagnose(r)
    assert one(found, "update_ratio_small")["severity"] == "medium"
    # a medium dead layer and slow layers alone do not explain the collapse: not marked
    assert "consequence_of" not in one(found, "collapsed_output")["evidence"]
    plateau = one(found, "loss_plateau")
    assert plateau["evidence"]["consequence_of"] == ["collapsed_output", "dead_activation", "update_ratio_small"]
    assert [f["rule"] for f in found][:2] == ["collapsed_output", "loss_plateau"]


def test_a_scale_mismatch_beside_a_collapsed_output_is_its_consequence_not_a_plateau_cause():
    """A constant prediction's best scale is the target's mean over that constant: the demo's
    raw-input run said "off by ~0.396x: look for a unit or gain error" beside collapsed_output,
    and listed scale_mismatch among the plateau's causes. Now it is marked a consequence of the
    collapse (also where the collapse is itself a consequence), and the plateau's causes are the
    collapse's. Without a collapse, scale_mismatch stays a cause."""
    r = frozen_flat_collapsed()
    r["patch_metrics"] = pm(0.396, 0.5, 0.1)
    found = diagnose(r)
    sm = one(found, "scale_mismatch")
    assert sm["evidence"]["consequence_of"] == ["collapsed_output"]
    assert sm["hint"].endswith(": likely a consequence of collapsed_output") and "gain error" not in sm["hint"]
    assert one(found, "collapsed_output")["evidence"]["consequence_of"] == ["frozen_parameters", "dead_activation"]
    assert one(found, "loss_plateau")["evidence"]["consequence_of"] == ["frozen_parameters", "dead_activation"]
    assert [f["rule"] for f in found].index("scale_mismatch") > [f["rule"] for f in found].index("frozen_parameters")
    r = healthy()
    r["patch_metrics"] = pm(0.396, 0.5, 0.1)
    r["metrics"] = loss_stream([1.0] * 20)
    found = diagnose(r)
    assert "consequence_of" not in one(found, "scale_mismatch")["evidence"]
    assert one(found, "loss_plateau")["evidence"]["consequence_of"] == ["scale_mismatch"]


def test_every_hint_stays_under_200_characters_with_long_names_keeping_its_advice():
    """DIAGNOSIS.md says a hint stays under 200 characters; only a consequence's was cut. A NaN
    metric of a 200-character name gave a hint of 298, a constant target field of 206 characters
    one of 331. The observation is shortened, the advice after it kept."""
    long = "encoder." * 25 + "target"
    r = {"metrics": [rec("metrics", "x" * 200, {"value": None}, step=5)],
         "loader_stats": [target_rec(long, 1.0, 1.0, st) for st in (0, 4)]}
    found = diagnose(r)
    assert rules(found) >= {"nonfinite", "constant_target"}
    for f in found:
        assert len(f["hint"]) < 200, (f["rule"], f["hint"])
    assert one(found, "nonfinite")["hint"].endswith("...: check the loss (log/sqrt/divide), learning rate, input")
    assert "the model can only learn a constant" in one(found, "constant_target")["hint"]
    from collector.diagnosis.common import listed
    assert listed([long, "b"]) == "..." + long[-57:] + " and 1 more"


def test_a_long_consequence_hint_is_shortened_under_200_characters():
    from collector.diagnosis.causes import mark_consequences
    long = "the loss has not fallen " + "x" * 190 + ": look at the other findings for why"
    found = mark_consequences([{"rule": r, "severity": "high", "evidence": {}, "hint": "h"}
                               for r in ("vanishing_gradients", "update_ratio_large", "no_gradient",
                                         "frozen_parameters")]
                              + [{"rule": "loss_plateau", "severity": "high", "evidence": {"a": 1}, "hint": long}])
    f = found[-1]
    assert len(f["hint"]) < 200 and f["hint"].startswith("the loss has not fallen xxx")
    assert "...: likely a consequence of vanishing_gradients" in f["hint"] and " more" in f["hint"]
    assert f["evidence"] == {"a": 1, "consequence_of": ["vanishing_gradients", "update_ratio_large",
                                                        "no_gradient", "frozen_parameters"]}


# Adam at lr 1.0 on the audit's MLP: from 0.09 up to 9e8 within 3 steps, back to ~0.9
BLOW_UP = [0.0938, 2.44e7, 2.78e8, 9.17e8, 3.9e6, 1.34e7, 5.6e5, 1.4e4, 6.9e2, 25.0, 3.1, 1.2,
           0.95, 0.9, 0.88, 0.91, 0.87, 0.9, 0.89, 0.885]


def test_a_loss_that_blows_up_and_comes_back_is_loss_spikes():
    f = one(diagnose({"metrics": loss_stream(BLOW_UP)}), "loss_spikes")
    ev = f["evidence"]
    assert f["severity"] == "high" and ev["count"] == 1
    assert ev["spikes"] == [{"steps": [1, 9], "peak_step": 3, "peak": 9.17e8, "baseline": 0.0938,
                             "ratio": pytest.approx(9.776e9, rel=1e-3)}]
    assert ev["ratio_max"] == pytest.approx(9.776e9, rel=1e-3)
    assert "9.78e+09x" in f["hint"] and "step 3" in f["hint"] and "learning rate" in f["hint"]
    assert len(f["hint"]) < 200


def noisy(n=200, seed=0):
    """A falling loss with batch noise: every value 0.5-2x the trend, every 10th 10x it."""
    import random
    rnd = random.Random(seed)
    return [math.exp(-i / 60) * (10.0 if i % 10 == 7 else rnd.uniform(0.5, 2.0)) for i in range(n)]


def test_loss_spikes_ignores_a_noisy_loss_and_the_first_steps_but_not_a_jump_by_orders():
    # 10x spikes, one unusually low batch (a 1e-3 dip does not lower the baseline: median
    # of 5), and first steps that fall 100x and bounce 10x: nothing to report
    calm = [5.0, 0.5, 0.05, 0.5, 0.3] + noisy()
    calm[100] = calm[99] * 1e-3
    assert [f for f in diagnose({"metrics": loss_stream(calm)}) if f["rule"] == "loss_spikes"] == []
    # the same loss with one step 150x above its level (the median of the 5 before it, which
    # the baseline does not exceed): medium; 2000x: high
    for factor, severity in ((150, "medium"), (2000, "high")):
        spiked = list(calm)
        spiked[150] = factor * sorted(calm[145:150])[2]
        f = one(diagnose({"metrics": loss_stream(spiked)}), "loss_spikes")
        assert f["severity"] == severity and f["evidence"]["spikes"][0]["steps"] == [150, 150]
        assert factor <= f["evidence"]["ratio_max"] < 2 * factor


def test_a_spike_of_a_loss_fitted_near_zero_that_stays_below_its_start_is_medium():
    """1e-6 -> 1e-3 is 1000x the floor, but far below where the loss started (1.0): noise of a
    loss fitted to ~0, not a blow-up; it was high, as a jump back above the start is."""
    fitted = [1.0 * 0.8 ** i for i in range(62)] + [1e-6] * 20
    for peak, severity in ((1e-3, "medium"), (5.0, "high")):
        f = one(V.loss_spikes(loss_stream(fitted + [peak] + [1e-6] * 10)), "loss_spikes")
        assert f["severity"] == severity and f["evidence"]["ratio_max"] >= 1e3, peak
        assert f["evidence"]["start_level"] == pytest.approx(0.64)


def test_a_loss_still_up_at_the_end_or_not_positive_is_not_loss_spikes():
    up = BLOW_UP[:8]  # never came back: a divergence, not a spike
    assert V.loss_spikes(loss_stream(up)) == []
    assert one(V.loss_spikes(loss_stream(up + [0.9])), "loss_spikes")["evidence"]["spikes"][0]["steps"] == [1, 7]
    # a loss that can be <= 0 (a log-likelihood) has no ratio to judge by
    assert V.loss_spikes(loss_stream(BLOW_UP + [-1.0])) == []


def test_a_loss_spike_after_a_too_large_step_is_its_consequence():
    r = healthy()
    r["gradients"] = grad_stream(ratios={"lift.0": 0.9})  # update_ratio_large, high
    r["metrics"] = loss_stream(BLOW_UP + [0.9 * 0.95 ** i for i in range(40)])
    found = diagnose(r)
    assert [f["rule"] for f in found][:2] == ["update_ratio_large", "loss_spikes"]
    f = one(found, "loss_spikes")
    assert f["severity"] == "high" and f["evidence"]["consequence_of"] == ["update_ratio_large"]
    assert f["hint"].startswith("the loss jumped 9.78e+09x above its running minimum at step 3 and came back down")
