"""Causes and consequences: a finding that describes what a flat or unstable loss looks like
(a collapsed output, a plateau, loss spikes) is marked as a likely consequence of the
high-severity findings present that explain it, so that a report leads with the cause.

A consequence keeps its rule, severity and evidence; its evidence gains `consequence_of`
[rules] and its hint ends "likely a consequence of ...". Its severity is not lowered: the
plateau is what the user sees, and a filter on high must still show it. diagnose() sorts
the marked findings after the causes of the same severity (docs/DIAGNOSIS.md)."""
from __future__ import annotations

from collector.diagnosis.common import listed

HINT_MAX = 199  # a hint stays under 200 characters

# Findings that name a mechanism: any of them, at high severity, can explain an output that
# does not depend on the input or a loss that does not fall.
MECHANISMS = ("nonfinite", "no_gradient", "vanishing_gradients", "exploding_gradients",
              "frozen_parameters", "update_ratio_small", "update_ratio_large", "dead_activation",
              "saturated_activation", "weak_layer", "input_range", "constant_target")

# consequence rule -> the rules that explain it, judged in this order: a finding marked a
# consequence is no cause for the ones after it (a collapsed output with a cause does not
# explain the plateau; one without a cause found does)
CONSEQUENCES = (
    # a constant prediction's best scale is the target's mean over that constant: no gain error
    # to look for, and no cause of the plateau (first: a collapsed output explains it also when
    # the collapse itself is then marked a consequence of its own cause)
    ("scale_mismatch", ("collapsed_output",)),
    ("loss_spikes", ("update_ratio_large", "exploding_gradients")),
    ("collapsed_output", MECHANISMS),
    ("loss_plateau", MECHANISMS + ("scale_mismatch", "loss_spikes", "collapsed_output")),
)
# A finding is marked only when a high-severity cause is present; medium causes are then
# listed after the high ones (in a dead-ReLU run the medium dead_activation of a hidden layer
# is what no_gradient and the collapsed output come from), never enough on their own.
CAUSE_SEVERITY = "high"
ALSO_LISTED = ("medium",)


def mark_consequences(found: list[dict]) -> list[dict]:
    """`found` with each consequence finding that has a cause present marked (new dicts for
    those; the others as they are). Causes are listed high first, then medium, each in the
    order of `found` (diagnose passes them sorted by severity and rule)."""
    consequence = set()  # ids of findings marked
    out = list(found)
    for rule, explained_by in CONSEQUENCES:
        causes = {CAUSE_SEVERITY: [], **{s: [] for s in ALSO_LISTED}}
        for f in out:
            if f["rule"] in explained_by and f["severity"] in causes and id(f) not in consequence:
                causes[f["severity"]].append(f["rule"])
        if not causes[CAUSE_SEVERITY]:
            continue
        causes = list(dict.fromkeys(r for rules in causes.values() for r in rules))
        for i, f in enumerate(out):
            if f["rule"] == rule:
                out[i] = {**f, "evidence": {**f["evidence"], "consequence_of": causes},
                          "hint": _hint(f["hint"], causes)}
                consequence.add(id(out[i]))
    return out


def is_consequence(f: dict) -> bool:
    return isinstance(f.get("evidence"), dict) and bool(f["evidence"].get("consequence_of"))


def fit_hint(hint: str) -> str:
    """A hint under 200 characters (HINT_MAX): a longer one (a long name in it) keeps its
    advice after the last ': ' and shortens the observation before it."""
    if len(hint) <= HINT_MAX:
        return hint
    head, sep, advice = hint.rpartition(": ")
    if not sep or len(advice) > HINT_MAX // 2:
        return hint[: HINT_MAX - 3].rstrip() + "..."
    room = HINT_MAX - len(advice) - 2
    return head[: room - 3].rstrip() + "...: " + advice


def _hint(hint: str, causes: list[str]) -> str:
    """The finding's observation (its hint up to the advice after the last ': ') followed by
    "likely a consequence of" its causes, shortened to fit HINT_MAX."""
    head = hint.rsplit(": ", 1)[0] if ": " in hint else hint
    tail = f": likely a consequence of {listed(causes, 60)}"
    room = HINT_MAX - len(tail)
    if len(head) > room:
        head = head[: room - 3].rstrip() + "..."
    return head + tail
