"""`tensortap report RUN_DIR [--json]`: diagnose a stored run (no collector needed)."""
from __future__ import annotations

import json
import os
import sys

from collector.diagnosis import diagnose, load_run, write_findings
from collector.text import plural


def _evidence_line(ev: dict, width: int = 160) -> str:
    s = json.dumps(ev, separators=(", ", ": "))
    return s if len(s) <= width else s[: width - 3] + "..."


def report_main(args) -> int:
    """args.run_dir: a run folder; args.json: print the findings as JSON instead of text.

    Writes run_dir/findings.json when the folder is writable (else only prints). Returns 0."""
    run_dir = args.run_dir
    try:
        findings = write_findings(run_dir)
    except OSError:
        findings = diagnose(load_run(run_dir))
    if getattr(args, "json", False):
        json.dump(findings, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    name = os.path.basename(os.path.normpath(run_dir))
    if not findings:
        print(f"{name}: no findings")
        return 0
    print(f"{name}: {plural(len(findings), 'finding')}")
    for f in findings:
        print(f"[{f['severity'].upper()}] {f['rule']}: {f['hint']}")
        print(f"    evidence: {_evidence_line(f['evidence'])}")
    return 0
