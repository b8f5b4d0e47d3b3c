"""Read stored runs back: the index behind `tensortap serve ROOT`, and the records replay sends.

A run folder is any folder under ROOT holding a manifest.json or one of the stream files
(collector.wire.STREAM_FILES). A torn last line (a killed collector) and lines that are
not valid records are skipped and counted, never fatal.
"""
from __future__ import annotations

import os
import time
from typing import Iterator, Optional

import msgspec

from collector.index import Index, RunIndex
from collector.wire import STREAM_FILES, Record, valid_run_id

_decode_record = msgspec.json.Decoder(Record).decode
_decode_any = msgspec.json.Decoder().decode


class LoadStats:
    """What reading a folder skipped: torn last lines, bad lines, unreadable documents."""

    def __init__(self) -> None:
        self.records = self.torn = self.bad = self.bad_docs = 0

    def as_dict(self) -> dict:
        return {"records": self.records, "torn_lines": self.torn, "bad_lines": self.bad,
                "bad_documents": self.bad_docs}


def jsonl_records(path: str, stats: LoadStats) -> Iterator[Record]:
    """Records of one JSONL file, in file order; a last line without its newline is torn."""
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    if lines and lines[-1].strip():
        stats.torn += 1  # no newline at the end: the writer was killed mid-line
    for line in lines[:-1]:
        if not line.strip():
            continue
        try:
            rec = _decode_record(line)
        except (msgspec.DecodeError, msgspec.ValidationError):
            stats.bad += 1
            continue
        stats.records += 1
        yield rec


def _read_json(path: str, stats: LoadStats):
    try:
        with open(path, "rb") as f:
            return _decode_any(f.read())
    except (OSError, msgspec.DecodeError):
        stats.bad_docs += 1
        return None


def patch_records(path: str, stats: LoadStats) -> list[Record]:
    """patch_metrics.json: {name: record} (latest per name), or a list of records."""
    doc = _read_json(path, stats)
    items = doc.values() if isinstance(doc, dict) else doc if isinstance(doc, list) else []
    out = []
    for item in items:
        try:
            out.append(msgspec.convert(item, Record))
            stats.records += 1
        except msgspec.ValidationError:
            stats.bad += 1
    return out


def run_records(run_dir: str, stats: Optional[LoadStats] = None) -> list[Record]:
    """Every record of a stored run, ordered by (t, rank, seq)."""
    stats = stats or LoadStats()
    recs: list[Record] = []
    for kind, fname in STREAM_FILES.items():
        path = os.path.join(run_dir, fname)
        if not os.path.isfile(path):
            continue
        if fname.endswith(".jsonl"):
            recs.extend(jsonl_records(path, stats))
        else:
            recs.extend(patch_records(path, stats))
    recs.sort(key=lambda r: (r.t, r.rank, r.seq))
    return recs


def is_run_dir(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("manifest.json", *STREAM_FILES.values()))


def load_run(run_dir: str, stats: Optional[LoadStats] = None) -> RunIndex:
    """One stored run as a RunIndex: its records, manifest.json and findings.json."""
    stats = stats or LoadStats()
    ri = RunIndex(os.path.basename(os.path.normpath(run_dir)))
    for rec in run_records(run_dir, stats):
        ri.add(rec)
    mpath, fpath = os.path.join(run_dir, "manifest.json"), os.path.join(run_dir, "findings.json")
    if os.path.isfile(mpath):
        m = _read_json(mpath, stats)
        ri.manifest = m if isinstance(m, dict) else {}
    if os.path.isfile(fpath):
        f = _read_json(fpath, stats)
        f = f.get("findings") if isinstance(f, dict) else f
        ri.findings = [x for x in f if isinstance(x, dict)] if isinstance(f, list) else []
    return ri


def load_root(root: str) -> Index:
    """Index over every run folder under `root` (for `tensortap serve ROOT`; no ingest).

    Its health() reports mode "serve", the root, and what reading skipped."""
    stats = LoadStats()
    loaded_at = time.time()
    index = Index()
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if valid_run_id(name) and is_run_dir(path):  # the folder name is the run id
            ri = load_run(path, stats)
            index.runs[ri.run] = ri
    index.health = lambda: {"mode": "serve", "root": os.path.abspath(root), "runs": len(index.runs),
                            "loaded_at": loaded_at, **stats.as_dict()}
    return index
