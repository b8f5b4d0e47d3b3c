"""Prometheus text exposition of the collector's counters (`/metrics`)."""
from __future__ import annotations

COUNTERS = {  # health key -> (metric name, help); counters only grow
    "frames": ("tensortap_frames_total", "Frames received"),
    "received": ("tensortap_records_received_total", "Records received"),
    "written": ("tensortap_records_written_total", "Records written to JSONL"),
    "rejected": ("tensortap_frames_rejected_total", "Frames rejected by validation"),
    "gaps": ("tensortap_records_gap_total", "Records missing by sequence number"),
    "duplicates": ("tensortap_records_duplicate_total", "Duplicate records (not written)"),
    "dropped_by_sender": ("tensortap_records_dropped_by_sender_total", "Records senders dropped, as they reported"),
    "write_failed": ("tensortap_records_write_failed_total", "Records that could not be written"),
}
GAUGES = {
    "queue_bytes": ("tensortap_queue_bytes", "Bytes waiting for the writer"),
    "queue_max_bytes": ("tensortap_queue_max_bytes", "Bound of the write queue"),
    "fsync_ms_last": ("tensortap_fsync_last_milliseconds", "Duration of the last fsync round"),
    "fsync_ms_max": ("tensortap_fsync_max_milliseconds", "Longest fsync round"),
    "runs": ("tensortap_runs", "Runs known to the collector"),
    "uptime_s": ("tensortap_uptime_seconds", "Seconds since the collector started"),
}


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(health: dict) -> str:
    out = []
    for table, typ in ((COUNTERS, "counter"), (GAUGES, "gauge")):
        for key, (name, help_) in table.items():
            if isinstance(health.get(key), (int, float)):
                out += [f"# HELP {name} {help_}", f"# TYPE {name} {typ}", f"{name} {health[key]}"]
    reasons = health.get("rejected_by_reason") or {}
    out += ["# HELP tensortap_frames_rejected_by_reason_total Frames rejected, by reason",
            "# TYPE tensortap_frames_rejected_by_reason_total counter"]
    out += [f'tensortap_frames_rejected_by_reason_total{{reason="{_escape(str(r))}"}} {n}'
            for r, n in sorted(reasons.items())]
    out += ["# HELP tensortap_degraded 1 while writes fail (disk full, ...)", "# TYPE tensortap_degraded gauge",
            f"tensortap_degraded {1 if health.get('degraded') else 0}"]
    return "\n".join(out) + "\n"
