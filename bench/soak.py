"""Soak: 8 sender processes at a combined 10k records/s into one collector (a benchmark).

    .venv/bin/python bench/soak.py [--seconds 600] [--ranks 8] [--rate 10000]

Reports records written vs sent, gaps, duplicates, drops, and the collector's CPU time and
peak RSS (psutil, sampled every 0.5 s). Each sender is tests/sender_proc.py: the real
client Sender, gradient-like records of 7 statistics, batches of 64.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.collector.test_reliability import finish, start_senders  # noqa: E402
from tests.procs import CollectorProc, PeakRSS, manifest, wait_for  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--rate", type=float, default=10_000, help="combined records/s")
    a = ap.parse_args()
    out = tempfile.mkdtemp(prefix="tt-soak-")
    col = CollectorProc(out, http=True)
    rss = PeakRSS(col.proc.pid, interval=0.5)
    proc = rss.proc
    cpu0 = proc.cpu_times()
    t0 = time.monotonic()
    senders = start_senders(col.endpoint, "soak", a.ranks, rate=a.rate / a.ranks, seconds=a.seconds)
    results = finish(senders, timeout=a.seconds + 300)
    run_dir = os.path.join(out, "soak")
    wait_for(lambda: all(manifest(run_dir)["ranks"][str(r)]["closed"] for r in range(a.ranks)), 30, 0.5)
    time.sleep(1.5)
    wall = time.monotonic() - t0
    cpu1 = proc.cpu_times()
    peak = rss.stop()
    m = manifest(run_dir)
    col.stop()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    sent = sum(r["sent"] for r in results)
    summary = {"seconds": a.seconds, "ranks": a.ranks, "sent": sent, "written": m["totals"]["written"],
               "gaps": m["totals"]["gaps"], "duplicates": m["totals"]["duplicates"],
               "dropped_by_sender": m["totals"]["dropped_by_sender"],
               "rate": round(sent / a.seconds), "collector_cpu_s": round(cpu, 1),
               "collector_cpu_pct": round(100 * cpu / wall, 1),
               "collector_peak_rss_mib": round(peak / 2**20, 1),
               "worst_enqueue_p99_ms": round(max(r["p99_ms"] for r in results), 4)}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
