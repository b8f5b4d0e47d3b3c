"""Wording shared by the collector's command-line output."""
from __future__ import annotations


def plural(count: int, noun: str) -> str:
    """'1 run', '3 runs' (nouns that take an s)."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


LOST = (("gaps", "gap"), ("dropped_by_sender", "dropped by the sender"), ("write_failed", "failed write"))


def run_counts(totals: dict, unclosed: list, rejected: int, findings: int) -> str:
    """What a run got and lost, from its manifest's totals: "N records written, none lost
    (or K lost (...)), ...". unclosed: ranks that never said bye."""
    count = (lambda key: v if isinstance(v := totals.get(key), int) else 0)  # (a hand-edited manifest)
    lost = [(count(key), what) for key, what in LOST]
    n = sum(c for c, _ in lost)
    parts = [plural(count("written"), "record") + " written",
             f"{n} lost ({', '.join(f'{c} {w}' if w.startswith('dropped') else plural(c, w) for c, w in lost if c)})"
             if n else "none lost"]
    if unclosed:  # no bye: what such a rank sent after its last record here is not counted
        parts.append(f"{'rank' if len(unclosed) == 1 else 'ranks'} {', '.join(map(str, unclosed))} "
                     "never closed (records sent last may be missing)")
    if count("duplicates"):
        parts.append(plural(count("duplicates"), "duplicate"))
    if rejected:
        parts.append(plural(rejected, "frame") + " rejected")
    parts.append(plural(findings, "finding"))
    return ", ".join(parts)
