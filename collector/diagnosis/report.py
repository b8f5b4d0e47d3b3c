"""`tensortap report RUN_DIR [--json]`: diagnose a stored run (no collector needed); of a
folder of runs, a line per run from what is stored."""
from __future__ import annotations

import json
import os
import sys
import time

from collector.diagnosis import diagnose, load_run, write_findings
from collector.text import plural, run_counts
from collector.wire import rank_key


def _evidence_line(ev: dict, width: int = 160) -> str:
    s = json.dumps(ev, separators=(", ", ": "))
    return s if len(s) <= width else s[: width - 3] + "..."


def root_rows(root: str) -> list[dict]:
    """The runs under `root`, newest first, from their manifest.json and findings.json (no
    run is diagnosed again): run, created, totals, unclosed ranks, rejected, findings (rules)
    or None when the run has no findings.json."""
    from collector.load import is_run_dir, stored_docs

    rows = []
    for e in os.scandir(root):
        if not is_run_dir(e.path):
            continue
        m, f = stored_docs(e.path)
        ranks = m.get("ranks") if isinstance(m.get("ranks"), dict) else {}
        created = m.get("created")
        mpath = os.path.join(e.path, "manifest.json")
        usable = bool(m) and isinstance(m.get("totals"), dict)  # (counts of another shape read as 0 written)
        state = ("ok" if usable else "not a manifest's shape" if m
                 else "unreadable or empty" if os.path.isfile(mpath) else "missing")
        rows.append({"run": e.name, "created": created if isinstance(created, (int, float)) else e.stat().st_mtime,
                     "manifest": usable, "manifest_state": state,
                     "totals": m.get("totals") if isinstance(m.get("totals"), dict) else {},
                     "unclosed": sorted(k for r, st in ranks.items() if (k := rank_key(r)) is not None
                                        and isinstance(st, dict) and st.get("hello") and not st.get("closed")),
                     "rejected": m.get("rejected") or 0,
                     "findings": None if f is None else [x.get("rule") for x in f]})
    return sorted(rows, key=lambda r: -r["created"])


def report_root(root: str, as_json: bool) -> int:
    """`tensortap report ROOT`: a line per run, newest first."""
    rows = root_rows(root)
    if as_json:
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    print(f"{root}: {plural(len(rows), 'run')}, newest first (`tensortap report RUN_DIR` diagnoses one)")
    width = max(len(r["run"]) for r in rows)
    for r in rows:
        try:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"]))
        except (OverflowError, OSError, ValueError):  # a manifest's `created` no clock can show
            when = "????-??-?? ??:??"
        if not r["manifest"]:
            why = " (its collector was killed?)" if r["manifest_state"] == "missing" else ""
            what = f"manifest.json {r['manifest_state']}{why}: `tensortap report` it to see"
        else:
            f = r["findings"]
            what = run_counts(r["totals"], r["unclosed"], r["rejected"], len(f or []))
            if f is None:
                what += " (not diagnosed yet)"
            elif f:
                shown = ", ".join(f[:3]) + (f", +{len(f) - 3}" if len(f) > 3 else "")
                what += f": {shown}"
        print(f"  {r['run']:<{width}}  {when}  {what}")
    return 0


def report_main(args) -> int:
    """args.run_dir: a run folder; args.json: print the findings as JSON instead of text.

    Writes run_dir/findings.json when the folder is writable (else only prints). Returns 0."""
    from collector.load import LoadStats

    run_dir = args.run_dir
    stats = LoadStats()
    try:
        findings = write_findings(run_dir, stats)
    except OSError:
        stats = LoadStats()
        findings = diagnose(load_run(run_dir, stats))
    if getattr(args, "json", False):
        json.dump(findings, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    name = os.path.basename(os.path.abspath(run_dir))
    skipped = f"{plural(stats.torn + stats.bad, 'line')} skipped: torn or not a record"
    if not stats.records:
        print(f"{name}: no record could be read{f' ({skipped})' if stats.torn + stats.bad else ''}: "
              "nothing to diagnose")
        return 0
    read = plural(stats.records, "record") + " read" + (f" ({skipped})" if stats.torn + stats.bad else "")
    if not findings:
        print(f"{name}: {read}; no findings")
        return 0
    print(f"{name}: {read}; {plural(len(findings), 'finding')}")
    for f in findings:
        print(f"[{f['severity'].upper()}] {f['rule']}: {f['hint']}")
        print(f"    evidence: {_evidence_line(f['evidence'])}")
    return 0
