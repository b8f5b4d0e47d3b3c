"""Read one run folder into {kind: [record, ...]} for the rules (no torch, no web stack).

JSONL streams are read line by line; a line that is not a JSON object (a torn last line
left by a killed collector, or garbage) is skipped, never fatal. patch_metrics.json holds
{name: record} (latest per name) or a list of records.
"""
from __future__ import annotations

import json
import os

from collector.wire import STREAM_FILES


def _read_jsonl(path: str) -> list[dict]:
    out = []
    try:
        with open(path, "rb") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # torn or corrupt line
                if isinstance(rec, dict):
                    out.append(rec)
    except OSError:
        pass
    return out


def _read_doc(path: str) -> list[dict]:
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return []
    items = doc.values() if isinstance(doc, dict) else doc if isinstance(doc, list) else []
    return [r for r in items if isinstance(r, dict)]


def load_run(run_dir: str) -> dict[str, list[dict]]:
    """All records of a stored run, by kind (every kind of wire.STREAM_FILES is a key)."""
    out: dict[str, list[dict]] = {}
    for kind, fname in STREAM_FILES.items():
        path = os.path.join(run_dir, fname)
        out[kind] = _read_doc(path) if fname.endswith(".json") else _read_jsonl(path)
    return out
