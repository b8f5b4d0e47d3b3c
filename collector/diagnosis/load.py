"""Read one run folder into {kind: [record dict, ...]} for the rules (no torch, no web stack).

The reading itself is collector.load's (validated wire Records; a torn last line or a
corrupt line is skipped, never fatal); here the records are grouped by kind as plain dicts.
"""
from __future__ import annotations

import msgspec

from typing import Optional

from collector.load import LoadStats, run_records
from collector.wire import STREAM_FILES


def load_run(run_dir: str, stats: Optional[LoadStats] = None) -> dict[str, list[dict]]:
    """All records of a stored run, by kind (every kind of wire.STREAM_FILES is a key);
    `stats` counts what was read and skipped."""
    out: dict[str, list[dict]] = {kind: [] for kind in STREAM_FILES}
    for rec in run_records(run_dir, stats):
        out[rec.kind].append(msgspec.structs.asdict(rec))
    return out
