"""Diagnosis: rules over a run's stat streams -> findings (torch-free).

    diagnose(records_by_kind) -> [{"rule", "severity", "evidence", "hint"}, ...]
        (a symptom explained by a cause found beside it, e.g. a plateau behind frozen weights,
        is marked: evidence "consequence_of" [rules], sorted after the causes; causes.py)
    load_run(run_dir) -> {kind: [record, ...]}
    write_findings(run_dir) -> findings (also written to run_dir/findings.json, atomically)

Rules and thresholds: docs/DIAGNOSIS.md. Judged from statistics alone. In a run of several
ranks (DDP) the tensor rules judge the lowest rank's records (rank 0); NaN/Inf are looked for
in every rank's, and the loss is averaged over the ranks per step. Activations taken in an
evaluation ({"split": "val"}) are left out of the activation rules. Once a gradient or the loss
is non-finite, the gradient rules judge only the captures before that step (evidence
`before_step`).
"""
from __future__ import annotations

import json
import os
import time

from collector.diagnosis import gradients, values
from collector.diagnosis.causes import HINT_MAX, fit_hint, is_consequence, mark_consequences
from collector.diagnosis.common import before_divergence, finite_json, one_rank, training
from collector.diagnosis.load import load_run

__all__ = ["diagnose", "load_run", "write_findings"]

_ORDER = {"high": 0, "medium": 1, "low": 2}


def diagnose(records_by_kind: dict[str, list[dict]]) -> list[dict]:
    """All findings for one run's records, most severe first; evidence numbers finite or None."""
    r = records_by_kind
    grads, acts = one_rank(r.get("gradients", [])), one_rank(training(r.get("activations", [])))
    finite, cut = before_divergence(grads, r.get("metrics", []))
    act = values.activations(acts)
    dead = tuple(t for f in act if f["rule"] == "dead_activation" for t in f["evidence"]["tensors"])
    judged = gradients.gradient_flow(finite) + gradients.dead_parameters(finite, dead) + gradients.update_ratios(finite)
    if cut is not None:  # (judged on the captures before the gradients or the loss went non-finite)
        judged = [{**f, "evidence": {**f["evidence"], "before_step": cut}} for f in judged]
    found = (values.nonfinite(r) + judged + gradients.no_gradient_at_all(grads, acts, r.get("metrics", []))
             + act + values.weak_layers(acts)
             + values.input_range(acts) + values.constant_target(one_rank(r.get("loader_stats", [])))
             + values.scale_mismatch(one_rank(r.get("patch_metrics", []))) + values.loss_plateau(r.get("metrics", []))
             + values.loss_spikes(r.get("metrics", [])))
    found = [f if len(f["hint"]) <= HINT_MAX else {**f, "hint": fit_hint(f["hint"])} for f in found]
    found = mark_consequences(sorted(found, key=lambda f: (_ORDER[f["severity"]], f["rule"])))
    # by severity; within one, the causes before what they explain (consequence_of), then by rule.
    # NaN/Inf of the evidence as None: findings.json and the API stay strict JSON
    return finite_json(sorted(found, key=lambda f: (_ORDER[f["severity"]], is_consequence(f), f["rule"])))


def write_findings(run_dir: str, stats=None) -> list[dict]:
    """Diagnose a stored run and write run_dir/findings.json (tmp file + rename); a non-finite
    number of the evidence is written as null (strict JSON). stats: a collector.load
    LoadStats that counts the records read and the lines skipped."""
    records = load_run(run_dir, stats)
    findings = diagnose(records)
    doc = {"v": 1, "run": os.path.basename(os.path.abspath(run_dir)), "t": time.time(),
           "records": {k: len(v) for k, v in records.items()}, "findings": findings}
    path = os.path.join(run_dir, "findings.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)  # (the findings are finite_json'd by diagnose)
    os.replace(tmp, path)
    return findings
